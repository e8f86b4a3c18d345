"""Applying the Alembic migrations in migrations/ (`agentbus db upgrade`, and `agentbus up`)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from agentbus.db.engine import create_engine
from agentbus.resources import resource


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resource("migrations")))
    return config


async def upgrade(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the database at `url` to `revision`. Returns (revision before, after)."""
    config = alembic_config()
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            before = await connection.run_sync(_current)
            await connection.run_sync(_upgrade, config, revision)
            after = await connection.run_sync(_current)
    finally:
        await engine.dispose()
    return before, after


async def pending(url: str) -> list[str]:
    """Revisions not yet applied to the database at `url` (empty: up to date)."""
    script = ScriptDirectory.from_config(alembic_config())
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            current = await connection.run_sync(_current)
    finally:
        await engine.dispose()
    return [
        rev.revision for rev in script.iterate_revisions("head", current) if rev.revision != current
    ]


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
