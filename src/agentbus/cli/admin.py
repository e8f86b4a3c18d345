"""Administration straight on the event store (no HTTP needed): the bootstrap system key,
workspaces, users and API keys. Acts as `cli:<os user>`."""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import string

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from agentbus.domain.decider import DomainError
from agentbus.domain.handling import handle
from agentbus.domain.identity import (
    API_KEY,
    USER,
    CreateUser,
    DisableUser,
    EnableUser,
    IssueKey,
    RevokeKey,
    check_user_id,
)
from agentbus.domain.workspace import (
    WORKSPACE,
    CreateWorkspace,
    SetMember,
    SetRedaction,
    WorkspaceExists,
    check_workspace_id,
)
from agentbus.events.envelope import EventContext
from agentbus.events.identity import SYSTEM_WORKSPACE
from agentbus.events.subjects import AggregateRef
from agentbus.events.workspace import RedactionMode, Role
from agentbus.gateway.auth import NewKey, hash_password, new_api_key
from agentbus.runtime.secrets import BUCKET
from agentbus.store.eventstore import EventStore

BOOTSTRAP_MARKER = "bootstrap_key_id"


def actor() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return f"cli:{who}"


def _context() -> EventContext:
    return EventContext(source="agentbus/cli", actor=actor())


async def issue_key(store: EventStore, name: str, workspace: str | None, role: Role) -> NewKey:
    key = new_api_key()
    ref = AggregateRef(SYSTEM_WORKSPACE, "apikey", key.key_id)
    await handle(
        store,
        API_KEY,
        ref,
        IssueKey(name, workspace, role, key.secret_sha256, actor()),
        context=_context(),
    )
    return key


async def revoke_key(store: EventStore, key_id: str, reason: str | None) -> None:
    ref = AggregateRef(SYSTEM_WORKSPACE, "apikey", key_id)
    await handle(store, API_KEY, ref, RevokeKey(actor(), reason), context=_context())


async def bootstrap(nc: NATS, store: EventStore) -> NewKey | None:
    """Issue the first system key, once per deployment; None if that was done before."""
    js = nc.jetstream()
    try:
        kv = await js.key_value(BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=BUCKET, history=1)
    try:
        await kv.get(BOOTSTRAP_MARKER)
        return None
    except KeyNotFoundError:
        pass
    key = await issue_key(store, "bootstrap", None, "owner")
    try:
        await kv.create(BOOTSTRAP_MARKER, key.key_id.encode())
    except Exception:  # another process bootstrapped at the same moment: keep theirs
        await revoke_key(store, key.key_id, "bootstrap race")
        return None
    return key


async def create_workspace(
    store: EventStore, workspace: str, display_name: str, owner: str | None
) -> None:
    check_workspace_id(workspace)
    ref = AggregateRef(workspace, "workspace", workspace)
    await handle(store, WORKSPACE, ref, CreateWorkspace(display_name), context=_context())
    if owner is not None:
        await handle(
            store, WORKSPACE, ref, SetMember(check_user_id(owner), "owner"), context=_context()
        )


async def add_member(store: EventStore, workspace: str, user_id: str, role: Role) -> None:
    ref = AggregateRef(workspace, "workspace", workspace)
    await handle(store, WORKSPACE, ref, SetMember(check_user_id(user_id), role), context=_context())


async def set_redaction(store: EventStore, workspace: str, mode: RedactionMode) -> bool:
    """False: the workspace was in this mode already (nothing appended)."""
    ref = AggregateRef(check_workspace_id(workspace), "workspace", workspace)
    done = await handle(store, WORKSPACE, ref, SetRedaction(mode), context=_context())
    return bool(done.events)


async def create_user(store: EventStore, user_id: str, display_name: str, password: str) -> None:
    ref = AggregateRef(SYSTEM_WORKSPACE, "user", check_user_id(user_id))
    await handle(
        store, USER, ref, CreateUser(display_name, hash_password(password)), context=_context()
    )


async def set_user_enabled(store: EventStore, user_id: str, enabled: bool) -> None:
    ref = AggregateRef(SYSTEM_WORKSPACE, "user", check_user_id(user_id))
    command = EnableUser() if enabled else DisableUser()
    await handle(store, USER, ref, command, context=_context())


DEMO_WORKSPACE = "demo"
DEMO_USER = "admin"


async def create_demo(store: EventStore) -> str | None:
    """On a deployment's first start: workspace `demo` with user `admin` as its owner, so the
    web chat works at once. Returns the user's random password (to show once), or None if the
    user existed already (nothing is changed then)."""
    password = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(16))
    try:
        await create_user(store, DEMO_USER, "Administrator", password)
    except DomainError:
        return None
    ref = AggregateRef(DEMO_WORKSPACE, "workspace", DEMO_WORKSPACE)
    with contextlib.suppress(WorkspaceExists):
        await handle(store, WORKSPACE, ref, CreateWorkspace("Demo"), context=_context())
    await add_member(store, DEMO_WORKSPACE, DEMO_USER, "owner")
    return password
