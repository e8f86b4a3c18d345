"""Queries over the `approvals` read model, under row-level security."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.queries.consistency import wait_for_position
from agentbus.queries.pagination import decode_cursor, encode_cursor
from agentbus.queries.scope import workspace_scope

PROJECTION = "approvals"


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    workspace: str
    id: str
    run_id: str
    attempt: int
    session_id: str | None
    tool: str
    arguments_digest: str
    arguments_preview: str
    reason: str | None
    requested_by: str
    status: str
    requested_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    rule: str | None
    position: int


_COLUMNS = ", ".join(ApprovalRow.__dataclass_fields__)


async def get_approval(
    engine: AsyncEngine,
    workspace: str,
    approval_id: str,
    *,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> ApprovalRow | None:
    if min_position:
        await wait_for_position(engine, PROJECTION, min_position, timeout=timeout)
    async with workspace_scope(engine, workspace) as connection:
        row = (
            await connection.execute(
                text(f"SELECT {_COLUMNS} FROM approvals WHERE workspace = :w AND id = :id"),
                {"w": workspace, "id": approval_id},
            )
        ).one_or_none()
    return ApprovalRow(*row) if row is not None else None


async def list_approvals(
    engine: AsyncEngine,
    workspace: str,
    *,
    status: Literal["pending", "decided"] | None = None,
    run_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    min_position: int | None = None,
    timeout: float = 5.0,
) -> tuple[list[ApprovalRow], str | None]:
    """Newest first. `decided`: granted, denied or expired."""
    if min_position:
        await wait_for_position(engine, PROJECTION, min_position, timeout=timeout)
    where = "workspace = :w"
    params: dict[str, Any] = {"w": workspace, "limit": limit + 1}
    if status == "pending":
        where += " AND status = 'pending'"
    elif status == "decided":
        where += " AND status <> 'pending'"
    if run_id is not None:
        where += " AND run_id = :run"
        params["run"] = run_id
    if cursor is not None:
        requested, last_id = decode_cursor("approvals", cursor)
        where += " AND (requested_at, id) < (:requested, :id)"
        params.update(requested=requested, id=last_id)
    async with workspace_scope(engine, workspace) as connection:
        rows = [
            ApprovalRow(*row)
            for row in await connection.execute(
                text(
                    f"SELECT {_COLUMNS} FROM approvals WHERE {where} "
                    "ORDER BY requested_at DESC, id DESC LIMIT :limit"
                ),
                params,
            )
        ]
    more = len(rows) > limit
    rows = rows[:limit]
    following = encode_cursor("approvals", rows[-1].requested_at, rows[-1].id) if more else None
    return rows, following
