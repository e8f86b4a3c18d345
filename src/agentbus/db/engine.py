"""The async SQLAlchemy engine (asyncpg) for a `postgresql://` URL."""

from __future__ import annotations

import os

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def async_url(url: str) -> str:
    """`postgresql://...` (as printed by `agentbus up` or given by a user) for asyncpg.

    Unix-socket URLs (`?host=/path`) are kept as they are; asyncpg understands them."""
    parsed = make_url(url)
    if parsed.drivername not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"database URL must start with postgresql://, got {parsed.drivername}://")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine whose connections show as `agentbus:<pid>` in pg_stat_activity."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={"server_settings": {"application_name": f"agentbus:{os.getpid()}"}},
    )


async def driver_connection(connection: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one, for `executemany` on hot paths."""
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return driver
