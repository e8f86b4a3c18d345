"""The connections every role shares: NATS, the event store, and the Postgres engine."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit.erasure import open_sealed_store
from agentbus.db.engine import create_engine
from agentbus.errors import StoreUnavailable
from agentbus.settings import Settings
from agentbus.store.connection import connect_nats
from agentbus.store.eventstore import EventStore


@dataclass
class Platform:
    """Open connections, created once per process and passed to every role."""

    settings: Settings
    nats_url: str
    database_url: str
    nc: NATS
    store: EventStore
    engine: AsyncEngine

    @classmethod
    async def connect(cls, settings: Settings, nats_url: str, database_url: str) -> Platform:
        nc = await connect_nats(nats_url, timeout=settings.connect_timeout)
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:
            await nc.close()
            await engine.dispose()
            raise StoreUnavailable(f"cannot reach Postgres: {exc}") from exc
        try:
            # Sealing is always on: forgetting a subject must cover every event (erasure.md).
            store = await open_sealed_store(nc, settings)
        except StoreUnavailable:
            await nc.close()
            await engine.dispose()
            raise
        return cls(settings, nats_url, database_url, nc, store, engine)

    async def close(self) -> None:
        if self.store.sealer is not None:
            await self.store.sealer.close()
        await self.nc.drain() if self.nc.is_connected else await self.nc.close()
        await self.engine.dispose()
