"""The workspace decider as given/when/then tables (the redaction mode)."""

from __future__ import annotations

import pytest

from agentbus.domain.workspace import (
    WORKSPACE,
    SetRedaction,
    WorkspaceCommand,
    WorkspaceNotFound,
)
from agentbus.events.registry import DomainEvent
from agentbus.events.workspace import RedactionModeSet, WorkspaceCreated

CREATED = WorkspaceCreated(display_name="Acme")


def then(given: list[DomainEvent], when: WorkspaceCommand) -> list[DomainEvent]:
    return list(WORKSPACE.decide(when, WORKSPACE.fold(given)))


def test_a_workspace_masks_until_told_otherwise() -> None:
    assert WORKSPACE.fold([CREATED]).redaction == "mask"
    assert WORKSPACE.fold([CREATED, RedactionModeSet(mode="keep")]).redaction == "keep"
    keep_then_mask = [CREATED, RedactionModeSet(mode="keep"), RedactionModeSet(mode="mask")]
    assert WORKSPACE.fold(keep_then_mask).redaction == "mask"


@pytest.mark.parametrize(
    ("given", "when", "expected"),
    [
        ([CREATED], SetRedaction("keep"), [RedactionModeSet(mode="keep")]),
        ([CREATED], SetRedaction("mask"), []),  # already the default: nothing to record
        ([CREATED, RedactionModeSet(mode="keep")], SetRedaction("keep"), []),
        (
            [CREATED, RedactionModeSet(mode="keep")],
            SetRedaction("mask"),
            [RedactionModeSet(mode="mask")],
        ),
    ],
)
def test_set_redaction(
    given: list[DomainEvent], when: WorkspaceCommand, expected: list[DomainEvent]
) -> None:
    assert then(given, when) == expected


def test_set_redaction_needs_the_workspace() -> None:
    with pytest.raises(WorkspaceNotFound):
        then([], SetRedaction("keep"))
