"""Every projection agentbus runs. Add a read model here."""

from __future__ import annotations

from agentbus.projections.approvals import ApprovalsProjection
from agentbus.projections.budgets import BudgetsProjection
from agentbus.projections.projection import Projection
from agentbus.projections.runs import RunsProjection
from agentbus.projections.sessions import SessionsProjection


def all_projections() -> list[Projection]:
    return [SessionsProjection(), RunsProjection(), BudgetsProjection(), ApprovalsProjection()]


def projection_named(name: str, projections: list[Projection] | None = None) -> Projection:
    """The projection called `name`, or a `ValueError` listing the known names."""
    candidates = projections if projections is not None else all_projections()
    for projection in candidates:
        if projection.name == name:
            return projection
    known = ", ".join(p.name for p in candidates)
    raise ValueError(f"no projection named {name!r}; known: {known}")
