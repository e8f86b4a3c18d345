"""Queries over the `runs` and `run_steps` read models, under row-level security."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.queries.consistency import wait_for_position
from agentbus.queries.pagination import decode_cursor, encode_cursor
from agentbus.queries.scope import workspace_scope

PROJECTION = "runs"


@dataclass(frozen=True, slots=True)
class RunRow:
    workspace: str
    id: str
    session_id: str | None
    agent: str
    executor: str
    status: str
    attempts: int
    max_attempts: int
    queued_at: datetime
    deadline_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_at: datetime | None
    error_class: str | None
    error_message: str | None
    output: str | None
    model: str | None
    tokens_in: int
    tokens_out: int
    position: int


_COLUMNS = ", ".join(RunRow.__dataclass_fields__)


async def get_run(
    engine: AsyncEngine,
    workspace: str,
    run_id: str,
    *,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> RunRow | None:
    if min_position:
        await wait_for_position(engine, PROJECTION, min_position, timeout=timeout)
    async with workspace_scope(engine, workspace) as connection:
        row = (
            await connection.execute(
                text(f"SELECT {_COLUMNS} FROM runs WHERE workspace = :w AND id = :id"),
                {"w": workspace, "id": run_id},
            )
        ).one_or_none()
    return RunRow(*row) if row is not None else None


async def list_runs(
    engine: AsyncEngine,
    workspace: str,
    *,
    session_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> tuple[list[RunRow], str | None]:
    """Newest first."""
    if min_position:
        await wait_for_position(engine, PROJECTION, min_position, timeout=timeout)
    where = "workspace = :w"
    params: dict[str, Any] = {"w": workspace, "limit": limit + 1}
    if session_id is not None:
        where += " AND session_id = :s"
        params["s"] = session_id
    if cursor is not None:
        queued, last_id = decode_cursor("runs", cursor)
        where += " AND (queued_at, id) < (:queued, :id)"
        params.update(queued=queued, id=last_id)
    async with workspace_scope(engine, workspace) as connection:
        rows = [
            RunRow(*row)
            for row in await connection.execute(
                text(
                    f"SELECT {_COLUMNS} FROM runs WHERE {where} "
                    "ORDER BY queued_at DESC, id DESC LIMIT :limit"
                ),
                params,
            )
        ]
    more = len(rows) > limit
    rows = rows[:limit]
    following = encode_cursor("runs", rows[-1].queued_at, rows[-1].id) if more else None
    return rows, following
