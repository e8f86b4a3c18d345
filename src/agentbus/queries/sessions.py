"""Queries over the `sessions` and `messages` read models (the stable views of the live
generation), under the workspace's row-level security. Each accepts `min_position` for
read-your-writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.queries.consistency import wait_for_position
from agentbus.queries.pagination import decode_cursor, encode_cursor
from agentbus.queries.scope import workspace_scope

PROJECTION = "sessions"


@dataclass(frozen=True, slots=True)
class SessionRow:
    workspace: str
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


@dataclass(frozen=True, slots=True)
class MessageRow:
    workspace: str
    session_id: str
    position: int
    message_id: str
    direction: str
    author: str
    text: str
    created_at: datetime
    external_id: str | None
    run_id: str | None


_SESSION_COLUMNS = (
    "workspace, id, channel, title, agent, status, created_at, closed_at, last_message_at, "
    "message_count, position"
)
_MESSAGE_COLUMNS = (
    "workspace, session_id, position, message_id, direction, author, text, created_at, "
    "external_id, run_id"
)


async def _consistent(engine: AsyncEngine, min_position: int | None, timeout: float) -> None:
    if min_position:
        await wait_for_position(engine, PROJECTION, min_position, timeout=timeout)


async def get_session(
    engine: AsyncEngine,
    workspace: str,
    session_id: str,
    *,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> SessionRow | None:
    await _consistent(engine, min_position, timeout)
    async with workspace_scope(engine, workspace) as connection:
        row = (
            await connection.execute(
                text(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE workspace = :w AND id = :id"),
                {"w": workspace, "id": session_id},
            )
        ).one_or_none()
    return SessionRow(*row) if row is not None else None


async def list_sessions(
    engine: AsyncEngine,
    workspace: str,
    *,
    limit: int = 50,
    cursor: str | None = None,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> tuple[list[SessionRow], str | None]:
    """Newest first; returns the page and the cursor of the next page (None: last page)."""
    await _consistent(engine, min_position, timeout)
    where = "workspace = :w"
    params: dict[str, object] = {"w": workspace, "limit": limit + 1}
    if cursor is not None:
        created, last_id = decode_cursor("sessions", cursor)
        where += " AND (created_at, id) < (:created, :id)"
        params.update(created=created, id=last_id)
    async with workspace_scope(engine, workspace) as connection:
        rows = [
            SessionRow(*row)
            for row in await connection.execute(
                text(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {where} "
                    "ORDER BY created_at DESC, id DESC LIMIT :limit"
                ),
                params,
            )
        ]
    more = len(rows) > limit
    rows = rows[:limit]
    following = encode_cursor("sessions", rows[-1].created_at, rows[-1].id) if more else None
    return rows, following


async def list_messages(
    engine: AsyncEngine,
    workspace: str,
    session_id: str,
    *,
    after_position: int = 0,
    limit: int = 100,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> list[MessageRow]:
    """Oldest first, from `after_position` (exclusive)."""
    await _consistent(engine, min_position, timeout)
    async with workspace_scope(engine, workspace) as connection:
        rows = await connection.execute(
            text(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE workspace = :w "
                "AND session_id = :s AND position > :after ORDER BY position LIMIT :limit"
            ),
            {"w": workspace, "s": session_id, "after": after_position, "limit": limit},
        )
        return [MessageRow(*row) for row in rows]
