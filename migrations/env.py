"""Alembic environment. `agentbus db upgrade` hands over an open connection; a plain `alembic`
command (run from the repository root) connects to AGENTBUS_DATABASE_URL itself."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from agentbus.db.engine import create_engine
from agentbus.settings import Settings


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone() -> None:
    url = Settings().database_url
    if url is None:
        raise SystemExit("set AGENTBUS_DATABASE_URL (or use `agentbus db upgrade`)")
    engine = create_engine(url, pool_size=1)
    async with engine.begin() as connection:
        await connection.run_sync(run)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    asyncio.run(run_standalone())
