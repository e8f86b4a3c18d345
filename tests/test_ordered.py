"""The ordered reader every store read goes through, against a nats-server of its own: order,
filters, positions and pending counts; a consumer that goes away or loses a delivery is
re-created from the next position with nothing lost or repeated; a full buffer holds the
server back; other subscriptions on the connection are untouched. And the store's replies,
taken from the same tap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.api import StreamConfig

from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store.eventstore import _Replies
from agentbus.store.ordered import Delivery, OrderedReader, tap

from .conftest import connect, eventually

STREAM = "SCRATCH"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, NATS]]:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    nc = await connect(server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["s.>"]))
        yield server, nc
    finally:
        await nc.close()
        server.stop()


@pytest.fixture
def client(served: tuple[EmbeddedNats, NATS]) -> NATS:
    return served[1]


async def publish(nc: NATS, subjects: list[str], size: int = 16) -> None:
    js = nc.jetstream()
    acks = [
        await js.publish_async(subject, f"{n:0{size}d}".encode())
        for n, subject in enumerate(subjects, 1)
    ]
    await asyncio.gather(*acks)


def reader(nc: NATS, subjects: list[str], start: int = 1, **options: float) -> OrderedReader:
    settings = {"limit": 1024, "heartbeat": 0.2, "inactive": 1.0, "timeout": 5.0, **options}
    return OrderedReader(
        nc,
        STREAM,
        subjects,
        start,
        limit=int(settings["limit"]),
        heartbeat=settings["heartbeat"],
        inactive=settings["inactive"],
        timeout=settings["timeout"],
    )


async def read(ordered: OrderedReader, count: int, timeout: float = 10.0) -> list[Delivery]:
    """`count` deliveries, taken as they come."""
    got: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got += ordered.take(100)
            if len(got) < count:
                await ordered.wait(1.0)
    return got


async def test_deliveries_come_in_order_with_position_subject_time_and_pending(
    client: NATS,
) -> None:
    await publish(client, [f"s.{'ab'[n % 2]}" for n in range(300)])
    ordered = reader(client, ["s.a"], start=11)
    try:
        assert await ordered.start() == 145  # the s.a messages at positions 11 and after
        got = await read(ordered, 145)
    finally:
        await ordered.close()
    assert [position for position, *_ in got] == list(range(11, 300, 2))
    assert {subject for _, subject, *_ in got} == {b"s.a"}
    assert [data for _, _, data, *_ in got] == [f"{n:016d}".encode() for n in range(11, 300, 2)]
    assert [pending for *_, pending in got] == list(range(144, -1, -1))
    assert all(abs(stamp / 1e9 - time.time()) < 60 for _, _, _, stamp, _ in got)
    assert ordered.restarts == 0


async def test_several_filters_and_an_empty_read(client: NATS) -> None:
    await publish(client, ["s.a", "s.b", "s.c"] * 10)
    ordered = reader(client, ["s.a", "s.c"])
    nothing = reader(client, ["s.none"])
    try:
        assert await ordered.start() == 20
        got = await read(ordered, 20)
        assert await nothing.start() == 0
        assert not await nothing.wait(0.3)
    finally:
        await ordered.close()
        await nothing.close()
    assert [subject for _, subject, *_ in got] == [b"s.a", b"s.c"] * 10


async def test_a_consumer_deleted_under_the_reader_is_recreated_from_the_next_position(
    client: NATS,
) -> None:
    await publish(client, ["s.a"] * 50)
    ordered = reader(client, ["s.a"])
    try:
        await ordered.start()
        first = await read(ordered, 50)
        [consumer] = await client.jetstream().consumers_info(STREAM)
        await client.jetstream().delete_consumer(STREAM, consumer.name)
        await publish(client, ["s.a"] * 30)
        # Silence for two heartbeat intervals: re-created from position 51.
        rest = await read(ordered, 30)
        await publish(client, ["s.a"] * 5)
        more = await read(ordered, 5)
    finally:
        await ordered.close()
    assert [position for position, *_ in first + rest + more] == list(range(1, 86))
    assert ordered.restarts == 1


async def test_a_lost_delivery_recreates_the_consumer_with_nothing_skipped_or_repeated(
    client: NATS,
) -> None:
    await publish(client, ["s.a"] * 40)
    ordered = reader(client, ["s.a"])
    try:
        await ordered.start()
        first = await read(ordered, 40)
        # A delivery out of step (as if delivery 41 was lost): ignored, and the consumer is
        # re-created from the position after the last one taken in.
        answer = ordered.receive(b"s.a", b"$JS.ACK.SCRATCH.gone.1.99.42.1.0", b"late", None)
        assert answer is None
        await publish(client, ["s.a"] * 10)
        rest = await read(ordered, 10)
    finally:
        await ordered.close()
    assert [position for position, *_ in first + rest] == list(range(1, 51))
    assert b"late" not in [data for _, _, data, *_ in rest]
    assert ordered.restarts == 1


async def test_a_reader_follows_across_a_nats_server_restart(
    served: tuple[EmbeddedNats, NATS],
) -> None:
    server, client = served
    await publish(client, ["s.a"] * 20)
    ordered = reader(client, ["s.a"])
    try:
        await ordered.start()
        got = await read(ordered, 20)
        server.port = int(server.url.rsplit(":", 1)[1])
        server.stop()
        server.start()  # the same port and store: the stream is back, the consumer is not
        last = await eventually(lambda: _published(client), "publishing after the restart", 15)
        async with asyncio.timeout(20):
            while got[-1][0] < last:
                got += ordered.take(100)
                await ordered.wait(1.0)
    finally:
        await ordered.close()
    assert [position for position, *_ in got] == list(range(1, last + 1))
    assert ordered.restarts >= 1


async def _published(client: NATS) -> int:
    """The position of one more message, or 0 while the client has not reconnected (a
    publish that timed out may have landed: the reader must deliver it all the same)."""
    try:
        ack = await client.jetstream().publish("s.a", b"again", timeout=0.5)
    except Exception:  # not reconnected yet
        return 0
    return ack.seq


async def test_a_full_buffer_holds_the_server_back_until_the_caller_takes(client: NATS) -> None:
    await publish(client, ["s.a"] * 20_000, size=1024)  # ~20 MB
    ordered = reader(client, ["s.a"], limit=100)
    try:
        await ordered.start()
        # Nothing taken: flow control stops the server well short of everything.
        held = await eventually(lambda: _settled(ordered), "the buffer to stop growing")
        assert 100 <= held < 10_000
        got = await read(ordered, 20_000, timeout=30.0)
    finally:
        await ordered.close()
    assert [position for position, *_ in got] == list(range(1, 20_001))
    assert ordered.restarts == 0


async def _settled(ordered: OrderedReader) -> int:
    before = len(ordered._buffer)
    await asyncio.sleep(0.5)
    after = len(ordered._buffer)
    return after if after and after == before else 0


async def test_other_subscriptions_on_the_connection_are_untouched(client: NATS) -> None:
    await publish(client, ["s.a"] * 10)
    seen: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await seen.put(msg.data)

    plain = await client.subscribe("plain", cb=on_message)
    ordered = reader(client, ["s.a"])
    try:
        await ordered.start()
        await client.publish("plain", b"hello")
        reply = await client.jetstream().stream_info(STREAM)  # a request/reply meanwhile
        assert await asyncio.wait_for(seen.get(), 5) == b"hello"
        assert len(await read(ordered, 10)) == reply.state.messages
    finally:
        await ordered.close()
        await plain.unsubscribe()


def test_a_changed_nats_py_hook_fails_loudly() -> None:
    class Changed(NATS):
        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes) -> None:  # type: ignore[override]
            return None

    with pytest.raises(RuntimeError, match=r"nats-py .* changed Client\._process_msg"):
        tap(Changed())


async def test_store_replies_take_plain_replies_from_the_tap_and_statuses_from_nats_py(
    client: NATS,
) -> None:
    """`_Replies` (the store's appends): a reply without headers (a PubAck) is taken from the
    tap, never reaching nats-py's subscription; a no-responders status still raises; a
    request nobody answers gives up at its deadline."""

    async def answer(msg: Msg) -> None:  # as JetStream answers: no headers
        await client.publish(msg.reply, b"ack:" + msg.data)

    async def ignore(msg: Msg) -> None:
        return None

    responder = await client.subscribe("answering", cb=answer)
    silent = await client.subscribe("silent", cb=ignore)
    replies = _Replies(client)
    through_nats_py: list[str] = []
    on_reply = replies._on_reply

    async def counted(msg: Msg) -> None:
        through_nats_py.append(msg.subject)
        await on_reply(msg)

    replies._on_reply = counted  # type: ignore[method-assign]
    try:
        got = await asyncio.gather(
            *(replies.request("answering", str(n).encode(), {"a": "b"}, 2.0) for n in range(50))
        )
        assert got == [f"ack:{n}".encode() for n in range(50)]
        assert through_nats_py == []
        assert replies._waiting == {}

        with pytest.raises(NoRespondersError):
            await replies.request("nobody.listens", b"x", {"a": "b"}, 2.0)
        assert len(through_nats_py) == 1  # the status went through nats-py's subscription

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await replies.request("silent", b"x", {"a": "b"}, 0.2)
        assert 0.15 < time.monotonic() - started < 1.5
        assert replies._waiting == {}

        # Deadlines are kept by one sweep, not a timer per request: each request gives up
        # at its own deadline (within a sweep's interval), answered ones are not disturbed,
        # and the sweep stops once nothing waits.
        async def timed(subject: str, timeout: float) -> tuple[str, float]:
            began = time.monotonic()
            try:
                await replies.request(subject, b"x", {"a": "b"}, timeout)
            except TimeoutError:
                return "timeout", time.monotonic() - began
            return "answered", time.monotonic() - began

        short, answered, long = await asyncio.gather(
            timed("silent", 0.2), timed("answering", 2.0), timed("silent", 0.8)
        )
        assert short[0] == "timeout"
        assert 0.15 < short[1] < 1.0
        assert answered[0] == "answered"
        assert answered[1] < 1.0
        assert long[0] == "timeout"
        assert 0.75 < long[1] < 2.0
        assert long[1] - short[1] > 0.4  # each at its own deadline
        await asyncio.sleep(0.3)
        assert replies._waiting == {}
        assert replies._sweeper is None
    finally:
        await responder.unsubscribe()
        await silent.unsubscribe()
