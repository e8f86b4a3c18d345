"""Sessions, their messages, and runs (the event history: `history.py`).

Commands answer 202 with the event ids and stream position once JetStream has acknowledged
them (durable). Queries read the projections and accept `min_position`: they wait (bounded)
until the read model has applied that position (read-your-writes)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agentbus.audit.redaction import Redactor
from agentbus.domain.budget import ensure_can_start
from agentbus.domain.handling import handle
from agentbus.domain.run import RUN, Cancel, QueueRun, RunNotFound
from agentbus.domain.session import (
    SESSION,
    CloseSession,
    OpenSession,
    ReceiveMessage,
    SessionNotFound,
)
from agentbus.events.envelope import uuid5, uuid7
from agentbus.events.session import MAX_TEXT, Channel, ConcurrencyPolicy
from agentbus.events.subjects import AggregateRef
from agentbus.gateway.auth import Identities, NotVisible
from agentbus.gateway.deps import (
    Access,
    Id,
    MinPosition,
    PlatformDep,
    Reader,
    SessionPostsDep,
    Writer,
    identities,
    platform,
)
from agentbus.gateway.inbound import inbound_text, masked_text
from agentbus.gateway.posting import SessionPosts
from agentbus.gateway.problems import problem_responses
from agentbus.gateway.routes.admin import context
from agentbus.queries.runs import RunRow, get_run, list_runs
from agentbus.queries.sessions import (
    MessageRow,
    SessionRow,
    get_session,
    list_messages,
    list_sessions,
)
from agentbus.workers.autoreply import run_id_for

# Every route here authenticates, resolves the workspace and may meet an unanswering store.
router = APIRouter(
    prefix="/v1/workspaces/{ws}", responses=problem_responses(401, 404, 422, 429, 503)
)
COMMAND = problem_responses(403, 409, 413)

_STRICT = ConfigDict(extra="forbid")
Limit = Annotated[int, Query(ge=1, le=200, description="page size (at most 200)")]
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1d2a8e-3c59-4a3e-9d7b-1b2c3d4e5f60")


class Accepted(BaseModel):
    id: str = Field(description="the resource the command acted on")
    event_ids: list[str]
    position: int = Field(description="stream position of the command's last event")


# ---------------------------------------------------------------------------- sessions


class NewSession(BaseModel):
    model_config = _STRICT
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="default: a new UUIDv7",
    )
    channel: Channel = "api"
    title: str | None = Field(default=None, max_length=200)
    agent: str | None = Field(default=None, max_length=64, description="agent that answers")
    concurrency: ConcurrencyPolicy = "enqueue"


class SessionOut(BaseModel):
    id: str
    channel: str
    title: str | None
    agent: str | None
    status: str
    created_at: datetime
    closed_at: datetime | None
    last_message_at: datetime | None
    message_count: int
    position: int

    @classmethod
    def of(cls, row: SessionRow) -> SessionOut:
        return cls.model_validate(row, from_attributes=True)


class SessionPage(BaseModel):
    sessions: list[SessionOut]
    next_cursor: str | None


@router.post(
    "/sessions", status_code=202, tags=["sessions"], summary="Open a session", responses=COMMAND
)
async def open_session(
    body: NewSession, request: Request, platform: PlatformDep, access: Writer
) -> Accepted:
    if body.agent is not None and body.agent not in platform.settings.agents:
        raise NotVisible(f"agent {body.agent!r} is not configured")
    session_id = body.id or uuid7()
    ref = AggregateRef(access.workspace, "session", session_id)
    title = body.title and await inbound_text(request, access.workspace, body.title, max_length=200)
    command = OpenSession(body.channel, title, body.agent, body.concurrency)
    done = await handle(platform.store, SESSION, ref, command, context=context(access.principal))
    return Accepted(id=session_id, event_ids=[], position=done.position)


@router.get(
    "/sessions",
    tags=["sessions"],
    summary="Sessions, newest first",
    responses=problem_responses(400, 504),
)
async def sessions(
    platform: PlatformDep,
    access: Reader,
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    min_position: MinPosition = None,
) -> SessionPage:
    rows, following = await list_sessions(
        platform.engine, access.workspace, limit=limit, cursor=cursor, min_position=min_position
    )
    return SessionPage(sessions=[SessionOut.of(r) for r in rows], next_cursor=following)


@router.get(
    "/sessions/{sid}",
    tags=["sessions"],
    summary="One session",
    responses=problem_responses(504),
)
async def session(
    sid: Id, platform: PlatformDep, access: Reader, min_position: MinPosition = None
) -> SessionOut:
    row = await get_session(platform.engine, access.workspace, sid, min_position=min_position)
    if row is None:
        raise SessionNotFound(f"session {sid} not found")
    return SessionOut.of(row)


@router.post(
    "/sessions/{sid}/close",
    status_code=202,
    tags=["sessions"],
    summary="Close",
    responses=problem_responses(403, 409),
)
async def close_session(sid: Id, platform: PlatformDep, access: Writer) -> Accepted:
    ref = AggregateRef(access.workspace, "session", sid)
    done = await handle(
        platform.store, SESSION, ref, CloseSession(), context=context(access.principal)
    )
    return Accepted(id=sid, event_ids=[], position=done.position)


# ---------------------------------------------------------------------------- messages


class NewMessage(BaseModel):
    model_config = _STRICT
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    author: str | None = Field(
        default=None, min_length=1, max_length=200, description="default: the caller"
    )
    external_id: str | None = Field(default=None, max_length=200)


class PostedMessage(BaseModel):
    id: str = Field(description="the message id")
    event_ids: list[str]
    position: int
    run_id: str | None = Field(description="the run that will answer (session with an agent)")
    duplicate: bool = Field(description="true: this Idempotency-Key was seen before")


class MessageOut(BaseModel):
    position: int
    message_id: str
    direction: Literal["in", "out"]
    author: str
    text: str
    created_at: datetime
    external_id: str | None
    run_id: str | None

    @classmethod
    def of(cls, row: MessageRow) -> MessageOut:
        return cls.model_validate(row, from_attributes=True)


@router.post(
    "/sessions/{sid}/messages",
    status_code=202,
    tags=["messages"],
    summary="Post a message into a session",
    responses=COMMAND,
)
async def post_message(
    sid: Id,
    body: NewMessage,
    request: Request,
    posts: SessionPostsDep,
    access: Writer,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="retry-safe: the same key in this session posts once, forever",
        ),
    ] = None,
) -> PostedMessage:
    answer = await post_message_as(
        identities(request),
        platform(request).settings.redactor,
        posts,
        access,
        sid,
        body,
        idempotency_key,
        request.url.path,
    )
    return PostedMessage(**answer)


async def post_message_as(
    ids: Identities,
    redactor: Redactor,
    posts: SessionPosts,
    access: Access,
    sid: str,
    body: NewMessage,
    idempotency_key: str | None,
    path: str,
) -> dict[str, Any]:
    """What posting a message does once the request is read and the caller may write: the
    route above, and the gateway's fast path for it (`gateway/ingest.py`), both end here. The
    answer is `PostedMessage`'s fields (the fast path writes them without building the model;
    `path` is only logged, when the text is masked)."""
    workspace = access.workspace
    ref = posts.ref(workspace, sid)
    event_id = (
        uuid5(IDEMPOTENCY_NAMESPACE, f"{workspace}/{sid}/{idempotency_key}")
        if idempotency_key
        else uuid7()
    )
    text = await masked_text(ids, redactor, workspace, body.text, max_length=MAX_TEXT, path=path)
    author = body.author and await masked_text(
        ids, redactor, workspace, body.author, max_length=200, path=path
    )
    command = ReceiveMessage(uuid7(), author or access.principal.id, text, body.external_id)
    posted = await posts.post(ref, command, event_id, context(access.principal))
    return {
        "id": posted.message_id,
        "event_ids": [event_id],
        "position": posted.position,
        "run_id": run_id_for(event_id) if posted.state.agent else None,
        "duplicate": posted.duplicate,
    }


@router.get(
    "/sessions/{sid}/messages",
    tags=["messages"],
    summary="Messages, oldest first",
    responses=problem_responses(504),
)
async def messages(
    sid: Id,
    platform: PlatformDep,
    access: Reader,
    after: Annotated[int, Query(ge=0, description="only messages after this position")] = 0,
    limit: Limit = 100,
    min_position: MinPosition = None,
) -> list[MessageOut]:
    rows = await list_messages(
        platform.engine,
        access.workspace,
        sid,
        after_position=after,
        limit=limit,
        min_position=min_position,
    )
    if not rows and await get_session(platform.engine, access.workspace, sid) is None:
        raise SessionNotFound(f"session {sid} not found")
    return [MessageOut.of(r) for r in rows]


# ---------------------------------------------------------------------------- runs


class NewRun(BaseModel):
    model_config = _STRICT
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="default: new; the same id twice is one run",
    )
    agent: str = Field(min_length=1, max_length=64)
    input: str = Field(min_length=1, max_length=MAX_TEXT)
    session_id: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class RunOut(BaseModel):
    id: str
    session_id: str | None
    agent: str
    status: str
    attempts: int
    max_attempts: int
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error_class: str | None
    error_message: str | None
    output: str | None
    model: str | None
    tokens_in: int
    tokens_out: int
    position: int

    @classmethod
    def of(cls, row: RunRow) -> RunOut:
        return cls.model_validate(row, from_attributes=True)


class RunPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


@router.post(
    "/runs",
    status_code=202,
    tags=["runs"],
    summary="Queue a run of an agent",
    responses=problem_responses(402, 403, 409, 413),
)
async def create_run(
    body: NewRun, request: Request, platform: PlatformDep, access: Writer
) -> Accepted:
    config = platform.settings.agents.get(body.agent)
    if config is None:
        raise NotVisible(f"agent {body.agent!r} is not configured")
    await ensure_can_start(platform.store, access.workspace, body.agent, config.max_tokens)
    run_id = body.id or "r" + uuid7().replace("-", "")
    ref = AggregateRef(access.workspace, "run", run_id)
    command = QueueRun(
        body.agent,
        config.executor,
        await inbound_text(request, access.workspace, body.input, max_length=MAX_TEXT),
        session_id=body.session_id,
        max_attempts=config.max_attempts,
        deadline_at=datetime.now(UTC) + timedelta(seconds=config.timeout),
    )
    done = await handle(platform.store, RUN, ref, command, context=context(access.principal))
    return Accepted(id=run_id, event_ids=[], position=done.position)


@router.get(
    "/runs", tags=["runs"], summary="Runs, newest first", responses=problem_responses(400, 504)
)
async def runs(
    platform: PlatformDep,
    access: Reader,
    session_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    min_position: MinPosition = None,
) -> RunPage:
    rows, following = await list_runs(
        platform.engine,
        access.workspace,
        session_id=session_id,
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return RunPage(runs=[RunOut.of(r) for r in rows], next_cursor=following)


@router.get("/runs/{rid}", tags=["runs"], summary="One run", responses=problem_responses(504))
async def run(
    rid: Id, platform: PlatformDep, access: Reader, min_position: MinPosition = None
) -> RunOut:
    row = await get_run(platform.engine, access.workspace, rid, min_position=min_position)
    if row is None:
        raise RunNotFound(f"run {rid} not found")
    return RunOut.of(row)


class CancelIn(BaseModel):
    model_config = _STRICT
    reason: str | None = Field(default=None, max_length=2000)


@router.post(
    "/runs/{rid}/cancel",
    status_code=202,
    tags=["runs"],
    summary="Cancel a run",
    responses=COMMAND,
)
async def cancel_run(
    rid: Id, platform: PlatformDep, access: Writer, body: CancelIn | None = None
) -> Accepted:
    ref = AggregateRef(access.workspace, "run", rid)
    command = Cancel(access.principal.actor, body.reason if body else None)
    done = await handle(platform.store, RUN, ref, command, context=context(access.principal))
    return Accepted(id=rid, event_ids=[], position=done.position)
