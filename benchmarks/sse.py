"""Scenario `sse`: 1,000 SSE clients on one gateway process, fed 500 events/s spread over their
sessions; then a resume storm. Beside each figure, the same JetStream work without HTTP,
measured in the same run.

Processes. The gateway runs in a process of its own, as `agentbus up` serves it (uvicorn,
`lifespan="on"`, no access log), with no projector and no workers: only the SSE bridge is
busy, so its memory and CPU are the connections'. The rate limit is lifted (`rate=1e9`): every
client uses the same viewer key, where a thousand browsers would be a thousand callers. The
clients and the publisher are this process: each client is an HTTP/1.1 connection on asyncio
streams (chunked body, complete events only) following `/sessions/{sid}/events` of a session of
its own.

Figures:

1. **publish-to-client latency p50 / p99** (ms): events appended at 500/s (open loop) through
   `EventStore.append`, each to a random one of the 1,000 sessions; per event, the client's
   receive time minus the CloudEvent `time` (stamped by `encode_event` just before the publish;
   one clock, one machine). Every event must arrive exactly once, or the measurement aborts.
   Ceiling: 1,000 core NATS subscriptions (one per session subject) in this process, same
   load: NATS delivering the published message, with no JetStream consumer and no HTTP. The
   goal is absolute: p99 ≤ 50 ms.
2. **memory per connection** (KB): the gateway's RSS with the clients connected (and after the
   latency rounds, the larger) minus its RSS before (after one warm-up connection), over the
   count. Reference: the same for a bare Starlette `StreamingResponse` SSE endpoint served the
   same way: what any Python SSE endpoint pays per idle connection. Goal ≤ 50 KB.
3. **resume storm** (s): every client disconnects, 1,000 events are appended over the sessions
   while they are away (their cursors are 1,000 stream positions behind the head, one or two
   of their own events each), then all reconnect at once with `Last-Event-ID`; from the first
   reconnect to the last client holding every event of its session. Ceiling: the JetStream
   part of that catch-up, 1,000 direct-get pages at once from the same positions. Goal ≤ 5 s.

Also reported: the gateway's CPU per delivered event (during the latency rounds) and its idle
CPU with the connections open, from the process's CPU times.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from agentbus.cli.admin import create_workspace, issue_key
from agentbus.db.migrations import upgrade
from agentbus.events import AggregateRef
from agentbus.events.session import MessageReceived, SessionOpened
from agentbus.gateway.app import create_app
from agentbus.runtime.platform import Platform
from agentbus.runtime.roles import HTTP_PARSER, tune_collector
from agentbus.settings import Settings
from agentbus.store import NO_EVENTS, EventStore
from agentbus.store.eventstore import ANY
from benchmarks import Figure, Options
from benchmarks.env import Env
from benchmarks.servers import Server, served

NAME = "sse"
DESCRIPTION = "1,000 SSE clients, 500 events/s over their sessions; resume storm"
CLIENTS = 1_000
RATE = 500.0
DEFAULT_EVENTS = 1_000
"""Events per latency round (2 s at 500/s)."""
STORM_BEHIND = 1_000
STORM_ROUNDS = 3
LATENCY_GOAL_MS = 50.0
MEMORY_GOAL_KB = 50.0
STORM_GOAL_S = 5.0
WAIT = 60.0
"""Give up on a measurement when events stop arriving for this long."""
MODULE = "benchmarks.sse"
TEXT = (
    "Could you summarise yesterday's incident report and draft a reply to the customer? "
    "Keep it short and mention that the fix ships on Thursday."
)


async def run(env: Env, options: Options) -> list[Figure]:
    per_round = options.events or DEFAULT_EVENTS
    rounds = options.rounds
    database_url = await env.postgres_url()
    await upgrade(database_url)
    store = env.event_store()
    workspace = env.workspace
    await create_workspace(store, workspace, "sse benchmark", None)
    key = (await issue_key(store, "sse benchmark", workspace, "viewer")).token
    sessions = [f"s{n}" for n in range(CLIENTS)]
    await _gather_limited(
        (
            store.append(
                AggregateRef(workspace, "session", sid),
                [SessionOpened(channel="web")],
                expect=NO_EVENTS,
            )
            for sid in sessions
        ),
        256,
    )
    rng = random.Random(42)
    publisher = _Publisher(store, workspace, sessions, rng)

    # --- raw ceilings: the same JetStream work without HTTP, in this process -------------------
    raw = await _raw_measurements(env.nc, publisher, per_round, rounds)

    # --- reference: a bare SSE endpoint's memory per idle connection ---------------------------
    async with served(MODULE, "bare", env, database_url) as bare:
        bare_memory = await _memory_per_connection(bare, workspace, sessions, key)

    # --- the gateway -----------------------------------------------------------------------------
    async with served(MODULE, "gateway", env, database_url) as server:
        warm = _Client(server.port, workspace, sessions[0], key)
        await warm.connect(None)
        await warm.wait_for(1)
        warm.close()
        await asyncio.sleep(1.0)
        rss_before = server.process.memory_info().rss

        clients = [_Client(server.port, workspace, sid, key) for sid in sessions]
        await asyncio.gather(*(c.connect(None) for c in clients))
        await _all_received(clients, publisher)  # each session's history so far
        await asyncio.sleep(1.0)  # every connection handed over to the hub
        rss_connected = server.process.memory_info().rss
        cpu = server.cpu_seconds()
        await asyncio.sleep(5.0)
        idle_cpu = (server.cpu_seconds() - cpu) / 5.0

        latencies: list[list[float]] = []
        cpu_per_event: list[float] = []
        for _ in range(rounds):
            for client in clients:
                client.latencies.clear()
            cpu = server.cpu_seconds()
            await publisher.flow(per_round, RATE)
            await _all_received(clients, publisher)
            cpu_per_event.append((server.cpu_seconds() - cpu) / per_round * 1e6)
            latencies.append(sorted(x for c in clients for x in c.latencies))
        rss_after = server.process.memory_info().rss

        storms: list[float] = []
        for _ in range(min(rounds, STORM_ROUNDS)):
            for client in clients:
                client.close()
            await publisher.burst(STORM_BEHIND)
            started = time.perf_counter()
            await asyncio.gather(*(c.connect(c.last_id) for c in clients))
            await _all_received(clients, publisher)
            storms.append(time.perf_counter() - started)
        for client in clients:
            client.close()

    memory = (max(rss_connected, rss_after) - rss_before) / CLIENTS / 1024
    figures: list[Figure] = []
    for quantile in (50, 99):
        values = tuple(_percentile(x, quantile) for x in latencies)
        ceiling = statistics.median(_percentile(x, quantile) for x in raw.latencies)
        goal = f" (goal ≤ {LATENCY_GOAL_MS:g} ms)" if quantile == 99 else ""
        figures.append(
            Figure(
                name=f"publish-to-client p{quantile}, {CLIENTS:,} clients, {RATE:g} ev/s{goal}",
                value=statistics.median(values),
                unit="ms",
                ceiling_name=f"core NATS subscriber p{quantile} (no JetStream consumer, no HTTP)",
                ceiling_value=ceiling,
                samples=values,
            )
        )
    storm = statistics.median(storms)
    figures += [
        Figure(
            name=f"memory per connection, gateway RSS (goal ≤ {MEMORY_GOAL_KB:g} KB)",
            value=memory,
            unit="KB",
            ceiling_name="bare Starlette SSE endpoint, idle connection (reference)",
            ceiling_value=bare_memory,
        ),
        Figure(
            name=f"resume storm: {CLIENTS:,} reconnect {STORM_BEHIND:,} events behind "
            f"(goal ≤ {STORM_GOAL_S:g} s)",
            value=storm,
            unit="s",
            ceiling_name="1,000 direct-get pages at once (catch-up without HTTP)",
            ceiling_value=statistics.median(raw.storms),
            samples=tuple(storms),
        ),
        Figure(
            name="  gateway CPU per delivered event",
            value=statistics.median(cpu_per_event),
            unit="µs",
            samples=tuple(cpu_per_event),
        ),
        Figure(
            name=f"  gateway idle CPU, {CLIENTS:,} connections open",
            value=idle_cpu * 100,
            unit="% core",
        ),
    ]
    return figures


async def _memory_per_connection(
    server: Server, workspace: str, sessions: list[str], key: str
) -> float:
    """KB of RSS per open connection to `server` (1,000 clients, after one warm-up)."""
    warm = _Client(server.port, workspace, sessions[0], key)
    await warm.connect(None)
    warm.close()
    await asyncio.sleep(1.0)
    before = server.process.memory_info().rss
    clients = [_Client(server.port, workspace, sid, key) for sid in sessions]
    await asyncio.gather(*(c.connect(None) for c in clients))
    await asyncio.sleep(2.0)
    after = server.process.memory_info().rss
    for client in clients:
        client.close()
    return float(after - before) / len(clients) / 1024


def _percentile(sorted_values: Sequence[float], quantile: float) -> float:
    index = min(len(sorted_values) - 1, int(quantile / 100 * len(sorted_values)))
    return sorted_values[index] * 1e3


async def _gather_limited(coroutines: Any, limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(coroutine: Any) -> None:
        async with gate:
            await coroutine

    await asyncio.gather(*(one(c) for c in coroutines))


# ---------------------------------------------------------------------------- publishing


@dataclass
class _Publisher:
    """Appends `message_received` events to random sessions; remembers how many each got."""

    store: EventStore
    workspace: str
    sessions: list[str]
    rng: random.Random
    published: dict[str, int] = field(default_factory=dict)
    _count: int = 0

    def __post_init__(self) -> None:
        self.published = dict.fromkeys(self.sessions, 1)  # each session's `opened`

    async def _one(self) -> None:
        sid = self.rng.choice(self.sessions)
        self._count += 1
        self.published[sid] += 1
        event = MessageReceived(message_id=f"m{self._count}", author="bench", text=TEXT)
        await self.store.append(AggregateRef(self.workspace, "session", sid), [event], expect=ANY)

    async def flow(self, count: int, rate: float) -> None:
        """`count` appends at `rate` per second, open loop (each at its time, whatever the
        previous ones are doing)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        pending: set[asyncio.Task[None]] = set()
        for number in range(count):
            delay = began + number / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    async def burst(self, count: int) -> None:
        await _gather_limited((self._one() for _ in range(count)), 64)


# ---------------------------------------------------------------------------- the SSE client


class _Client:
    """One SSE connection on asyncio streams: HTTP/1.1 GET, chunked body, complete events."""

    def __init__(self, port: int, workspace: str, session: str, key: str) -> None:
        self.port = port
        self.session = session
        self._path = f"/v1/workspaces/{workspace}/sessions/{session}/events"
        self._key = key
        self.received = 0
        self.last_id: str | None = None
        self.latencies: list[float] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, last_event_id: str | None) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        resume = f"last-event-id: {last_event_id}\r\n" if last_event_id else ""
        writer.write(
            f"GET {self._path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {self._key}\r\n"
            f"accept: text/event-stream\r\n{resume}\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            raise RuntimeError(f"SSE connect answered {head[:200]!r}")
        self._writer = writer
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    return
                buffer += await reader.readexactly(size)
                await reader.readexactly(2)
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._event(block)

    def _event(self, block: bytes) -> None:
        ident = data = None
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                ident = line[4:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is None:
            return
        now = time.time()
        sent = datetime.fromisoformat(orjson.loads(data)["time"]).timestamp()
        self.latencies.append(now - sent)
        self.received += 1
        self.last_id = ident
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        while self.received < count:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), WAIT)
            except TimeoutError:
                raise RuntimeError(
                    f"client {self.session}: {self.received} of {count} events, none for {WAIT:g} s"
                ) from None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


async def _all_received(clients: Sequence[_Client], publisher: _Publisher) -> None:
    await asyncio.gather(*(c.wait_for(publisher.published[c.session]) for c in clients))
    extra = [c.session for c in clients if c.received != publisher.published[c.session]]
    if extra:
        raise RuntimeError(f"{len(extra)} clients received more events than published: {extra[:3]}")


# ---------------------------------------------------------------------------- the raw ceiling


@dataclass
class _Raw:
    latencies: list[list[float]]
    storms: list[float]


async def _raw_measurements(nc: NATS, publisher: _Publisher, per_round: int, rounds: int) -> _Raw:
    """The same load without HTTP: 1,000 core NATS subscriptions (one per session subject) for
    latency; 1,000 direct-get pages at once from the same cursors for the storm."""
    workspace = publisher.workspace
    latencies: list[float] = []
    received = dict.fromkeys(publisher.sessions, 0)
    changed = asyncio.Event()

    def handler(sid: str) -> Any:
        async def on_message(msg: Msg) -> None:
            now = time.time()
            sent = datetime.fromisoformat(orjson.loads(msg.data)["time"]).timestamp()
            latencies.append(now - sent)
            received[sid] += 1
            changed.set()

        return on_message

    subs = [
        await nc.subscribe(f"evt.{workspace}.session.{sid}.*", cb=handler(sid))
        for sid in publisher.sessions
    ]
    await nc.flush()
    rounds_latencies = []
    try:
        for _ in range(rounds):
            latencies.clear()
            expected = {sid: received[sid] for sid in publisher.sessions}
            before = dict(publisher.published)
            await publisher.flow(per_round, RATE)
            deadline = time.monotonic() + WAIT
            while any(
                received[s] - expected[s] < publisher.published[s] - before[s]
                for s in publisher.sessions
            ):
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
                if time.monotonic() > deadline:
                    raise RuntimeError("core subscribers did not receive every event")
            rounds_latencies.append(sorted(latencies))
    finally:
        for sub in subs:
            await sub.unsubscribe()

    storms = []
    store = publisher.store
    for _ in range(min(rounds, STORM_ROUNDS)):
        head = await store.last_position()  # (each session's cursor: nothing of it after)
        await publisher.burst(STORM_BEHIND)
        started = time.perf_counter()
        pages = await asyncio.gather(
            *(
                store.read_page(after=head, subject=f"evt.{workspace}.session.{sid}.*")
                for sid in publisher.sessions
            )
        )
        storms.append(time.perf_counter() - started)
        if sum(map(len, pages)) != STORM_BEHIND:
            raise RuntimeError(f"raw catch-up read {sum(map(len, pages))} of {STORM_BEHIND}")
    return _Raw(rounds_latencies, storms)


# ---------------------------------------------------------------------------- the gateway


def _bare_app() -> Starlette:
    """One SSE route of the same path that holds the connection open: `retry:`, then a ping
    every 15 s. What any Python SSE endpoint pays per connection, for reference."""

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 3000\n\n"
        while True:
            await asyncio.sleep(15)
            yield b": ping\n\n"

    async def events(_: Request) -> StreamingResponse:
        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/workspaces/{ws}/sessions/{sid}/events", events)])


async def _serve(kind: str, nats_url: str, database_url: str, port_file: Path) -> None:
    platform: Platform | None = None
    if kind == "gateway":
        platform = await Platform.connect(Settings(agents={}), nats_url, database_url)
        app: Any = create_app(platform, rate=1e9, burst=1e9)
    else:
        app = _bare_app()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    # As `agentbus up` serves the gateway (agentbus.runtime.roles), plus uvicorn's signal
    # handling: the parent stops this process with SIGTERM.
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=HTTP_PARSER,
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        written = port_file.with_suffix(".tmp")
        written.write_text(str(listener.getsockname()[1]))
        written.rename(port_file)
        await serving
    finally:
        if platform is not None:
            await platform.close()


def main(argv: Sequence[str]) -> None:
    """`python -m benchmarks.sse gateway|bare NATS_URL DATABASE_URL PORT_FILE`: serve the
    gateway (or the bare endpoint) on 127.0.0.1, an ephemeral port written to PORT_FILE."""
    kind, nats_url, database_url, port_file = argv
    if kind not in ("gateway", "bare"):
        raise SystemExit(f"serve gateway or bare, not {kind!r}")
    tune_collector()  # as `agentbus up` and `agentbus serve` run their roles
    asyncio.run(_serve(kind, nats_url, database_url, Path(port_file)))


if __name__ == "__main__":
    main(sys.argv[1:])
