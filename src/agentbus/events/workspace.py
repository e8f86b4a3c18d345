"""Events of the workspace aggregate (a tenant)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from agentbus.events.registry import DomainEvent, EventKind


class WorkspaceCreated(DomainEvent):
    """A workspace (tenant) came into being."""

    kind: ClassVar[EventKind] = EventKind("workspace", "created", 1)

    display_name: str = Field(min_length=1, max_length=200)
