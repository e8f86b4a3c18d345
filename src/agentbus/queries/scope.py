"""The one way the read side touches Postgres: a transaction as the reader role, scoped to one
workspace. Row-level security on every read-model table then shows only that workspace's rows,
whatever the SQL says (a missing `WHERE workspace = ...` leaks nothing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agentbus.projections.generations import READER_ROLE


@asynccontextmanager
async def workspace_scope(engine: AsyncEngine, workspace: str) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as connection, connection.begin():
        # Both settings are transaction-local (is_local=true): they end with this transaction.
        await connection.execute(
            text(
                "SELECT set_config('role', :role, true), "
                "set_config('agentbus.workspace', :ws, true)"
            ),
            {"role": READER_ROLE, "ws": workspace},
        )
        yield connection
