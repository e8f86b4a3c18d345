"""Scenario `projection`: catch-up of the `sessions` + `messages` read model from position 0,
beside raw ordered-consumer replay of the same stream in the same run, and beside the
`eventsourcing` library's `ProjectionRunner` building the same tables on the same Postgres.

1. Fill (not measured): N events (default 200,000) of chat sessions are appended through
   `EventStore.append` into a fresh workspace: each session is opened, receives and sends 10-30
   messages, and half of them are closed. Each event is one append with `Expect.at(last)`, as a
   chat session receives them, `--concurrency` sessions at a time, so sessions interleave in
   the stream as they do in production. (Atomic multi-event appends were slower to fill with:
   about 130 batches/s on this server, whatever their size.)
2. Rounds (at most `MAX_ROUNDS`, 3: each catch-up is already 200,000 events) measure, in a
   rotating order:
   - **the platform**: `Projector([SessionsProjection()], ...)` with default `RuntimeOptions`
     on a fresh database (migrated first, not timed), from position 0 until its checkpoint
     reaches the last position (polled every `POLL` s): ordered-consumer read, decode and
     validation of every event, rows written and checkpoint moved in one transaction per batch;
   - **the ceiling**: raw nats-py ordered-consumer replay of the same stream from position 1 to
     the last, with a message callback reading each message's position and nothing else;
   - **the peer** (`benchmarks/peer_eventsourcing.py`, needs the `bench` extra):
     `eventsourcing` 9.5.6's `ProjectionRunner` building the same tables from the same kind of
     events, stored by an `eventsourcing` application on the same Postgres. It handles one
     event per transaction (its projection API has no batching), 500-2,000 events/s here, so
     it catches up `PEER_EVENTS` (5,000) events of the same mix: rates are compared.

   Measured once, in the first round, for reference: the raw replay with `next_msg` in a loop
   (the other raw way; the slower one), and a hand-written minimal projector: the raw replay
   plus `orjson.loads` and the same rows written as the runtime writes them (`execute_writes`:
   COPY for messages, `executemany` for the rest), 1,000 events per transaction, no
   validation: what writing these rows costs Postgres, and the ceiling of a third figure (the
   runtime's own cost). `--seconds` and `--warmup` do not apply.

The projection reads the whole stream from position 1, so the scenario runs on a nats-server of
its own (the run's embedded one also holds the other scenarios' events). With `--nats-url`, it
uses that server and every event in its EVENTS stream counts (rates are events processed per
second, for the platform and the raw replay alike).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import asyncpg
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy.engine import make_url

from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.events import AggregateRef
from agentbus.events.catalog import default_registry
from agentbus.events.registry import DomainEvent
from agentbus.events.session import (
    Channel,
    MessageReceived,
    MessageSent,
    SessionClosed,
    SessionOpened,
)
from agentbus.projections.projection import Write
from agentbus.projections.runtime import Projector, RuntimeOptions, execute_writes
from agentbus.projections.sessions import (
    CLOSE_SESSION,
    COUNT_MESSAGE,
    INSERT_MESSAGE,
    INSERT_SESSION,
    SessionsProjection,
)
from agentbus.resources import resource
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store import EventStore, Expect
from agentbus.store.connection import connect_nats
from agentbus.store.eventstore import EVENTS_STREAM
from agentbus.store.streams import apply_streams, load_stream_specs
from benchmarks import Figure, Options
from benchmarks.env import Env
from benchmarks.measure import Sample

NAME = "projection"
DESCRIPTION = (
    "catch-up into sessions + messages vs raw ordered-consumer replay and eventsourcing's "
    "ProjectionRunner"
)
GOAL_RAW = 0.6
GOAL_PEER = 15.0
DEFAULT_EVENTS = 200_000
PEER_EVENTS = 5_000
"""The peer's catch-up size (at most --events): 3-10 s at its rate."""
MAX_ROUNDS = 3
"""Each catch-up is already 200,000 events: three rounds keep the scenario near 3 minutes."""
POLL = 0.05
"""Seconds between looks at a projection's checkpoint (both sides)."""
TIMEOUT = 600.0
SUBJECTS = "evt.>"

_TEXTS = (
    "Could you summarise yesterday's incident report and draft a reply to the customer? "
    "Keep it short and mention that the fix ships on Thursday.",
    "Here is the summary: the payment webhook timed out for 14 minutes after the database "
    "failover; no charges were lost and retries delivered every event.",
    "Thanks! Please also add the timeline and who was on call.",
    "Timeline: 09:12 failover started, 09:14 alerts fired, 09:26 webhook latency back to "
    "normal. On call: Ada (primary), Lin (secondary).",
)


# --------------------------------------------------------------------------- the session mix


@dataclass(frozen=True, slots=True)
class Message:
    inbound: bool
    message_id: str
    author: str
    text: str
    external_id: str | None
    run_id: str | None


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """One chat session of the mix: opened, `messages` messages, maybe closed. Shared with the
    peer so both sides store the same shapes and texts."""

    number: int
    messages: int
    closed: bool

    channel: ClassVar[Channel] = "telegram"
    agent: ClassVar[str] = "assistant"
    close_reason: ClassVar[str] = "resolved"

    @property
    def title(self) -> str:
        return f"Incident follow-up #{self.number}"

    @property
    def events(self) -> int:
        return 1 + self.messages + int(self.closed)

    def message(self, number: int) -> Message:
        inbound = number % 2 == 0  # the user writes, the agent answers
        return Message(
            inbound=inbound,
            message_id=f"m{self.number}-{number}",
            author="user:ada" if inbound else "agent:assistant",
            text=_TEXTS[number % len(_TEXTS)],
            external_id=f"tg-{self.number}-{number}" if inbound else None,
            run_id=None if inbound else f"run-{self.number}-{number}",
        )

    def domain_events(self) -> list[DomainEvent]:
        events: list[DomainEvent] = [
            SessionOpened(channel=self.channel, title=self.title, agent=self.agent)
        ]
        for number in range(self.messages):
            m = self.message(number)
            if m.inbound:
                events.append(
                    MessageReceived(
                        message_id=m.message_id,
                        author=m.author,
                        text=m.text,
                        external_id=m.external_id,
                    )
                )
            else:
                events.append(
                    MessageSent(
                        message_id=m.message_id, author=m.author, text=m.text, run_id=m.run_id
                    )
                )
        if self.closed:
            events.append(SessionClosed(reason=self.close_reason))
        return events


def session_mix(events: int, seed: int = 9) -> list[SessionPlan]:
    """Sessions of 10-30 messages, half of them closed, `events` events in all."""
    rng = random.Random(seed)
    plans: list[SessionPlan] = []
    total = 0
    while total < events:
        plan = SessionPlan(len(plans) + 1, rng.randint(10, 30), rng.random() < 0.5)
        if total + plan.events > events:
            plan = SessionPlan(plan.number, events - total - 1, False)
        plans.append(plan)
        total += plan.events
    return plans


async def fill(
    store: EventStore, workspace: str, sessions: Sequence[SessionPlan], in_flight: int
) -> None:
    """Append the sessions' events one at a time with `Expect.at(last)`, as a chat session
    receives them, `in_flight` sessions at a time (so they interleave in the stream)."""
    queue = iter(sessions)

    async def writer() -> None:
        for plan in queue:
            ref = AggregateRef(workspace, "session", f"s{plan.number}")
            last = 0
            for event in plan.domain_events():
                last = (await store.append(ref, [event], expect=Expect.at(last))).last_position

    await asyncio.gather(*(writer() for _ in range(in_flight)))


# --------------------------------------------------------------------------- the scenario


async def run(env: Env, options: Options) -> list[Figure]:
    with _warnings_only():
        return await _run(env, options)


async def _run(env: Env, options: Options) -> list[Figure]:
    events = options.events or DEFAULT_EVENTS
    sessions = session_mix(events)
    admin_url = await env.postgres_url()
    peer = _Peer.prepare_if_installed()
    async with _event_store(env) as (nc, store):
        await fill(store, env.workspace, sessions, options.concurrency)
        last = await store.last_position()
        expected = _Expected(env.workspace, len(sessions), sum(plan.messages for plan in sessions))
        databases = (f"{env.workspace}_{n}" for n in itertools.count())

        async def platform() -> Sample:
            return await _platform_catch_up(store, admin_url, next(databases), last, expected)

        async def minimal() -> Sample:
            return await _minimal_projector(nc, admin_url, next(databases), last)

        contenders: dict[str, Callable[[], Awaitable[Sample]]] = {
            "platform": platform,
            "raw callback": lambda: _raw_replay_callback(nc, last),
        }
        once: dict[str, Callable[[], Awaitable[Sample]]] = {
            "raw next_msg": lambda: _raw_replay_next_msg(nc, last),
            "minimal": minimal,
        }
        if peer is not None:
            await peer.fill(admin_url, f"{env.workspace}_peer", min(events, PEER_EVENTS))
            contenders["peer"] = lambda: peer.catch_up(admin_url, next(databases))
        try:
            results = await _rounds(contenders, once, min(options.rounds, MAX_ROUNDS))
        finally:
            if peer is not None:
                await _drop_database(admin_url, f"{env.workspace}_peer")
    return _figures(results, peer)


async def _rounds(
    contenders: dict[str, Callable[[], Awaitable[Sample]]],
    once: dict[str, Callable[[], Awaitable[Sample]]],
    rounds: int,
) -> dict[str, list[Sample]]:
    """Each contender once per round, in a rotating order (see measure.py for why); the `once`
    ones in the first round only."""
    results: dict[str, list[Sample]] = {name: [] for name in [*contenders, *once]}
    for index in range(rounds):
        measured = {**contenders, **once} if index == 0 else contenders
        names = list(measured)
        shift = index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            results[name].append(await measured[name]())
    return results


def _figures(results: dict[str, list[Sample]], peer: _Peer | None) -> list[Figure]:
    ours = results["platform"]
    raw_ways = {"raw next_msg": "next_msg loop", "raw callback": "callback"}
    raw_rates = {way: _median(results[way]) for way in raw_ways}
    fastest = max(raw_rates, key=raw_rates.__getitem__)
    figures = [
        Figure(
            name="projection catch-up (sessions+messages)",
            value=_median(ours),
            unit="events/s",
            ceiling_name=f"raw ordered-consumer replay ({raw_ways[fastest]}, fastest raw)",
            ceiling_value=raw_rates[fastest],
            goal=GOAL_RAW,
            samples=_rates(ours),
            cpu_us_per_op=_median_cpu(ours),
        )
    ]
    figures.append(
        Figure(
            name="projection catch-up vs a minimal projector writing the same rows",
            value=_median(ours),
            unit="events/s",
            ceiling_name="raw replay + orjson + the same writes, no validation (first round)",
            ceiling_value=_median(results["minimal"]),
            samples=_rates(ours),
            cpu_us_per_op=_median_cpu(ours),
        )
    )
    if peer is None:
        figures.append(
            Figure(
                name="projection catch-up vs eventsourcing ProjectionRunner: skipped, "
                "install the peer with pip install -e '.[bench]'",
                value=_median(ours),
                unit="events/s",
            )
        )
    else:
        figures.append(
            Figure(
                name="projection catch-up vs eventsourcing ProjectionRunner",
                value=_median(ours),
                unit="events/s",
                ceiling_name=f"eventsourcing 9.5.6 ProjectionRunner ({peer.events:,} events)",
                ceiling_value=_median(results["peer"]),
                goal=GOAL_PEER,
                samples=_rates(ours),
                cpu_us_per_op=_median_cpu(ours),
            )
        )
    rows = {
        "raw callback": "raw ordered consumer, callback",
        "raw next_msg": "raw ordered consumer, next_msg loop (first round only)",
        "minimal": "minimal projector: raw replay + orjson + the same writes, no validation "
        "(first round only)",
    }
    if peer is not None:
        rows["peer"] = f"eventsourcing ProjectionRunner, {peer.events:,} events"
    figures += [
        Figure(
            name=f"  {label}",
            value=_median(results[key]),
            unit="events/s",
            samples=_rates(results[key]),
            cpu_us_per_op=_median_cpu(results[key]),
        )
        for key, label in rows.items()
    ]
    return figures


# --------------------------------------------------------------------------- the platform


@dataclass(frozen=True, slots=True)
class _Expected:
    workspace: str
    sessions: int
    messages: int


async def _platform_catch_up(
    store: EventStore, admin_url: str, database: str, last: int, expected: _Expected
) -> Sample:
    """The projector role with default options, from position 0 on a fresh database."""
    async with _fresh_database(admin_url, database) as url:
        await upgrade(url)
        engine = create_engine(url)
        poller = await asyncpg.connect(admin_url, database=database)
        try:
            stop = asyncio.Event()
            wall, cpu = time.perf_counter(), time.process_time()
            projector = Projector([SessionsProjection()], store, engine, RuntimeOptions())
            task = asyncio.create_task(projector.run(stop))
            try:
                while await _checkpoint(poller) < last:
                    if task.done():
                        task.result()
                        raise RuntimeError("the projector stopped before catching up")
                    if time.perf_counter() - wall > TIMEOUT:
                        raise TimeoutError(f"no catch-up within {TIMEOUT:g}s")
                    await asyncio.sleep(POLL)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                stop.set()
                await task
            sessions, messages = await poller.fetchrow(
                "SELECT (SELECT count(*) FROM sessions WHERE workspace = $1), "
                "(SELECT count(*) FROM messages WHERE workspace = $1)",
                expected.workspace,
            )
            if (sessions, messages) != (expected.sessions, expected.messages):
                raise RuntimeError(
                    f"the read model has {sessions} sessions and {messages} messages; "
                    f"expected {expected.sessions} and {expected.messages}"
                )
        finally:
            await poller.close()
            await engine.dispose()
    return Sample(ops=last, seconds=wall, cpu_seconds=cpu)


async def _checkpoint(poller: asyncpg.Connection) -> int:
    position = await poller.fetchval(
        "SELECT max(position) FROM projection_generations WHERE projection = 'sessions'"
    )
    return int(position or 0)


# --------------------------------------------------------------------------- raw nats-py


def _replay_config() -> ConsumerConfig:
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1)


async def _raw_replay_next_msg(nc: NATS, last: int) -> Sample:
    """An ordered consumer from position 1, `next_msg` in a loop, until position `last`."""
    js = nc.jetstream()
    wall, cpu = time.perf_counter(), time.process_time()
    sub = await js.subscribe(
        SUBJECTS, stream=EVENTS_STREAM, ordered_consumer=True, config=_replay_config()
    )
    count = 0
    try:
        while True:
            msg = await sub.next_msg(timeout=5.0)
            count += 1
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Sample(ops=count, seconds=wall, cpu_seconds=cpu)


async def _raw_replay_callback(nc: NATS, last: int) -> Sample:
    """An ordered consumer from position 1 with a message callback, until position `last`."""
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def on_message(msg: Msg) -> None:
        nonlocal count
        count += 1
        if msg.metadata.sequence.stream >= last:
            done.set()

    wall, cpu = time.perf_counter(), time.process_time()
    sub = await js.subscribe(
        SUBJECTS,
        stream=EVENTS_STREAM,
        ordered_consumer=True,
        config=_replay_config(),
        cb=on_message,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            await done.wait()
    finally:
        await sub.unsubscribe()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Sample(ops=count, seconds=wall, cpu_seconds=cpu)


_MINIMAL_SCHEMA = (
    "CREATE TABLE checkpoint (position bigint NOT NULL)",
    "INSERT INTO checkpoint VALUES (0)",
)


async def _minimal_projector(nc: NATS, admin_url: str, database: str, last: int) -> Sample:
    """What a hand-written projector without validation costs: the raw callback replay into a
    bounded queue, `orjson.loads` of each payload, and the same rows written into the same
    tables as the runtime writes them (`execute_writes`), with a checkpoint, 1,000 events per
    transaction."""
    tables = {"sessions": "sessions", "messages": "messages"}
    sql = {s.name: s.render(tables) for s in SessionsProjection.statements}
    async with _fresh_database(admin_url, database):
        connection = await asyncpg.connect(admin_url, database=database)
        try:
            for ddl in (*SessionsProjection.schema, *_MINIMAL_SCHEMA):
                await connection.execute(ddl.format_map(tables))
            received: asyncio.Queue[Msg] = asyncio.Queue(maxsize=4000)
            wall, cpu = time.perf_counter(), time.process_time()
            sub = await nc.jetstream().subscribe(
                SUBJECTS,
                stream=EVENTS_STREAM,
                ordered_consumer=True,
                config=_replay_config(),
                cb=received.put,
            )
            count = position = 0
            try:
                while position < last:
                    async with asyncio.timeout(TIMEOUT):
                        batch = [await received.get()]
                    while len(batch) < 1000 and not received.empty():
                        batch.append(received.get_nowait())
                    rows = []
                    for msg in batch:
                        position = msg.metadata.sequence.stream
                        rows.append((position, msg.subject, orjson.loads(msg.data)))
                    count += len(rows)
                    await _write_minimal(connection, sql, rows)
            finally:
                await sub.unsubscribe()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            await connection.close()
    return Sample(ops=count, seconds=wall, cpu_seconds=cpu)


async def _write_minimal(
    connection: asyncpg.Connection, sql: dict[str, str], batch: list[tuple[int, str, Any]]
) -> None:
    """The same writes the sessions projection makes, built straight from the JSON, and applied
    the way the runtime applies them (`execute_writes`: statement by statement, merged where the
    statement says so), with the checkpoint, in one transaction."""
    writes: list[Write] = []
    for position, subject, envelope in batch:
        _, workspace, _, session, name = subject.split(".")
        data = envelope["data"]
        at = datetime.fromisoformat(envelope["time"])
        if name == "opened":
            writes.append(
                INSERT_SESSION.row(
                    workspace,
                    session,
                    data["channel"],
                    data.get("title"),
                    data.get("agent"),
                    at,
                    position,
                )
            )
        elif name in ("message_received", "message_sent"):
            inbound = name == "message_received"
            writes.append(
                INSERT_MESSAGE.row(
                    workspace,
                    session,
                    position,
                    data["message_id"],
                    "in" if inbound else "out",
                    data["author"],
                    data["text"],
                    at,
                    data.get("external_id"),
                    data.get("run_id"),
                    data["author"] if inbound else data.get("recipient"),
                )
            )
            writes.append(COUNT_MESSAGE.row(workspace, session, at, position, 1))
        elif name == "closed":
            writes.append(CLOSE_SESSION.row(workspace, session, at, data.get("reason"), position))
    async with connection.transaction():
        await execute_writes(connection, _SESSIONS, sql, writes)
        await connection.execute("UPDATE checkpoint SET position = $1", batch[-1][0])


_SESSIONS = SessionsProjection()


# --------------------------------------------------------------------------- the peer


class _Peer:
    """The `eventsourcing` side, run in a thread (the library is synchronous)."""

    def __init__(self) -> None:
        self.events = 0
        self._env: dict[str, str] = {}
        self._last = 0

    @classmethod
    def prepare_if_installed(cls) -> _Peer | None:
        if importlib.util.find_spec("eventsourcing") is None:
            return None
        return cls()

    async def fill(self, admin_url: str, database: str, events: int) -> None:
        from benchmarks import peer_eventsourcing as peer

        await _create_database(admin_url, database)
        self._env = peer.environment(admin_url, database)
        self.events = events
        self._last = await asyncio.to_thread(peer.fill, self._env, session_mix(events))

    async def catch_up(self, admin_url: str, database: str) -> Sample:
        from benchmarks import peer_eventsourcing as peer

        async with _fresh_database(admin_url, database):
            result = await asyncio.to_thread(
                peer.catch_up, self._env, database, self._last, poll=POLL, timeout=TIMEOUT
            )
        plans = session_mix(self.events)
        if (result.sessions, result.messages) != (len(plans), sum(p.messages for p in plans)):
            raise RuntimeError(
                f"the peer's view has {result.sessions} sessions and {result.messages} messages"
            )
        return Sample(ops=self._last, seconds=result.seconds, cpu_seconds=result.cpu_seconds)


# --------------------------------------------------------------------------- servers


@asynccontextmanager
async def _event_store(env: Env) -> AsyncIterator[tuple[NATS, EventStore]]:
    """A connection and an event store on it, on a nats-server of this scenario's own, unless
    the run was given `--nats-url` (then the run's server, whatever its stream holds). The raw
    replays use the same connection as the platform."""
    if not (env.directory / "nats").is_dir():  # open_env's embedded server lives there
        yield env.nc, env.event_store()
        return
    server = EmbeddedNats(env.directory / "projection-nats", port=0)
    url = await asyncio.to_thread(server.start)
    try:
        nc = await connect_nats(url, name="agentbus-bench-projection")
        try:
            await apply_streams(nc, load_stream_specs(resource("streams")))
            yield nc, EventStore(nc, default_registry())
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(server.stop)


async def _create_database(admin_url: str, name: str) -> str:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def _fresh_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """A new empty database on the server of `admin_url`, dropped afterwards."""
    url = await _create_database(admin_url, name)
    try:
        yield url
    finally:
        await _drop_database(admin_url, name)


@contextmanager
def _warnings_only() -> Iterator[None]:
    """The projector logs at INFO ("active instance"): keep stdout for the table or the JSON,
    and let warnings and errors through to stderr."""
    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


# --------------------------------------------------------------------------- numbers


def _median(samples: Sequence[Sample]) -> float:
    return statistics.median(s.per_second for s in samples)


def _rates(samples: Sequence[Sample]) -> tuple[float, ...]:
    return tuple(s.per_second for s in samples)


def _median_cpu(samples: Sequence[Sample]) -> float:
    return statistics.median(s.cpu_us_per_op for s in samples)
