"""Events of the identities that span workspaces: users and API keys.

Both live in the reserved workspace `_system` (`evt._system.user.<user id>.*`,
`evt._system.apikey.<key id>.*`); workspace ids never start with `_`. Secrets are stored hashed
(argon2 for passwords, SHA-256 for the high-entropy API key secrets), never in clear.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from agentbus.events.privacy import Personal
from agentbus.events.registry import DomainEvent, EventKind
from agentbus.events.workspace import Role

SYSTEM_WORKSPACE = "_system"


class UserCreated(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("user", "created", 1)
    # A person's name: sealed with the user's key (the subject is the user id, in `_system`).
    personal: ClassVar[Personal] = Personal(fields=("display_name",))

    display_name: str = Field(min_length=1, max_length=200)
    password_hash: str = Field(min_length=1, max_length=500)


class UserPasswordChanged(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("user", "password_changed", 1)

    password_hash: str = Field(min_length=1, max_length=500)


class UserDisabled(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("user", "disabled", 1)

    reason: str | None = Field(default=None, max_length=500)


class UserEnabled(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("user", "enabled", 1)


class ApiKeyIssued(DomainEvent):
    """An API key: scoped to one workspace with a role, or (workspace None) a system key that
    administers every workspace. Only the SHA-256 of its secret is kept."""

    kind: ClassVar[EventKind] = EventKind("apikey", "issued", 1)

    name: str = Field(min_length=1, max_length=200)
    workspace: str | None = Field(default=None, max_length=64)
    role: Role
    secret_sha256: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    issued_by: str = Field(min_length=1, max_length=200)


class ApiKeyRevoked(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("apikey", "revoked", 1)

    by: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)
