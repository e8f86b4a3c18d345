"""Scenario `append`: concurrent single-event appends through `EventStore.append`, beside raw
nats-py JetStream publishing of the same payloads with the same headers to the same stream.

Two shapes, each compared with the raw publish of the same shape:

- new aggregate: every append creates an aggregate (`expect=NO_EVENTS`);
- existing aggregate: each worker keeps appending to its own aggregate with
  `Expect.at(last position)`, as a chat session receiving messages does.

Every platform append builds its `AggregateRef` (validated, as a command handler does) and
carries what invariant 2 requires: a `Nats-Msg-Id` (a fresh UUIDv7) and the
expected-last-subject-sequence headers. The raw publishes carry the same three headers and the
same payload bytes (a real encoded CloudEvent), so nats-server does the same work; the
difference is what agentbus does in Python. Three raw ways are measured and the fastest is the
ceiling:

- `nc.request(subject, payload, headers=...)`;
- `js.publish(subject, payload, headers=...)`;
- `nc.publish(subject, payload, reply=<inbox>.<n>, headers=...)` with one wildcard reply
  subscription and a future per publish: what `nc.request` does, minus its per-call setup.
  Written here in plain nats-py, independently of the store's own code.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable, Sequence

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.events import AggregateRef, EventContext, uuid7
from agentbus.events.session import MessageReceived
from agentbus.store import NO_EVENTS, Expect
from agentbus.store.eventstore import encode_event
from benchmarks import Figure, Options
from benchmarks.env import Env
from benchmarks.measure import Contender, Op, Sample, Workers, measure_rounds, median_rate

NAME = "append"
DESCRIPTION = "single-event appends (msg id + expectation) vs raw JetStream publish"
GOAL = 0.8
DEFAULT_EVENTS = 10_000
DEFAULT_WARMUP = 2_000
TIMEOUT = 5.0  # the EventStore's default

EVENT = MessageReceived(
    message_id="msg-0001",
    author="user:ada",
    text="Could you summarise yesterday's incident report and draft a reply to the customer? "
    "Keep it short and mention that the fix ships on Thursday.",
)

Publish = Callable[[str, bytes, dict[str, str]], Awaitable[int]]
"""A raw way to publish: subject, payload, headers -> the stream sequence of the PubAck."""


async def run(env: Env, options: Options) -> list[Figure]:
    store = env.event_store()
    workspace = env.workspace
    numbers = itertools.count()  # aggregate ids and raw message ids: unique within the run

    # --- the platform ----------------------------------------------------------------------

    def platform_new(n: int) -> Sequence[Op]:
        async def op() -> None:
            ref = AggregateRef(workspace, "session", f"p{next(numbers)}")
            await store.append(ref, [EVENT], expect=NO_EVENTS)

        return [op] * n

    def platform_existing(n: int) -> Sequence[Op]:
        def worker() -> Op:
            ref = AggregateRef(workspace, "session", f"p{next(numbers)}")
            last = 0

            async def op() -> None:
                nonlocal last
                result = await store.append(ref, [EVENT], expect=Expect.at(last))
                last = result.last_position

            return op

        return [worker() for _ in range(n)]

    # --- raw nats-py -------------------------------------------------------------------------

    payload = encode_event(
        AggregateRef(workspace, "session", "p1000000"), EVENT, uuid7(), EventContext.DEFAULT
    )
    subject_of = f"evt.{workspace}.session.{{}}.{EVENT.kind.name}".format
    filter_of = f"evt.{workspace}.session.{{}}.*".format
    msg_id_prefix = f"{secrets.token_hex(12)}-"  # + a number: about a UUID's length

    def headers(aggregate: str, expected: int) -> dict[str, str]:
        return {
            "Nats-Msg-Id": f"{msg_id_prefix}{next(numbers)}",
            "Nats-Expected-Last-Subject-Sequence": str(expected),
            "Nats-Expected-Last-Subject-Sequence-Subject": filter_of(aggregate),
        }

    def raw_new(publish: Publish) -> Workers:
        def workers(n: int) -> Sequence[Op]:
            async def op() -> None:
                aggregate = f"r{next(numbers)}"
                await publish(subject_of(aggregate), payload, headers(aggregate, 0))

            return [op] * n

        return workers

    def raw_existing(publish: Publish) -> Workers:
        def workers(n: int) -> Sequence[Op]:
            def worker() -> Op:
                aggregate = f"r{next(numbers)}"
                subject = subject_of(aggregate)
                last = 0

                async def op() -> None:
                    nonlocal last
                    last = await publish(subject, payload, headers(aggregate, last))

                return op

            return [worker() for _ in range(n)]

        return workers

    js = env.nc.jetstream(timeout=TIMEOUT)
    replies = _ReplyInbox(env.nc)
    await replies.start()

    async def nc_request(subject: str, data: bytes, hdrs: dict[str, str]) -> int:
        return _sequence(await env.nc.request(subject, data, timeout=TIMEOUT, headers=hdrs))

    async def js_publish(subject: str, data: bytes, hdrs: dict[str, str]) -> int:
        return (await js.publish(subject, data, timeout=TIMEOUT, headers=hdrs)).seq

    async def publish_reply_inbox(subject: str, data: bytes, hdrs: dict[str, str]) -> int:
        return _sequence(await replies.request(subject, data, hdrs))

    raw_ways: dict[str, Publish] = {
        "nc.request": nc_request,
        "js.publish": js_publish,
        "nc.publish + reply inbox": publish_reply_inbox,
    }

    # --- measure -----------------------------------------------------------------------------

    shapes = {
        "new aggregate, expect=NO_EVENTS": (platform_new, raw_new),
        "existing aggregate, Expect.at(last)": (platform_existing, raw_existing),
    }
    contenders: list[Contender] = []
    for shape, (platform, raw) in shapes.items():
        contenders.append(Contender(f"platform|{shape}", platform))
        contenders += [Contender(f"{way}|{shape}", raw(send)) for way, send in raw_ways.items()]
    try:
        results = await measure_rounds(
            contenders,
            rounds=options.rounds,
            concurrency=options.concurrency,
            count=None if options.seconds else (options.events or DEFAULT_EVENTS),
            seconds=options.seconds,
            warmup=DEFAULT_WARMUP if options.warmup is None else options.warmup,
        )
    finally:
        await replies.stop()

    figures = [_platform_figure(shape, results, list(raw_ways)) for shape in shapes]
    figures += [
        Figure(
            name=f"  raw {way}, {shape.split(',')[0]}",
            value=median_rate(results[f"{way}|{shape}"]),
            unit="publishes/s",
            samples=_rates(results[f"{way}|{shape}"]),
            cpu_us_per_op=_median_cpu(results[f"{way}|{shape}"]),
        )
        for shape in shapes
        for way in raw_ways
    ]
    return figures


def _platform_figure(shape: str, results: dict[str, list[Sample]], ways: list[str]) -> Figure:
    raw = {way: median_rate(results[f"{way}|{shape}"]) for way in ways}
    fastest = max(raw, key=raw.__getitem__)
    samples = results[f"platform|{shape}"]
    return Figure(
        name=f"append, {shape}",
        value=median_rate(samples),
        unit="appends/s",
        ceiling_name=f"raw {fastest} (fastest raw)",
        ceiling_value=raw[fastest],
        goal=GOAL,
        samples=_rates(samples),
        cpu_us_per_op=_median_cpu(samples),
    )


def _rates(samples: Sequence[Sample]) -> tuple[float, ...]:
    return tuple(s.per_second for s in samples)


def _median_cpu(samples: Sequence[Sample]) -> float:
    return sorted(s.cpu_us_per_op for s in samples)[len(samples) // 2]


def _sequence(reply: Msg) -> int:
    """The stream sequence of a PubAck. Raises on an error reply (or on no reply at all): a
    benchmark of refused publishes would measure nothing."""
    ack = orjson.loads(reply.data)
    if "error" in ack:
        raise RuntimeError(f"JetStream refused a raw publish: {ack['error']}")
    return int(ack["seq"])


class _ReplyInbox:
    """Request/reply on one wildcard reply subscription, in plain nats-py: publish with a reply
    subject, resolve a future when the answer arrives, give up after the timeout."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._numbers = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        await self._sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(self, subject: str, data: bytes, hdrs: dict[str, str]) -> Msg:
        inbox = f"{self._prefix}.{next(self._numbers)}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[inbox] = future
        try:
            await self._nc.publish(subject, data, reply=inbox, headers=hdrs)
            async with asyncio.timeout(TIMEOUT):
                return await future
        finally:
            del self._waiting[inbox]
