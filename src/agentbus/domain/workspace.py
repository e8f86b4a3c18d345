"""The workspace aggregate: a tenant and who may do what in it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from agentbus.domain.decider import Decider, DomainError
from agentbus.events.registry import DomainEvent
from agentbus.events.workspace import (
    MemberAdded,
    MemberRemoved,
    MemberRoleChanged,
    RedactionMode,
    RedactionModeSet,
    Role,
    WorkspaceCreated,
)

_WORKSPACE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_workspace_id(value: str) -> str:
    """Workspace ids: lowercase letters, digits, `_`, `-`; not starting with `_` (reserved)."""
    if not _WORKSPACE_ID.fullmatch(value):
        raise InvalidWorkspaceId(
            f"workspace id {value!r} must be 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class WorkspaceState:
    exists: bool = False
    display_name: str = ""
    members: dict[str, Role] = field(default_factory=dict)
    redaction: RedactionMode = "mask"


INITIAL = WorkspaceState()


def evolve(state: WorkspaceState, event: DomainEvent) -> WorkspaceState:
    match event:
        case WorkspaceCreated():
            return replace(state, exists=True, display_name=event.display_name)
        case MemberAdded() | MemberRoleChanged():
            return replace(state, members={**state.members, event.user_id: event.role})
        case MemberRemoved():
            return replace(
                state, members={u: r for u, r in state.members.items() if u != event.user_id}
            )
        case RedactionModeSet():
            return replace(state, redaction=event.mode)
    return state


@dataclass(frozen=True, slots=True)
class CreateWorkspace:
    display_name: str


@dataclass(frozen=True, slots=True)
class SetMember:
    """Add `user_id` with `role`, or change their role."""

    user_id: str
    role: Role


@dataclass(frozen=True, slots=True)
class RemoveMember:
    user_id: str


@dataclass(frozen=True, slots=True)
class SetRedaction:
    """Mask secrets and personal data in inbound text (`mask`) or store it as sent (`keep`)."""

    mode: RedactionMode


WorkspaceCommand = CreateWorkspace | SetMember | RemoveMember | SetRedaction


class InvalidWorkspaceId(DomainError):
    pass


class WorkspaceNotFound(DomainError):
    pass


class WorkspaceExists(DomainError):
    pass


class LastOwner(DomainError):
    pass


def decide(command: WorkspaceCommand, state: WorkspaceState) -> list[DomainEvent]:
    match command:
        case CreateWorkspace():
            if state.exists:
                if state.display_name == command.display_name:
                    return []
                raise WorkspaceExists("a workspace with this id exists")
            return [WorkspaceCreated(display_name=command.display_name)]
        case SetMember():
            _require(state)
            current = state.members.get(command.user_id)
            if current == command.role:
                return []
            if current == "owner" and _owners(state) == 1:
                raise LastOwner("the last owner cannot be given another role")
            if current is None:
                return [MemberAdded(user_id=command.user_id, role=command.role)]
            return [MemberRoleChanged(user_id=command.user_id, role=command.role)]
        case RemoveMember():
            _require(state)
            if command.user_id not in state.members:
                return []
            if state.members[command.user_id] == "owner" and _owners(state) == 1:
                raise LastOwner("the last owner cannot be removed")
            return [MemberRemoved(user_id=command.user_id)]
        case SetRedaction():
            _require(state)
            if command.mode == state.redaction:
                return []
            return [RedactionModeSet(mode=command.mode)]
    raise TypeError(f"not a workspace command: {command!r}")


def _require(state: WorkspaceState) -> None:
    if not state.exists:
        raise WorkspaceNotFound("the workspace does not exist")


def _owners(state: WorkspaceState) -> int:
    return sum(1 for role in state.members.values() if role == "owner")


WORKSPACE: Decider[WorkspaceCommand, WorkspaceState] = Decider("workspace", INITIAL, evolve, decide)
