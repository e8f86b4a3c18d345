"""The workspace's event history for auditors: pages of CloudEvents, or a JSON Lines export.

The same filters as `agentbus replay` (docs/replay.md), as query parameters; the workspace is
the one in the path, and only its events are ever read (the subject filters start with it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import structlog
from fastapi import APIRouter, Depends, Header, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from agentbus.audit.replay import InvalidReplayFilter, Replay, ReplayFilter, export_line
from agentbus.gateway.deps import Auditor, PlatformDep
from agentbus.gateway.problems import problem_responses

NDJSON: Final = "application/x-ndjson"
PAGE_LIMIT: Final = 200
THROUGH: Final = "Agentbus-Through"
log = structlog.get_logger("agentbus.gateway")

router = APIRouter(
    prefix="/v1/workspaces/{ws}",
    tags=["events"],
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)


class EventPage(BaseModel):
    events: list[dict[str, Any]] = Field(description="CloudEvents, oldest first")
    positions: list[int] = Field(description="the stream position of each event")
    next_after: int = Field(description="pass as `after` for the next page")


_EXPORT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A page (`application/json`), or with `format=jsonl` or `Accept: "
        f"{NDJSON}` every matching event as JSON Lines: one CloudEvent per line with its "
        "stream position as the extension attribute `position`. When a JSON Lines answer ends "
        f"without reaching `limit`, it covered every matching event through the position in "
        f"`{THROUGH}`: continue with `after` set to it (after a broken connection: to the "
        "last line's `position`).",
        "content": {
            NDJSON: {
                "schema": {
                    "type": "string",
                    "description": "CloudEvents JSON, one per line, each with `position`",
                }
            }
        },
        "headers": {
            THROUGH: {
                "description": "JSON Lines only: the last position the answer covers",
                "schema": {"type": "integer"},
            }
        },
    }
}


def _field_error(field: str, message: str) -> RequestValidationError:
    """A 422 problem naming the query parameter, as FastAPI's own validation gives."""
    return RequestValidationError([{"loc": ("query", field), "msg": message, "type": "value"}])


async def replay_filter(
    platform: PlatformDep,
    access: Auditor,
    aggregate: Annotated[
        str | None, Query(max_length=64, description="only this aggregate kind (run, session...)")
    ] = None,
    id: Annotated[
        str | None, Query(max_length=64, description="only this aggregate (needs `aggregate`)")
    ] = None,
    types: Annotated[
        str | None,
        Query(max_length=2000, description="comma-separated CloudEvents types: any of them"),
    ] = None,
    from_position: Annotated[
        int | None, Query(ge=1, description="first stream position (inclusive)")
    ] = None,
    to_position: Annotated[
        int | None, Query(ge=1, description="last stream position (inclusive)")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="stored at or after this time (UTC if no zone)")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="stored before this time (UTC if no zone)")
    ] = None,
) -> ReplayFilter:
    """The filter of a history request (auditors only): always the path's workspace."""
    try:
        return ReplayFilter.create(
            registry=platform.store.registry,
            workspace=access.workspace,
            aggregate=aggregate,
            id=id,
            types=types.split(",") if types else (),
            from_position=from_position,
            to_position=to_position,
            since=since,
            until=until,
        )
    except InvalidReplayFilter as exc:
        raise _field_error(exc.field, exc.message) from None


@router.get(
    "/events",
    summary="The workspace's event history: a page, or a JSON Lines export",
    response_model=EventPage,
    responses=_EXPORT,
)
async def events(
    platform: PlatformDep,
    replay_filter: Annotated[ReplayFilter, Depends(replay_filter)],
    after: Annotated[int, Query(ge=0, description="events after this stream position")] = 0,
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            description=f"JSON: page size (default 100, at most {PAGE_LIMIT}); JSON Lines: at "
            "most this many events (default: every one)",
        ),
    ] = None,
    format: Annotated[
        Literal["json", "jsonl"] | None,
        Query(description=f"`jsonl`: JSON Lines (as `Accept: {NDJSON}`)"),
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    lines = format == "jsonl" or (format is None and NDJSON in (accept or ""))
    if not lines and limit is not None and limit > PAGE_LIMIT:
        raise _field_error("limit", f"a JSON page holds at most {PAGE_LIMIT} events")
    try:
        replay = await Replay.start(
            platform.store,
            replay_filter,
            after=after,
            limit=limit if lines else (limit or 100),
        )
    except InvalidReplayFilter as exc:
        raise _field_error(exc.field, exc.message) from None
    if lines:
        return StreamingResponse(
            _lines(replay),
            media_type=NDJSON,
            headers={THROUGH: str(max(after, replay.range.last))},
        )
    page: list[dict[str, Any]] = []
    positions: list[int] = []
    async for recorded in replay.events():
        page.append(recorded.envelope.model_dump(mode="json", exclude_none=True))
        positions.append(recorded.position)
    return EventPage(events=page, positions=positions, next_after=replay.next_after)


async def _lines(replay: Replay) -> AsyncIterator[bytes]:
    async for recorded in replay.events():
        yield export_line(recorded)
    log.info(
        "history exported",
        workspace=replay.filter.workspace,
        events=replay.delivered,
        through=replay.next_after,
    )
