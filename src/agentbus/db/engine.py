"""The async SQLAlchemy engine (asyncpg) for a `postgresql://` URL."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_url(url: str) -> str:
    """`postgresql://...` (as printed by `agentbus up` or given by a user) for asyncpg.

    Unix-socket URLs (`?host=/path`) are kept as they are; asyncpg understands them."""
    parsed = make_url(url)
    if parsed.drivername not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"database URL must start with postgresql://, got {parsed.drivername}://")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(async_url(url), pool_size=pool_size, pool_pre_ping=True)
