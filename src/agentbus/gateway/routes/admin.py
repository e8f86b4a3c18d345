"""Workspaces, members, API keys, users, and logging in."""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from agentbus.domain.decider import DomainError
from agentbus.domain.handling import handle
from agentbus.domain.identity import (
    API_KEY,
    USER,
    ApiKeyNotFound,
    CreateUser,
    DisableUser,
    EnableUser,
    IssueKey,
    RevokeKey,
    UserNotFound,
    check_user_id,
)
from agentbus.domain.workspace import (
    WORKSPACE,
    CreateWorkspace,
    RemoveMember,
    SetMember,
    SetRedaction,
    check_workspace_id,
)
from agentbus.events.envelope import EventContext
from agentbus.events.identity import SYSTEM_WORKSPACE
from agentbus.events.subjects import AggregateRef
from agentbus.events.workspace import RedactionMode, Role
from agentbus.gateway.auth import (
    COOKIE,
    COOKIE_MAX_AGE,
    Forbidden,
    Principal,
    Unauthenticated,
    hash_password,
    new_api_key,
    password_matches,
    sign_session,
)
from agentbus.gateway.deps import Admin, Caller, PlatformDep, Reader, caller, identities
from agentbus.gateway.problems import problem_responses

router = APIRouter(prefix="/v1")

# What a route may answer besides success, by what it does.
SYSTEM_COMMAND = problem_responses(401, 403, 409, 413, 422, 429, 503)
"""A system key's command with a body."""
WORKSPACE_READ = problem_responses(401, 404, 422, 429, 503)
WORKSPACE_ADMIN = problem_responses(401, 403, 404, 409, 422, 429, 503)
"""An admin's command in a workspace (plus 413 where it takes a body)."""

_STRICT = ConfigDict(extra="forbid")


class Recorded(BaseModel):
    """A command was appended to JetStream (durable)."""

    event_ids: list[str]
    position: int = Field(description="stream position of the last appended event (0: none)")


def context(principal: Principal) -> EventContext:
    return _context(principal.actor)


@functools.lru_cache(maxsize=1024)
def _context(actor: str) -> EventContext:
    # Built and validated once per caller: an EventContext is frozen, so one can be shared.
    return EventContext(source="agentbus/gateway", actor=actor)


def require_system(principal: Principal) -> None:
    if not principal.system:
        raise Forbidden("this needs a system API key (`agentbus admin init`)")


# ---------------------------------------------------------------------------- workspaces


class NewWorkspace(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=64, examples=["acme"])
    display_name: str = Field(min_length=1, max_length=200)


class WorkspaceOut(BaseModel):
    id: str
    display_name: str
    members: dict[str, Role]
    your_role: str
    redaction: RedactionMode = Field(
        description="mask: secrets and personal data in inbound text are masked before they "
        "are stored; keep: stored as sent"
    )
    agents: list[str] = Field(description="the agents a session can have in this deployment")


@router.post(
    "/workspaces",
    status_code=202,
    tags=["workspaces"],
    summary="Create a workspace",
    responses=SYSTEM_COMMAND,
)
async def create_workspace(
    body: NewWorkspace, platform: PlatformDep, principal: Caller
) -> Recorded:
    require_system(principal)
    check_workspace_id(body.id)
    ref = AggregateRef(body.id, "workspace", body.id)
    done = await handle(
        platform.store,
        WORKSPACE,
        ref,
        CreateWorkspace(body.display_name),
        context=context(principal),
    )
    return Recorded(event_ids=[], position=done.position)


@router.get(
    "/workspaces/{ws}",
    tags=["workspaces"],
    summary="A workspace and its members",
    responses=WORKSPACE_READ,
)
async def get_workspace(request: Request, access: Reader, platform: PlatformDep) -> WorkspaceOut:
    state = await identities(request).workspace(access.workspace)
    members = state.members if access.role in ("owner", "admin") else {}
    return WorkspaceOut(
        id=access.workspace,
        display_name=state.display_name,
        members=members,
        your_role=access.role,
        agents=sorted(platform.settings.agents),
        redaction=state.redaction,
    )


class MemberIn(BaseModel):
    model_config = _STRICT
    role: Role


UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]


@router.put(
    "/workspaces/{ws}/members/{user_id}",
    status_code=202,
    tags=["workspaces"],
    summary="Add a member or change their role",
    responses={**WORKSPACE_ADMIN, **problem_responses(413)},
)
async def set_member(
    user_id: UserId, body: MemberIn, request: Request, platform: PlatformDep, access: Admin
) -> Recorded:
    if not (await identities(request).user(user_id)).exists:
        raise UserNotFound(f"user {user_id} does not exist")
    if body.role == "owner" and access.role != "owner":
        raise Forbidden("only an owner may make owners")
    ref = AggregateRef(access.workspace, "workspace", access.workspace)
    done = await handle(
        platform.store,
        WORKSPACE,
        ref,
        SetMember(user_id, body.role),
        context=context(access.principal),
    )
    identities(request).forget(ref)
    return Recorded(event_ids=[], position=done.position)


@router.delete(
    "/workspaces/{ws}/members/{user_id}",
    status_code=202,
    tags=["workspaces"],
    summary="Remove a member",
    responses=WORKSPACE_ADMIN,
)
async def remove_member(
    user_id: UserId, request: Request, platform: PlatformDep, access: Admin
) -> Recorded:
    ref = AggregateRef(access.workspace, "workspace", access.workspace)
    done = await handle(
        platform.store, WORKSPACE, ref, RemoveMember(user_id), context=context(access.principal)
    )
    identities(request).forget(ref)
    return Recorded(event_ids=[], position=done.position)


class RedactionIn(BaseModel):
    model_config = _STRICT
    mode: RedactionMode = Field(
        description="mask (the default of every workspace) or keep (store inbound text as sent)"
    )


@router.put(
    "/workspaces/{ws}/redaction",
    status_code=202,
    tags=["workspaces"],
    summary="Mask secrets and personal data in inbound text, or keep it as sent",
    responses={**WORKSPACE_ADMIN, **problem_responses(413)},
)
async def set_redaction(
    body: RedactionIn, request: Request, platform: PlatformDep, access: Admin
) -> Recorded:
    ref = AggregateRef(access.workspace, "workspace", access.workspace)
    done = await handle(
        platform.store,
        WORKSPACE,
        ref,
        SetRedaction(body.mode),
        context=context(access.principal),
    )
    identities(request).forget(ref)
    return Recorded(event_ids=[], position=done.position)


# ---------------------------------------------------------------------------- API keys


class NewKeyIn(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=200)
    role: Role = "member"


class IssuedKey(BaseModel):
    key_id: str
    key: str = Field(description="the whole key: shown this once, store it now")
    workspace: str | None
    role: Role
    position: int


async def issue_key(
    platform: PlatformDep, principal: Principal, name: str, workspace: str | None, role: Role
) -> IssuedKey:
    key = new_api_key()
    ref = AggregateRef(SYSTEM_WORKSPACE, "apikey", key.key_id)
    done = await handle(
        platform.store,
        API_KEY,
        ref,
        IssueKey(name, workspace, role, key.secret_sha256, principal.actor),
        context=context(principal),
    )
    return IssuedKey(
        key_id=key.key_id, key=key.token, workspace=workspace, role=role, position=done.position
    )


@router.post(
    "/workspaces/{ws}/api-keys",
    status_code=201,
    tags=["api keys"],
    summary="Issue an API key for this workspace (shown once)",
    responses={**WORKSPACE_ADMIN, **problem_responses(413)},
)
async def issue_workspace_key(body: NewKeyIn, platform: PlatformDep, access: Admin) -> IssuedKey:
    if body.role == "owner" and access.role != "owner":
        raise Forbidden("only an owner may issue owner keys")
    return await issue_key(platform, access.principal, body.name, access.workspace, body.role)


@router.delete(
    "/workspaces/{ws}/api-keys/{key_id}",
    status_code=202,
    tags=["api keys"],
    summary="Revoke an API key (refused from its next request on)",
    responses=WORKSPACE_ADMIN,
)
async def revoke_key(
    key_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9]+$")],
    request: Request,
    platform: PlatformDep,
    access: Admin,
) -> Recorded:
    key = await identities(request).key(key_id)
    if not key.exists or key.workspace != access.workspace:
        raise ApiKeyNotFound(f"API key {key_id} not found")
    ref = AggregateRef(SYSTEM_WORKSPACE, "apikey", key_id)
    done = await handle(
        platform.store,
        API_KEY,
        ref,
        RevokeKey(access.principal.actor),
        context=context(access.principal),
    )
    identities(request).forget(ref)
    return Recorded(event_ids=[], position=done.position)


# ---------------------------------------------------------------------------- users


class NewUser(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=64, examples=["ada"])
    display_name: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=8, max_length=500)


@router.post(
    "/users",
    status_code=202,
    tags=["users"],
    summary="Create a user (system key)",
    responses=SYSTEM_COMMAND,
)
async def create_user(body: NewUser, platform: PlatformDep, principal: Caller) -> Recorded:
    require_system(principal)
    check_user_id(body.id)
    ref = AggregateRef(SYSTEM_WORKSPACE, "user", body.id)
    done = await handle(
        platform.store,
        USER,
        ref,
        CreateUser(body.display_name, hash_password(body.password)),
        context=context(principal),
    )
    return Recorded(event_ids=[], position=done.position)


@router.post(
    "/users/{user_id}/{action}",
    status_code=202,
    tags=["users"],
    summary="Disable or enable a user (system key)",
    responses=problem_responses(401, 403, 404, 409, 422, 429, 503),
)
async def set_user_enabled(
    user_id: UserId,
    action: Literal["disable", "enable"],
    request: Request,
    platform: PlatformDep,
    principal: Caller,
) -> Recorded:
    require_system(principal)
    ref = AggregateRef(SYSTEM_WORKSPACE, "user", user_id)
    command = DisableUser() if action == "disable" else EnableUser()
    done = await handle(platform.store, USER, ref, command, context=context(principal))
    identities(request).forget(ref)
    return Recorded(event_ids=[], position=done.position)


# ---------------------------------------------------------------------------- login


class Login(BaseModel):
    model_config = _STRICT
    user: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=500)


class Me(BaseModel):
    kind: Literal["apikey", "user"]
    id: str
    workspace: str | None = None
    role: str | None = None


@router.post(
    "/auth/login",
    status_code=204,
    tags=["auth"],
    summary="Log in with a password: sets the session cookie",
    responses=problem_responses(401, 413, 422, 503),
)
async def login(body: Annotated[Login, Body()], request: Request, response: Response) -> None:
    ids = identities(request)
    try:
        user = await ids.user(check_user_id(body.user))
    except DomainError:
        raise Unauthenticated("wrong user or password") from None
    if not user.exists or not password_matches(user.password_hash, body.password):
        raise Unauthenticated("wrong user or password")
    if user.disabled:
        raise Unauthenticated("this user is disabled")
    response.set_cookie(
        COOKIE,
        sign_session(ids.cookie_secret, body.user),
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )


@router.post("/auth/logout", status_code=204, tags=["auth"], summary="Drop the session cookie")
async def logout(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/")


@router.get("/me", tags=["auth"], summary="Who am I", responses=problem_responses(401, 429, 503))
async def me(principal: Annotated[Principal, Depends(caller)]) -> Me:
    return Me(
        kind=principal.kind,
        id=principal.id,
        workspace=principal.key_workspace,
        role=principal.key_role,
    )
