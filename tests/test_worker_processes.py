"""Worker processes as operators run them (`agentbus serve --role worker`): a worker killed
with SIGKILL mid-run is taken over by another once its lease runs out; the run succeeds once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest

from agentbus.domain.handling import handle, load
from agentbus.domain.run import RUN, QueueRun
from agentbus.events import AggregateRef
from agentbus.events.run import RunStarted, RunSucceeded
from agentbus.store import EventStore

pytestmark = pytest.mark.slow


def worker(nats_url: str, database_url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    env.update(
        {
            "AGENTBUS_NATS_URL": nats_url,
            "AGENTBUS_DATABASE_URL": database_url,
            "AGENTBUS_RUN_LEASE": "2",
            "AGENTBUS_AGENTS": orjson.dumps(
                {"slow": {"executor": "echo", "options": {"word_delay": 0.3}}}
            ).decode(),
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "agentbus", "serve", "--role", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_kill_9_a_worker_mid_run_another_finishes_it_once(
    private_store: EventStore, database_url: str
) -> None:
    store = private_store
    url = store._nc.connected_url
    assert url is not None
    first = worker(url.geturl(), database_url)
    second: subprocess.Popen[bytes] | None = None
    ref = AggregateRef("acme", "run", "survivor")
    try:
        await handle(store, RUN, ref, QueueRun("slow", "echo", " ".join(["word"] * 12)))
        deadline = time.monotonic() + 30
        while (await load(store, RUN, ref))[0].status != "running":
            assert time.monotonic() < deadline, "the first worker never started the run"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # mid-run
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = worker(url.geturl(), database_url)
        deadline = time.monotonic() + 60
        while (await load(store, RUN, ref))[0].status != "succeeded":
            assert time.monotonic() < deadline, "the run was not taken over"
            await asyncio.sleep(0.1)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    events = [e.event for e in (await store.load(ref)).events]
    starts = [e for e in events if isinstance(e, RunStarted)]
    assert [s.attempt for s in starts] == [1, 2]
    assert starts[0].worker != starts[1].worker
    assert len([e for e in events if isinstance(e, RunSucceeded)]) == 1
