"""Scenario `audit`: `verify` of the hash chain (replay + recompute + compare) beside raw
ordered-consumer replay of the same stream in the same run; and the notary's catch-up.

1. Fill (not measured): N events (default 100,000) of the `projection` scenario's chat
   sessions, appended through `EventStore.append` into EVENTS on a nats-server of this
   scenario's own (unless `--nats-url`: then every event of that EVENTS stream counts).
2. The notary chains the whole stream from position 0 into a fresh database, with default
   `NotaryOptions` (1,000 events per transaction, a signed checkpoint every 1,000): measured
   once, as events chained per second beside the raw replay.
3. Rounds (at most 5), in a rotating order:
   - **verify**: `agentbus.audit.verify.verify` over the whole stream: an ordered-consumer
     read of the raw bytes (`EventStore.read_raw`), both SHA-256s of every event, comparison
     with the notary's stored link (paged from Postgres ahead of the reader) and with every
     signed checkpoint, whose Ed25519 signatures are checked first;
   - **the ceiling**: raw nats-py ordered-consumer replay of the same stream with a message
     callback reading each message's position and nothing else (`projection`'s raw replay).

Goal: verify at >= 0.5 of the raw replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit.chain import NotaryKey
from agentbus.audit.notary import Notary, NotaryOptions
from agentbus.audit.verify import verify
from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.store import EventStore
from benchmarks import Figure, Options
from benchmarks.env import Env
from benchmarks.measure import Sample
from benchmarks.projection import (
    _event_store,
    _fresh_database,
    _median,
    _median_cpu,
    _rates,
    _raw_replay_callback,
    _warnings_only,
    fill,
    session_mix,
)

NAME = "audit"
DESCRIPTION = "hash-chain verify (replay + recompute + compare) vs raw ordered-consumer replay"
GOAL_RAW = 0.5
DEFAULT_EVENTS = 100_000
MAX_ROUNDS = 5
TIMEOUT = 600.0


async def run(env: Env, options: Options) -> list[Figure]:
    with _warnings_only():
        return await _run(env, options)


async def _run(env: Env, options: Options) -> list[Figure]:
    events = options.events or DEFAULT_EVENTS
    admin_url = await env.postgres_url()
    key = NotaryKey.from_seed(bytes(range(32)))
    async with (
        _event_store(env) as (nc, store),
        _fresh_database(admin_url, f"{env.workspace}_audit") as url,
    ):
        await fill(store, env.workspace, session_mix(events), options.concurrency)
        last = await store.last_position()
        await upgrade(url)
        engine = create_engine(url)
        try:
            notary = await _notary_catch_up(store, engine, key, last)

            async def verify_once() -> Sample:
                wall, cpu = time.perf_counter(), time.process_time()
                report = await verify(store, engine, key.public)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if not report.ok or report.walked != last:
                    raise RuntimeError(f"verify did not pass over {last} events: {report}")
                return Sample(ops=report.walked, seconds=wall, cpu_seconds=cpu)

            contenders: dict[str, Callable[[], Awaitable[Sample]]] = {
                "verify": verify_once,
                "raw": lambda: _raw_replay_callback(nc, last),
            }
            results: dict[str, list[Sample]] = {name: [] for name in contenders}
            for index in range(min(options.rounds, MAX_ROUNDS)):
                names = list(contenders)
                shift = index % len(names)
                for name in [*names[shift:], *names[:shift]]:
                    results[name].append(await contenders[name]())
        finally:
            await engine.dispose()
    raw = _median(results["raw"])
    ceiling = "raw ordered-consumer replay (callback)"
    return [
        Figure(
            name="audit verify (replay + SHA-256 chain + stored links + signed checkpoints)",
            value=_median(results["verify"]),
            unit="events/s",
            ceiling_name=ceiling,
            ceiling_value=raw,
            goal=GOAL_RAW,
            samples=_rates(results["verify"]),
            cpu_us_per_op=_median_cpu(results["verify"]),
        ),
        Figure(
            name="notary catch-up (chain + links + checkpoints committed; first round)",
            value=notary.per_second,
            unit="events/s",
            ceiling_name=ceiling,
            ceiling_value=raw,
            samples=(notary.per_second,),
            cpu_us_per_op=notary.cpu_us_per_op,
        ),
        Figure(
            name=f"  {ceiling}",
            value=raw,
            unit="events/s",
            samples=_rates(results["raw"]),
            cpu_us_per_op=_median_cpu(results["raw"]),
        ),
    ]


async def _notary_catch_up(
    store: EventStore, engine: AsyncEngine, key: NotaryKey, last: int
) -> Sample:
    """The notary with default options, from position 0 to `last` on a fresh database."""
    notary = Notary(store, engine, key, options=NotaryOptions())
    stop = asyncio.Event()
    wall, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(notary.run(stop))
    try:
        await notary.wait_for(last, timeout=TIMEOUT)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        stop.set()
        await task
    return Sample(ops=last, seconds=wall, cpu_seconds=cpu)
