"""Migrations apply to a real, empty Postgres and are idempotent."""

from __future__ import annotations

import asyncpg

from agentbus.db.migrations import pending, upgrade


async def test_upgrade_creates_the_runtime_tables_and_is_idempotent(database_url: str) -> None:
    assert await pending(database_url) != []
    before, after = await upgrade(database_url)
    assert before is None
    assert after is not None
    assert await pending(database_url) == []

    again = await upgrade(database_url)
    assert again == (after, after)

    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            row["tablename"]
            for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {"projection_generations", "dead_letters", "alembic_version"} <= tables
