"""The servers a benchmark run uses: a real nats-server (embedded, or one given by URL) with the
project's streams applied, a fresh workspace, and Postgres on first demand.

Embedded servers live in a temporary directory removed at the end of the run. An external
NATS server is written to: the EVENTS stream denies purge and delete, so whatever a run appends
stays there (under its own workspace `bench<hex>`). Point `--nats-url` at a disposable server.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS

from agentbus.events.catalog import default_registry
from agentbus.resources import resource
from agentbus.runtime.embedded import EmbeddedNats, EmbeddedPostgres
from agentbus.store import EventStore
from agentbus.store.connection import connect_nats
from agentbus.store.streams import apply_streams, load_stream_specs


def fresh_workspace() -> str:
    return f"bench{secrets.token_hex(4)}"


@dataclass
class Env:
    """What a scenario runs against. Each scenario gets its own `workspace` (fresh per
    scenario and run), so scenarios and runs against a shared server never collide."""

    nats_url: str
    nc: NATS
    """A connection opened the way agentbus opens its own (`connect_nats`)."""
    workspace: str
    directory: Path
    """A scratch directory for this run (removed at the end)."""
    postgres_given: str | None = None
    _postgres: EmbeddedPostgres | None = field(default=None, repr=False)
    _connections: list[NATS] = field(default_factory=list, repr=False)

    def event_store(self, nc: NATS | None = None) -> EventStore:
        """An `EventStore` with the default registry, on `nc` (default: the shared connection)."""
        return EventStore(nc or self.nc, default_registry())

    async def connect(self, name: str = "agentbus-bench") -> NATS:
        """Another NATS connection (closed at the end of the run)."""
        nc = await connect_nats(self.nats_url, name=name)
        self._connections.append(nc)
        return nc

    async def postgres_url(self) -> str:
        """A Postgres URL: the one given with `--postgres-url`, else an embedded Postgres
        started on first call (about a second) and stopped at the end of the run. Scenarios
        that need no database never start one."""
        if self.postgres_given is not None:
            return self.postgres_given
        if self._postgres is None:
            server = EmbeddedPostgres(self.directory / "postgres")
            await asyncio.to_thread(server.start)
            self._postgres = server
        return self._postgres.url

    async def close(self) -> None:
        for nc in [*self._connections, self.nc]:
            await nc.close()
        if self._postgres is not None:
            await asyncio.to_thread(self._postgres.stop)


@asynccontextmanager
async def open_env(
    nats_url: str | None = None, postgres_url: str | None = None
) -> AsyncIterator[Env]:
    """Start (or connect to) the servers, apply `streams/`, yield the `Env`, clean up."""
    with tempfile.TemporaryDirectory(prefix="agentbus-bench-") as scratch:
        directory = Path(scratch)
        nats: EmbeddedNats | None = None
        if nats_url is None:
            nats = EmbeddedNats(directory / "nats", port=0)
            nats_url = nats.start()
        try:
            nc = await connect_nats(nats_url, name="agentbus-bench")
            env = Env(
                nats_url=nats_url,
                nc=nc,
                workspace=fresh_workspace(),
                directory=directory,
                postgres_given=postgres_url,
            )
            try:
                # Idempotent; refuses destructive changes to an external server's streams.
                await apply_streams(nc, load_stream_specs(resource("streams")))
                yield env
            finally:
                await env.close()
        finally:
            if nats is not None:
                nats.stop()
