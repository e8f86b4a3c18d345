"""Server-sent event streams: a session, a run, the whole workspace. See docs/sse.md.

Every event is `id:` an opaque cursor, `event:` the CloudEvents type, `data:` the CloudEvent
JSON. `Last-Event-ID` (sent by a browser's `EventSource` when it reconnects), or the
`last_event_id` query parameter on a first connection, continues after that event with no gap
and no duplicate, on any replica. The header wins over the query parameter: an `EventSource`
keeps the URL of its first connection and sends the newer cursor as the header."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Header, Query, Request

from agentbus.gateway.cursors import MAX_LENGTH
from agentbus.gateway.deps import Auditor, Id, PlatformDep, Reader
from agentbus.gateway.problems import problem_responses
from agentbus.gateway.sse import (
    Bridge,
    EventStreamResponse,
    run_feed,
    session_feed,
    workspace_feed,
)
from agentbus.runtime.platform import Platform


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The process's SSE bridge (the cursor secret, stream states, hubs) lives as long as the
    app: made at start-up, its hubs stopped at shutdown."""
    platform: Platform = app.state.platform
    bridge = await Bridge.start(platform.nc, platform.store, platform.settings)
    app.state.sse_bridge = bridge
    try:
        yield
    finally:
        await bridge.close()


router = APIRouter(
    prefix="/v1/workspaces/{ws}",
    tags=["streams"],
    responses=problem_responses(400, 401, 404, 422, 429, 503),
    lifespan=lifespan,
)

LastEventIdHeader = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=MAX_LENGTH,
        description="the `id` of the last event received: continue after it",
    ),
]
LastEventIdQuery = Annotated[
    str | None,
    Query(
        max_length=MAX_LENGTH,
        description="the same as `Last-Event-ID`, for a first connection (a browser cannot set "
        "headers on an `EventSource`); the header wins when both are given",
    ),
]
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
_EVENT = {
    "type": "object",
    "description": "one server-sent event",
    "properties": {
        "id": {"type": "string", "description": "the cursor after this event (opaque)"},
        "event": {"type": "string", "description": "the CloudEvents type, or `reset`"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "the CloudEvent (structured JSON); for `reset`: `reason`, "
            "`stream`, `detail`",
        },
        "retry": {"type": "integer", "description": "milliseconds before reconnecting"},
    },
}
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`text/event-stream`: `retry:` first, then events (`id:` cursor, "
        "`event:` CloudEvents type, `data:` CloudEvent JSON), `: ping` comments while idle, "
        "and `event: reset` (then the end) when the cursor can no longer be resumed",
        "content": {"text/event-stream": {"schema": _EVENT}},
    }
}


def bridge(request: Request) -> Bridge:
    value: Bridge = request.app.state.sse_bridge
    return value


@router.get(
    "/sessions/{sid}/events",
    summary="Follow a session's events (SSE)",
    response_class=EventStreamResponse,
    status_code=200,
    responses=_STREAM,
)
async def session_events(
    sid: Id,
    request: Request,
    access: Reader,
    include: Annotated[
        Literal["runs"] | None,
        Query(
            description="`runs`: also each run the session assigns, its transitions and live "
            "output (`agentbus.run.delta.v1`, `agentbus.run.progress.v1`), all before the "
            "session's `run_released`: what a chat page needs, on one connection"
        ),
    ] = None,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventStreamResponse:
    feed = session_feed(access.workspace, sid, runs=include == "runs")
    return await bridge(request).open(feed, last_event_id_header or last_event_id)


@router.get(
    "/runs/{rid}/stream",
    summary="Follow a run: its transitions and live output from its start (SSE)",
    response_class=EventStreamResponse,
    status_code=200,
    responses=_STREAM,
)
async def run_stream(
    rid: Id,
    request: Request,
    access: Reader,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventStreamResponse:
    feed = run_feed(access.workspace, rid)
    return await bridge(request).open(feed, last_event_id_header or last_event_id)


@router.get(
    "/events/stream",
    summary="Follow the workspace's whole flow of events (SSE; auditors, admins, owners)",
    response_class=EventStreamResponse,
    status_code=200,
    responses={**_STREAM, **problem_responses(403)},
)
async def workspace_events(
    request: Request,
    platform: PlatformDep,
    access: Auditor,
    types: Annotated[
        str | None,
        Query(max_length=2000, description="comma-separated CloudEvents types (default: all)"),
    ] = None,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventStreamResponse:
    wanted = frozenset(t.strip() for t in types.split(",") if t.strip()) if types else None
    feed = workspace_feed(access.workspace, wanted, platform.store.registry)
    return await bridge(request).open(feed, last_event_id_header or last_event_id)
