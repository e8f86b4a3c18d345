"""Scenario `runs`: runs through the run queue, executed by `RunWorker`s with the echo executor,
beside raw nats-py doing the same JetStream work per run in the same run.

Platform: N in-process `RunWorker`s (default 4, 32 runs at a time each), each with its own NATS
connection and `EventStore`, agent `echo` (`word_delay` 0). A run is queued the way the API and
auto-reply queue one, `handle(store, RUN, ref, QueueRun(...))`; a worker then claims it
(`started`, appended with an expectation), runs the echo executor (one live delta, then
`usage_recorded`), appends `succeeded` and acks the work item.

Raw ceiling: the same messages, same payload bytes (real encoded CloudEvents of the same
events), same headers, same stream, with no agentbus code. A work item is published with a
`Nats-Msg-Id` and an expected-last-subject-sequence of 0 on `evt.<ws>.rawrun.<id>.queued`; N
pull consumers (one durable, explicit ack, its own connections) receive it, publish `started`,
`usage_recorded`, the live delta and `succeeded` (each event with a `Nats-Msg-Id` and the
expected last sequence of the run's subjects, as the claim, the usage and the outcome are
appended) and ack the item. Its subjects are `rawrun`, not `run`: the platform's `run-queue`
consumer (`evt.*.run.*.queued`) never sees them. The raw consumers keep pull requests
outstanding and handle each message as it arrives (what newer NATS clients call `consume`).

Figures:

1. **runs/s**: R runs (default 1,500) queued as fast as `--concurrency` queue commands in flight
   allow, timed from the first queue command to the last `succeeded` (seen on a core NATS
   subscription); one measurement per round for the platform and for the raw ceiling, in a
   rotating order, median reported.
2. **queue-to-started latency p50 / p99** (ms): runs queued at a fixed rate, half the measured
   platform throughput, one at a time (open loop); per run, the JetStream timestamp of its
   `started` event minus that of its `queued` event (both stamped by nats-server, read back with
   an ordered consumer afterwards). The raw consumers at the same offered load are shown for
   reference. Latencies have no ceiling.

Every measurement uses a workspace of its own, so counting and reading back see exactly its runs.
The `run-queue` consumer is server-wide: the scenario refuses a server whose run queue has work
or other workers (point `--nats-url` at a disposable server only).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import secrets
import statistics
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.domain.handling import handle
from agentbus.domain.run import RUN, QueueRun
from agentbus.events import AggregateRef, EventContext
from agentbus.events.registry import DomainEvent
from agentbus.events.run import RunQueued, RunStarted, RunSucceeded, RunUsageRecorded
from agentbus.settings import AgentConfig
from agentbus.store.eventstore import EVENTS_STREAM, EventStore, encode_event
from agentbus.workers.queue import RUN_QUEUE, run_queue_config
from agentbus.workers.runs import RunWorker
from benchmarks import Figure, Options
from benchmarks.append import _ReplyInbox, _sequence
from benchmarks.env import Env
from benchmarks.measure import Sample, median_rate

NAME = "runs"
DESCRIPTION = "runs through the queue (echo executor, N RunWorkers) vs raw JetStream queue work"
DEFAULT_RUNS = 1_500
DEFAULT_WARMUP = 200
DEFAULT_WORKERS = 4
DEFAULT_WORKER_CONCURRENCY = 32
LATENCY_LOAD = 0.5
"""The latency figures' offered load, as a share of the platform's measured throughput."""
LATENCY_SHARE = 5
"""A latency measurement queues `runs / LATENCY_SHARE` runs (300 by default)."""
MIN_LATENCY_RUNS = 100
LEASE = 30.0  # the RunWorker default
STALL = 30.0
"""Give up on a measurement when no run ends for this long (a benchmark of nothing)."""
TIMEOUT = 5.0
PULL_EXPIRES = 5.0
"""Seconds a raw pull request waits on the server before it is renewed."""

AGENT = "echo"
AGENTS = {AGENT: AgentConfig(executor="echo", options={"word_delay": 0})}
INPUT = (
    "Could you summarise yesterday's incident report and draft a reply to the customer? "
    "Keep it short and mention that the fix ships on Thursday."
)
QUEUE = QueueRun(agent=AGENT, executor="echo", input=INPUT)

Queue = Callable[[str, int], Coroutine[Any, Any, None]]
"""Queue run number n in workspace ws."""


async def run(env: Env, options: Options) -> list[Figure]:
    workers = options.workers or DEFAULT_WORKERS
    per_worker = options.worker_concurrency or DEFAULT_WORKER_CONCURRENCY
    count = None if options.seconds else (options.events or DEFAULT_RUNS)
    warmup = DEFAULT_WARMUP if options.warmup is None else options.warmup
    store = env.event_store()
    workspaces = (f"{env.workspace}-{n}" for n in itertools.count())

    await _refuse_a_busy_queue(env.nc)

    # --- the platform: what the API / auto-reply does to queue a run ---------------------------

    async def platform_queue(workspace: str, number: int) -> None:
        await handle(store, RUN, AggregateRef(workspace, "run", f"r{number}"), QUEUE)

    # --- raw nats-py -----------------------------------------------------------------------------

    raw = _RawPayloads(env.workspace)
    queue_inbox = _ReplyInbox(env.nc)
    await queue_inbox.start()

    async def raw_queue(workspace: str, number: int) -> None:
        run_id = f"r{number}"
        _sequence(
            await queue_inbox.request(
                raw.subject(workspace, run_id, "queued"),
                raw.queued,
                raw.headers(workspace, run_id, 0),
            )
        )

    contenders: dict[str, tuple[str, Queue]] = {
        "platform": ("run", platform_queue),
        "raw": ("rawrun", raw_queue),
    }

    async def burst(name: str, runs: int | None, seconds: float | None) -> Sample:
        kind, queue = contenders[name]
        return await _burst(
            env.nc, next(workspaces), kind, queue, options.concurrency, runs, seconds
        )

    async with (
        _quiet_logging(),
        _platform_workers(env, workers, per_worker),
        _raw_workers(env, raw, workers, per_worker),
    ):
        try:
            if warmup:
                for name in contenders:
                    await burst(name, warmup, None)
            rates: dict[str, list[Sample]] = {name: [] for name in contenders}
            for _, name in _rotating(list(contenders), options.rounds):
                rates[name].append(await burst(name, count, options.seconds))

            rate = LATENCY_LOAD * median_rate(rates["platform"])
            latency_runs = max(MIN_LATENCY_RUNS, (count or 0) // LATENCY_SHARE)
            latency_seconds = options.seconds
            latencies: dict[str, list[list[float]]] = {name: [] for name in contenders}
            for _, name in _rotating(list(contenders), options.rounds):
                kind, queue = contenders[name]
                latencies[name].append(
                    await _latencies(
                        env.nc,
                        store,
                        next(workspaces),
                        kind,
                        queue,
                        rate,
                        None if latency_seconds else latency_runs,
                        latency_seconds,
                    )
                )
        finally:
            await queue_inbox.stop()

    shape = f"{workers} workers x {per_worker}"
    figures = [
        Figure(
            name=f"runs/s, queue to succeeded, {shape}",
            value=median_rate(rates["platform"]),
            unit="runs/s",
            ceiling_name="raw JetStream: item + 3 appends + delta + ack",
            ceiling_value=median_rate(rates["raw"]),
            samples=_rates(rates["platform"]),
            cpu_us_per_op=_median_cpu(rates["platform"]),
        ),
        Figure(
            name="  raw runs/s",
            value=median_rate(rates["raw"]),
            unit="runs/s",
            samples=_rates(rates["raw"]),
            cpu_us_per_op=_median_cpu(rates["raw"]),
        ),
    ]
    load = f"at {rate:,.0f} runs/s"
    for name, label in (("platform", ""), ("raw", "  raw ")):
        for quantile in (50, 99):
            per_round = tuple(_percentile(values, quantile) for values in latencies[name])
            figures.append(
                Figure(
                    name=f"{label}queue-to-started p{quantile} {load}",
                    value=statistics.median(per_round),
                    unit="ms",
                    samples=per_round,
                )
            )
    return figures


# --------------------------------------------------------------------------- measurements


async def _burst(
    nc: NATS,
    workspace: str,
    kind: str,
    queue: Queue,
    in_flight: int,
    runs: int | None,
    seconds: float | None,
) -> Sample:
    """Queue `runs` runs (or queue for `seconds`), `in_flight` queue commands at a time; time
    from the first queue command to the last run ended."""
    async with _Ended(nc, workspace, kind) as ended:
        numbers: Iterator[int] = iter(range(runs)) if runs is not None else itertools.count()
        deadline = None if seconds is None else time.perf_counter() + seconds
        queued = 0

        async def queuer() -> None:
            nonlocal queued
            for number in numbers:
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                await queue(workspace, number)
                queued += 1

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(queuer() for _ in range(in_flight)))
        last = await ended.wait(queued)
        cpu = time.process_time() - cpu
    return Sample(ops=queued, seconds=last - wall, cpu_seconds=cpu)


async def _latencies(
    nc: NATS,
    store: EventStore,
    workspace: str,
    kind: str,
    queue: Queue,
    rate: float,
    runs: int | None,
    seconds: float | None,
) -> list[float]:
    """Queue runs one at a time at `rate` per second (open loop); the queue-to-started delay
    of each, in ms, from the JetStream timestamps of its `queued` and `started` events."""
    start = await store.last_position() + 1
    loop = asyncio.get_running_loop()
    async with _Ended(nc, workspace, kind) as ended:
        pending: set[asyncio.Task[None]] = set()
        began = loop.time()
        numbers = range(runs) if runs is not None else itertools.count()
        queued = 0
        for number in numbers:
            at = began + number / rate
            if seconds is not None and at - began >= seconds:
                break
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(queue(workspace, number))
            pending.add(task)
            task.add_done_callback(pending.discard)
            queued += 1
        await asyncio.gather(*pending)
        await ended.wait(queued)
    times: dict[str, dict[str, datetime]] = {}
    async for raw in store.read_raw(
        from_position=start,
        subjects=[f"evt.{workspace}.{kind}.*.queued", f"evt.{workspace}.{kind}.*.started"],
    ):
        _, _, _, run_id, event = raw.subject.split(".")
        if raw.time is not None:
            times.setdefault(run_id, {})[event] = raw.time
    delays = [
        (t["started"] - t["queued"]).total_seconds() * 1000
        for t in times.values()
        if "queued" in t and "started" in t
    ]
    if len(delays) != queued:
        raise RuntimeError(f"read back {len(delays)} queued/started pairs of {queued} runs")
    return delays


class _Ended:
    """Counts the runs of one workspace that ended (a core NATS subscription on their outcome
    subjects); any outcome but `succeeded` aborts the measurement."""

    def __init__(self, nc: NATS, workspace: str, kind: str) -> None:
        self._nc = nc
        self._prefix = f"evt.{workspace}.{kind}.*"
        self._succeeded = 0
        self._failed: list[str] = []
        self._last = time.perf_counter()
        self._changed = asyncio.Event()

    async def __aenter__(self) -> _Ended:
        self._subs = [
            await self._nc.subscribe(f"{self._prefix}.{outcome}", cb=self._on_outcome)
            for outcome in ("succeeded", "failed", "timed_out", "cancelled")
        ]
        await self._nc.flush()
        return self

    async def __aexit__(self, *_: object) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_outcome(self, msg: Msg) -> None:
        self._last = time.perf_counter()
        if msg.subject.endswith(".succeeded"):
            self._succeeded += 1
        else:
            self._failed.append(msg.subject)
        self._changed.set()

    async def wait(self, runs: int) -> float:
        """Wait until `runs` runs succeeded; return when the last one did (perf_counter)."""
        while self._succeeded < runs:
            if self._failed:
                raise RuntimeError(f"{len(self._failed)} runs did not succeed: {self._failed[:3]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), STALL)
            except TimeoutError:
                raise RuntimeError(
                    f"{self._succeeded} of {runs} runs succeeded, none in the last {STALL:g} s"
                ) from None
        return self._last


# --------------------------------------------------------------------------- the platform


@asynccontextmanager
async def _platform_workers(env: Env, count: int, concurrency: int) -> AsyncIterator[None]:
    """`count` RunWorkers, each with its own connection and EventStore, until the end."""
    stop = asyncio.Event()
    pool = []
    for number in range(count):
        nc = await env.connect(f"agentbus-bench-worker-{number}")
        pool.append(
            RunWorker(
                env.event_store(nc),
                nc,
                AGENTS,
                name=f"bench-w{number}",
                concurrency=concurrency,
                lease=LEASE,
            )
        )
    tasks = [asyncio.create_task(worker.run(stop)) for worker in pool]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def _refuse_a_busy_queue(nc: NATS) -> None:
    """The run-queue consumer is server-wide: refuse a server where it has work or workers
    (an external server given with --nats-url that is not disposable)."""
    info = await _consumer_info(nc, RUN_QUEUE)
    if info is None:
        await _create_consumer(nc, run_queue_config(LEASE))
        info = await _consumer_info(nc, RUN_QUEUE)
    busy = {
        key: (info or {}).get(key, 0) for key in ("num_pending", "num_ack_pending", "num_waiting")
    }
    if any(busy.values()):
        raise RuntimeError(
            f"the server's {RUN_QUEUE} consumer is in use ({busy}): the runs scenario would "
            "execute other runs and compete with other workers; use a disposable server"
        )


async def _consumer_info(nc: NATS, durable: str) -> dict[str, Any] | None:
    reply = await nc.request(f"$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{durable}", b"", TIMEOUT)
    info: dict[str, Any] = orjson.loads(reply.data)
    if "error" in info:
        if info["error"].get("code") == 404:
            return None
        raise RuntimeError(f"consumer info of {durable}: {info['error']}")
    return info


async def _create_consumer(nc: NATS, config: dict[str, object]) -> None:
    body = orjson.dumps({"stream_name": EVENTS_STREAM, "config": config})
    name = config["durable_name"]
    reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{name}", body, TIMEOUT)
    answer = orjson.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(f"cannot create consumer {name}: {answer['error']}")


class _Discard(io.StringIO):
    """A text file that forgets what is written to it."""

    def write(self, text: str) -> int:
        return len(text)


@asynccontextmanager
async def _quiet_logging() -> AsyncIterator[None]:
    """Workers log two lines per run at INFO: render them as production does (JSON), into
    /dev/null; warnings and errors still reach stderr."""

    def warnings_to_stderr(
        _: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if method in ("warning", "error", "exception", "critical"):
            print(orjson.dumps(event, default=str).decode(), file=sys.stderr)
        return event

    saved = structlog.get_config()
    with _Discard() as devnull:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                warnings_to_stderr,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(20),  # INFO
            logger_factory=structlog.PrintLoggerFactory(file=devnull),
            cache_logger_on_first_use=False,
        )
        try:
            yield
        finally:
            structlog.configure(**saved)


# --------------------------------------------------------------------------- raw nats-py


class _RawPayloads:
    """The raw side's messages: real encoded CloudEvents of the run's events (same bytes as the
    platform's, give or take ids and times), unique message ids, the expectation headers."""

    def __init__(self, workspace: str) -> None:
        ref = AggregateRef(workspace, "run", "r1000000")

        def encoded(event: DomainEvent) -> bytes:
            return encode_event(ref, event, secrets.token_hex(16), EventContext.DEFAULT)

        reply = f"echo: {INPUT}"
        self.queued = encoded(
            RunQueued(agent=AGENT, executor="echo", input=INPUT, max_attempts=QUEUE.max_attempts)
        )
        self.started = encoded(RunStarted(attempt=1, worker="bench-raw0"))
        self.usage = encoded(
            RunUsageRecorded(model="echo", tokens_in=len(INPUT.split()), tokens_out=22)
        )
        self.succeeded = encoded(RunSucceeded(attempt=1, output=reply))
        self.delta = orjson.dumps(
            {"run_id": "r1000000", "attempt": 1, "seq": 1, "type": "delta", "text": reply}
        )
        self._prefix = f"{secrets.token_hex(12)}-"
        self._numbers = itertools.count()

    @staticmethod
    def subject(workspace: str, run_id: str, event: str) -> str:
        return f"evt.{workspace}.rawrun.{run_id}.{event}"

    def headers(self, workspace: str, run_id: str, expected: int) -> dict[str, str]:
        return {
            "Nats-Msg-Id": f"{self._prefix}{next(self._numbers)}",
            "Nats-Expected-Last-Subject-Sequence": str(expected),
            "Nats-Expected-Last-Subject-Sequence-Subject": f"evt.{workspace}.rawrun.{run_id}.*",
        }


@asynccontextmanager
async def _raw_workers(
    env: Env, raw: _RawPayloads, count: int, concurrency: int
) -> AsyncIterator[None]:
    """A durable pull consumer of raw work items and `count` consumers on it, each with its own
    connection, `concurrency` items at a time; the consumer is deleted at the end."""
    durable = f"rawbench-{env.workspace}"
    await _create_consumer(
        env.nc,
        {
            **run_queue_config(LEASE),
            "durable_name": durable,
            "description": "agentbus benchmark: raw run queue",
            "filter_subject": "evt.*.rawrun.*.queued",
            "deliver_policy": "new",
        },
    )
    consumers = []
    try:
        for number in range(count):
            nc = await env.connect(f"agentbus-bench-raw-{number}")
            inbox = _ReplyInbox(nc)
            await inbox.start()
            consumer = _StreamingPull(nc, durable, concurrency, _raw_handler(nc, inbox, raw))
            await consumer.start()
            consumers.append((consumer, inbox))
        yield
    finally:
        for consumer, inbox in consumers:
            await consumer.stop()
            await inbox.stop()
        with contextlib.suppress(Exception):
            await env.nc.request(f"$JS.API.CONSUMER.DELETE.{EVENTS_STREAM}.{durable}", b"", TIMEOUT)


def _raw_handler(
    nc: NATS, inbox: _ReplyInbox, raw: _RawPayloads
) -> Callable[[Msg], Awaitable[None]]:
    async def handle_item(msg: Msg) -> None:
        _, workspace, _, run_id, _ = msg.subject.split(".")
        position = msg.metadata.sequence.stream

        async def append(event: str, payload: bytes, expected: int) -> int:
            subject = raw.subject(workspace, run_id, event)
            return _sequence(
                await inbox.request(subject, payload, raw.headers(workspace, run_id, expected))
            )

        position = await append("started", raw.started, position)
        position = await append("usage_recorded", raw.usage, position)
        await nc.publish(f"live.{workspace}.rawrun.{run_id}.delta", raw.delta)
        await append("succeeded", raw.succeeded, position)
        await msg.ack()

    return handle_item


class _StreamingPull:
    """A pull consumer that keeps up to `capacity` messages requested or in hand, and handles
    each message as soon as it arrives (what newer NATS clients call `consume`): pull requests
    are renewed when they expire or when enough capacity is free."""

    def __init__(
        self, nc: NATS, durable: str, capacity: int, handler: Callable[[Msg], Awaitable[None]]
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}"
        self._capacity = capacity
        self._batch = max(1, capacity // 4)
        self._handler = handler
        self._requested = 0  # asked for, not delivered yet
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        await self._top_up()

    async def stop(self) -> None:
        await self._sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _top_up(self) -> None:
        free = self._capacity - len(self._tasks) - self._requested
        if free >= self._batch or (free > 0 and self._requested == 0):
            self._requested += free
            request = {"batch": free, "expires": int(PULL_EXPIRES * 1e9)}
            await self._nc.publish(self._next, orjson.dumps(request), reply=self._inbox)

    async def _on_message(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is not None:
            if status in ("408", "409"):  # a pull request expired or ended: renew
                self._requested -= int((msg.headers or {}).get("Nats-Pending-Messages", 0))
                await self._top_up()
            return
        self._requested -= 1
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._handler(msg)
        except Exception as exc:  # the run never ends: the measurement reports the stall
            print(f"raw work item {msg.subject} failed: {exc!r}", file=sys.stderr)
        finally:
            self._tasks.discard(asyncio.current_task())
            await self._top_up()


# --------------------------------------------------------------------------- helpers


def _rotating(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """Every name once per round, in a rotating order (see measure.py for why)."""
    for index in range(rounds):
        shift = index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            yield index, name


def _percentile(values: Sequence[float], quantile: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(quantile / 100 * (len(ordered) - 1)))]


def _rates(samples: Sequence[Sample]) -> tuple[float, ...]:
    return tuple(s.per_second for s in samples)


def _median_cpu(samples: Sequence[Sample]) -> float:
    return statistics.median(s.cpu_us_per_op for s in samples)
