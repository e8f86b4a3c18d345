"""Users and API keys: the identities that act in workspaces (aggregates `user` and `apikey`
in the reserved workspace `_system`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from agentbus.domain.decider import Decider, DomainError
from agentbus.events.identity import (
    ApiKeyIssued,
    ApiKeyRevoked,
    UserCreated,
    UserDisabled,
    UserEnabled,
    UserPasswordChanged,
)
from agentbus.events.registry import DomainEvent
from agentbus.events.workspace import Role

_USER_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class InvalidUserId(DomainError):
    pass


def check_user_id(value: str) -> str:
    if not _USER_ID.fullmatch(value):
        raise InvalidUserId(f"user id {value!r} must be 1-64 lowercase letters, digits, '_' or '-'")
    return value


# ---------------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class UserState:
    exists: bool = False
    display_name: str = ""
    password_hash: str = ""
    disabled: bool = False


def evolve_user(state: UserState, event: DomainEvent) -> UserState:
    match event:
        case UserCreated():
            return UserState(True, event.display_name, event.password_hash, False)
        case UserPasswordChanged():
            return replace(state, password_hash=event.password_hash)
        case UserDisabled():
            return replace(state, disabled=True)
        case UserEnabled():
            return replace(state, disabled=False)
    return state


@dataclass(frozen=True, slots=True)
class CreateUser:
    display_name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class ChangePassword:
    password_hash: str


@dataclass(frozen=True, slots=True)
class DisableUser:
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class EnableUser:
    pass


UserCommand = CreateUser | ChangePassword | DisableUser | EnableUser


class UserNotFound(DomainError):
    pass


class UserExists(DomainError):
    pass


def decide_user(command: UserCommand, state: UserState) -> list[DomainEvent]:
    if isinstance(command, CreateUser):
        if state.exists:
            raise UserExists("a user with this id exists")
        return [UserCreated(display_name=command.display_name, password_hash=command.password_hash)]
    if not state.exists:
        raise UserNotFound("the user does not exist")
    match command:
        case ChangePassword():
            return [UserPasswordChanged(password_hash=command.password_hash)]
        case DisableUser():
            return [] if state.disabled else [UserDisabled(reason=command.reason)]
        case EnableUser():
            return [UserEnabled()] if state.disabled else []
    raise TypeError(f"not a user command: {command!r}")


USER: Decider[UserCommand, UserState] = Decider("user", UserState(), evolve_user, decide_user)

# ---------------------------------------------------------------------------- API keys


@dataclass(frozen=True, slots=True)
class ApiKeyState:
    exists: bool = False
    name: str = ""
    workspace: str | None = None
    role: Role = "viewer"
    secret_sha256: str = ""
    revoked: bool = False


def evolve_key(state: ApiKeyState, event: DomainEvent) -> ApiKeyState:
    match event:
        case ApiKeyIssued():
            return ApiKeyState(True, event.name, event.workspace, event.role, event.secret_sha256)
        case ApiKeyRevoked():
            return replace(state, revoked=True)
    return state


@dataclass(frozen=True, slots=True)
class IssueKey:
    name: str
    workspace: str | None
    role: Role
    secret_sha256: str
    issued_by: str


@dataclass(frozen=True, slots=True)
class RevokeKey:
    by: str
    reason: str | None = None


ApiKeyCommand = IssueKey | RevokeKey


class ApiKeyNotFound(DomainError):
    pass


def decide_key(command: ApiKeyCommand, state: ApiKeyState) -> list[DomainEvent]:
    match command:
        case IssueKey():
            if state.exists:
                raise DomainError("this key id is taken")
            return [
                ApiKeyIssued(
                    name=command.name,
                    workspace=command.workspace,
                    role=command.role,
                    secret_sha256=command.secret_sha256,
                    issued_by=command.issued_by,
                )
            ]
        case RevokeKey():
            if not state.exists:
                raise ApiKeyNotFound("the API key does not exist")
            return [] if state.revoked else [ApiKeyRevoked(by=command.by, reason=command.reason)]
    raise TypeError(f"not an API key command: {command!r}")


API_KEY: Decider[ApiKeyCommand, ApiKeyState] = Decider(
    "apikey", ApiKeyState(), evolve_key, decide_key
)
