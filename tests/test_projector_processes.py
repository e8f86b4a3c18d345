"""Projector processes as operators run them (`agentbus serve --role projector`), killed with
SIGKILL at random points while events keep flowing: nothing lost, nothing applied twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.queries.consistency import wait_for_position
from agentbus.store import EventStore

from .test_projections import conversation, fresh_rebuild_rows, table_rows

pytestmark = pytest.mark.slow


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


class Projectors:
    def __init__(self, nats_url: str, database_url: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
        self.env = {
            **env,
            "AGENTBUS_NATS_URL": nats_url,
            "AGENTBUS_DATABASE_URL": database_url,
            "AGENTBUS_LOG_FORMAT": "json",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "agentbus", "serve", "--role", "projector"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def projectors(private_store: EventStore, database_url: str) -> Iterator[Projectors]:
    nats_url = private_store._nc.connected_url
    assert nats_url is not None
    group = Projectors(nats_url.geturl(), database_url)
    yield group
    group.close()


async def active_pid(engine: AsyncEngine) -> int | None:
    """The OS pid of the process holding the projection's advisory lock."""
    async with engine.connect() as connection:
        name = await connection.scalar(
            text(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted LIMIT 1"
            )
        )
    return int(name.split(":")[1]) if name else None


async def position(engine: AsyncEngine) -> int:
    """The sessions projection's checkpoint."""
    async with engine.connect() as connection:
        value = await connection.scalar(
            text(
                "SELECT position FROM projection_generations "
                "WHERE projection = 'sessions' AND status = 'live'"
            )
        )
    return int(value or 0)


async def test_kill_9_at_random_points_while_events_flow_equals_a_rebuild(
    private_store: EventStore,
    engine: AsyncEngine,
    database_url: str,
    projectors: Projectors,
    workspace: str,
) -> None:
    store = private_store
    rng = random.Random(42)
    stop = asyncio.Event()
    last = 0

    async def keep_appending() -> None:
        nonlocal last
        round_ = 0
        while not stop.is_set():
            round_ += 1
            last = await conversation(
                store, f"{workspace}r{round_}", sessions=3, messages=8, seed=round_
            )
            await asyncio.sleep(0.01)

    appender = asyncio.create_task(keep_appending())
    seen: list[int] = []
    try:
        for _ in range(5):
            before = await position(engine)
            process = projectors.start()
            # kill it at a random point of its work, not while it is still starting up
            deadline = time.monotonic() + 60
            while await position(engine) == before:
                assert time.monotonic() < deadline, "the projector never made progress"
                await asyncio.sleep(0.02)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            process.send_signal(signal.SIGKILL)
            process.wait()
            seen.append(await position(engine))
        projectors.start()
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await appender
    await wait_for_position(engine, "sessions", last, timeout=60)
    assert seen[-1] > 0, "the projector should have made progress between kills"
    assert len(set(seen)) > 1, f"kills should land at different checkpoints: {seen}"
    for round_ in (1, 2, 3):
        ws = f"{workspace}r{round_}"
        assert await table_rows(engine, ws) == await fresh_rebuild_rows(
            store, database_url, ws, last
        )
    # and the whole tables, every workspace at once
    async with engine.connect() as connection:
        total = await connection.scalar(text("SELECT count(*) FROM messages"))
        distinct = await connection.scalar(text("SELECT count(DISTINCT position) FROM messages"))
    assert total == distinct


async def test_ha_handover_within_five_seconds(
    private_store: EventStore,
    engine: AsyncEngine,
    database_url: str,
    projectors: Projectors,
    workspace: str,
) -> None:
    store = private_store
    first, second = projectors.start(), projectors.start()
    written = await conversation(store, workspace, sessions=3, messages=5, seed=1)
    await wait_for_position(engine, "sessions", written, timeout=30)
    active = await active_pid(engine)
    assert active in (first.pid, second.pid)
    victim, survivor = (first, second) if active == first.pid else (second, first)

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    more = await conversation(store, f"{workspace}b", sessions=2, messages=3, seed=2)
    await wait_for_position(engine, "sessions", more, timeout=15)
    handover = time.monotonic() - killed_at
    assert handover < 5.0, f"takeover took {handover:.1f}s"
    assert await active_pid(engine) == survivor.pid
    for ws, last in ((workspace, written), (f"{workspace}b", more)):
        assert await table_rows(engine, ws) == await fresh_rebuild_rows(
            store, database_url, ws, last
        )
