"""Events of the workspace aggregate (a tenant) and its members."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from agentbus.events.registry import DomainEvent, EventKind

Role = Literal["owner", "admin", "member", "viewer", "auditor"]
RedactionMode = Literal["mask", "keep"]
"""What happens to secrets and personal data in inbound text: masked before the event is
written (`mask`, the default), or stored as sent (`keep`)."""


class WorkspaceCreated(DomainEvent):
    """A workspace (tenant) came into being."""

    kind: ClassVar[EventKind] = EventKind("workspace", "created", 1)

    display_name: str = Field(min_length=1, max_length=200)


class MemberAdded(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("workspace", "member_added", 1)

    user_id: str = Field(min_length=1, max_length=64)
    role: Role


class MemberRoleChanged(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("workspace", "member_role_changed", 1)

    user_id: str = Field(min_length=1, max_length=64)
    role: Role


class MemberRemoved(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("workspace", "member_removed", 1)

    user_id: str = Field(min_length=1, max_length=64)


class RedactionModeSet(DomainEvent):
    """Inbound text of this workspace is masked (`mask`) or stored as sent (`keep`) from now
    on. Before the first of these events a workspace masks."""

    kind: ClassVar[EventKind] = EventKind("workspace", "redaction_mode_set", 1)

    mode: RedactionMode
