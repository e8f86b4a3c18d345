"""Who is calling, and may they do this here?

- **API keys**: `Authorization: Bearer ab_<key id>_<secret>`. The key id names the `apikey`
  aggregate; only the SHA-256 of the secret is stored (in `ApiKeyIssued`). A key belongs to one
  workspace with a role, or (no workspace) is a system key that administers every workspace.
- **Users** log in with a password (argon2) and get a session cookie `agentbus_session`, signed
  with HMAC-SHA256 under a secret shared by all replicas (JetStream KV) and valid 7 days;
  HttpOnly, SameSite=Lax, Secure under HTTPS. Their role in a workspace is their membership.

Identity aggregates are cached per process and dropped from the cache the moment any event on
them arrives (a core NATS subscription on `evt._system.>` and `evt.*.workspace.>`), so a revoked
key or a disabled user is refused on its next request, on every replica.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import argon2
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agentbus.domain.decider import Decider
from agentbus.domain.handling import load
from agentbus.domain.identity import API_KEY, USER, ApiKeyState, UserState
from agentbus.domain.workspace import WORKSPACE, WorkspaceState
from agentbus.errors import AgentbusError
from agentbus.events.identity import SYSTEM_WORKSPACE
from agentbus.events.subjects import AggregateRef
from agentbus.events.workspace import RedactionMode, Role
from agentbus.store.eventstore import EventStore
from agentbus.values import value

KEY_PREFIX = "ab"
COOKIE = "agentbus_session"
COOKIE_MAX_AGE = 7 * 24 * 3600

Permission = Literal["read", "write", "admin", "audit"]
ALLOWED: dict[Permission, frozenset[Role]] = {
    "read": frozenset({"owner", "admin", "member", "viewer", "auditor"}),
    "write": frozenset({"owner", "admin", "member"}),
    "admin": frozenset({"owner", "admin"}),
    "audit": frozenset({"owner", "admin", "auditor"}),
}

_hasher = argon2.PasswordHasher()


class Unauthenticated(AgentbusError):
    """No credentials, or credentials that are not valid (401)."""


class Forbidden(AgentbusError):
    """Authenticated, but the role does not allow this (403)."""


class NotVisible(AgentbusError):
    """The workspace (or what is in it) does not exist for this caller (404: never tells
    whether it exists for someone else)."""


# ---------------------------------------------------------------------------- secrets (pure)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerifyMismatchError, argon2.exceptions.InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    secret_sha256: str
    token: str
    """The whole key, shown once to whoever issued it."""


def new_api_key() -> NewKey:
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower().rstrip("=")
    secret = secrets.token_urlsafe(32)
    return NewKey(
        key_id, hashlib.sha256(secret.encode()).hexdigest(), f"{KEY_PREFIX}_{key_id}_{secret}"
    )


def parse_api_key(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1].isalnum() or not parts[2]:
        return None
    return parts[1], parts[2]


def sign_session(secret: bytes, user_id: str, now: float | None = None) -> str:
    expires = int((now if now is not None else time.time()) + COOKIE_MAX_AGE)
    body = f"{user_id}.{expires}"
    mac = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def verify_session(secret: bytes, value: str, now: float | None = None) -> str | None:
    """The user id of a valid, unexpired cookie value, else None."""
    try:
        user_id, expires, mac = value.rsplit(".", 2)
        deadline = int(expires)
    except ValueError:
        return None
    expected = hmac.new(secret, f"{user_id}.{expires}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        return None
    if deadline < (now if now is not None else time.time()):
        return None
    return user_id


# ---------------------------------------------------------------------------- principals


@value
class Principal:
    kind: Literal["apikey", "user"]
    id: str
    key_workspace: str | None = None
    key_role: Role | None = None

    @property
    def system(self) -> bool:
        """A system API key: administers every workspace."""
        return self.kind == "apikey" and self.key_workspace is None

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.id}"


class Identities:
    """Resolves credentials to principals and roles, with an invalidated-on-change cache."""

    def __init__(self, store: EventStore, nc: NATS, cookie_secret: bytes) -> None:
        self._store = store
        self._nc = nc
        self.cookie_secret = cookie_secret
        self._cache: dict[str, tuple[Any, int]] = {}
        self._changes = 0
        """Invalidations so far: a load overtaken by one is used but not cached."""
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        for subject in (f"evt.{SYSTEM_WORKSPACE}.>", "evt.*.workspace.>"):
            self._subscriptions.append(await self._nc.subscribe(subject, cb=self._changed))

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _changed(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 5:
            self._changes += 1
            self._cache.pop(".".join(parts[1:4]), None)

    def forget(self, ref: AggregateRef) -> None:
        self._changes += 1
        self._cache.pop(f"{ref.workspace}.{ref.kind}.{ref.id}", None)

    def _cached(self, workspace: str, kind: str, id_: str) -> Any | None:
        """The cached state of an aggregate, None when not cached: what every request but the
        first finds, without a coroutine (the hot path calls this before `_state`)."""
        # Looked up by its subject tokens: no `AggregateRef` is built and validated.
        cached = self._cache.get(f"{workspace}.{kind}.{id_}")
        return None if cached is None else cached[0]

    async def _state(self, decider: Decider[Any, Any], workspace: str, kind: str, id_: str) -> Any:
        state = self._cached(workspace, kind, id_)
        if state is not None:
            return state
        key = f"{workspace}.{kind}.{id_}"
        changes = self._changes
        state, position = await load(self._store, decider, AggregateRef(workspace, kind, id_))
        if changes == self._changes:  # else it may predate an event that arrived meanwhile
            self._cache[key] = (state, position)
        return state

    async def user(self, user_id: str) -> UserState:
        state: UserState = await self._state(USER, SYSTEM_WORKSPACE, "user", user_id)
        return state

    async def key(self, key_id: str) -> ApiKeyState:
        state: ApiKeyState = await self._state(API_KEY, SYSTEM_WORKSPACE, "apikey", key_id)
        return state

    async def workspace(self, workspace: str) -> WorkspaceState:
        state: WorkspaceState = await self._state(WORKSPACE, workspace, "workspace", workspace)
        return state

    async def redaction(self, workspace: str) -> RedactionMode:
        """How the workspace treats secrets and personal data in inbound text (cached like
        its members: no stream read per message)."""
        state: WorkspaceState | None = self._cached(workspace, "workspace", workspace)
        return (state or await self.workspace(workspace)).redaction

    async def authenticate(self, authorization: str | None, cookie: str | None) -> Principal:
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("use 'Authorization: Bearer <API key>'")
            parsed = parse_api_key(token.strip())
            if parsed is None:
                raise Unauthenticated("malformed API key")
            key_id, secret = parsed
            key: ApiKeyState | None = self._cached(SYSTEM_WORKSPACE, "apikey", key_id)
            if key is None:
                key = await self.key(key_id)
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if not key.exists or not hmac.compare_digest(digest, key.secret_sha256):
                raise Unauthenticated("unknown API key")
            if key.revoked:
                raise Unauthenticated("this API key was revoked")
            return Principal("apikey", key_id, key.workspace, key.role)
        if cookie:
            user_id = verify_session(self.cookie_secret, cookie)
            if user_id is None:
                raise Unauthenticated("session expired or invalid: log in again")
            user = await self.user(user_id)
            if not user.exists:
                raise Unauthenticated("unknown user")
            if user.disabled:
                raise Unauthenticated("this user is disabled")
            return Principal("user", user_id)
        raise Unauthenticated("authentication required: an API key or a login session")

    async def role_in(self, principal: Principal, workspace: str) -> Role | None:
        if principal.kind == "apikey":
            if principal.system:
                return "owner"
            return principal.key_role if principal.key_workspace == workspace else None
        state = await self.workspace(workspace)
        return state.members.get(principal.id) if state.exists else None

    async def authorize(self, principal: Principal, workspace: str, need: Permission) -> Role:
        """The caller's role in `workspace` if it allows `need`; `NotVisible` when the caller
        has no access to the workspace at all, `Forbidden` when the role is too weak."""
        role = await self.role_in(principal, workspace)
        if role is None:
            raise NotVisible(f"workspace {workspace} not found")
        if principal.system and not (await self.workspace(workspace)).exists:
            raise NotVisible(f"workspace {workspace} not found")
        if role not in ALLOWED[need]:
            raise Forbidden(f"role {role} may not {need} in workspace {workspace}")
        return role
