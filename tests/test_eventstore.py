"""The event store against a real nats-server: appends, expectations, atomic batches,
de-duplication, validation, reads, and behaviour while NATS is down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NATS

from agentbus.errors import ConcurrencyConflict, InvalidEvent, StoreUnavailable, StreamNotFound
from agentbus.events import AggregateRef, CloudEvent, EventContext
from agentbus.events.catalog import default_registry
from agentbus.events.session import MessageReceived, MessageSent, SessionClosed, SessionOpened
from agentbus.events.workspace import WorkspaceCreated
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store import ANY, NO_EVENTS, EventStore, Expect
from agentbus.store.eventstore import MAX_BATCH

from .conftest import apply_project_streams, connect


def session(workspace: str, sid: str = "s1") -> AggregateRef:
    return AggregateRef(workspace, "session", sid)


def message(n: int) -> MessageReceived:
    return MessageReceived(message_id=f"m{n}", author="ada", text=f"hello {n}")


async def test_append_and_load_round_trip(store: EventStore, workspace: str) -> None:
    ref = session(workspace)
    context = EventContext(actor="user:ada", correlationid="corr-1", traceparent="00-abc-def-01")
    result = await store.append(
        ref, [SessionOpened(channel="web", title="Hi")], expect=NO_EVENTS, context=context
    )
    assert not result.duplicate
    assert len(result.positions) == 1

    history = await store.load(ref)
    assert history.last_position == result.last_position
    [recorded] = history.events
    assert recorded.position == result.last_position
    assert recorded.subject == f"evt.{workspace}.session.s1.opened"
    assert recorded.event == SessionOpened(channel="web", title="Hi")
    envelope = recorded.envelope
    assert envelope.specversion == "1.0"
    assert envelope.type == "agentbus.session.opened.v1"
    assert envelope.subject == "session/s1"
    assert envelope.workspace == workspace
    assert envelope.id == result.event_ids[0]
    assert (envelope.actor, envelope.correlationid, envelope.traceparent) == (
        "user:ada",
        "corr-1",
        "00-abc-def-01",
    )
    assert envelope.time.tzinfo is not None


async def test_empty_aggregate_loads_as_position_zero(store: EventStore, workspace: str) -> None:
    history = await store.load(session(workspace, "never"))
    assert history.events == ()
    assert history.last_position == 0


async def test_several_events_land_atomically_with_contiguous_positions(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    events = [SessionOpened(channel="api"), message(1), message(2), SessionClosed(reason="done")]
    result = await store.append(ref, events, expect=NO_EVENTS)
    first = result.positions[0]
    assert result.positions == (first, first + 1, first + 2, first + 3)
    history = await store.load(ref)
    assert [e.event for e in history.events] == events
    assert [e.position for e in history.events] == list(result.positions)


async def test_exact_expectation_succeeds_then_stale_one_conflicts(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    first = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    second = await store.append(ref, [message(1)], expect=Expect.at(first.last_position))
    with pytest.raises(ConcurrencyConflict) as conflict:
        await store.append(ref, [message(2)], expect=Expect.at(first.last_position))
    assert conflict.value.actual == second.last_position
    assert conflict.value.expected == first.last_position
    assert str(second.last_position) in str(conflict.value)


async def test_fifty_concurrent_appends_with_the_same_expectation_one_wins(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    outcomes = await asyncio.gather(
        *(store.append(ref, [message(n)], expect=NO_EVENTS) for n in range(50)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    conflicts = [o for o in outcomes if isinstance(o, ConcurrencyConflict)]
    assert len(winners) == 1
    assert len(conflicts) == 49
    assert {c.actual for c in conflicts} == {winners[0].last_position}
    assert len((await store.load(ref)).events) == 1


async def test_multi_event_append_whose_expectation_fails_stores_none(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    before = await store.last_position()
    with pytest.raises(ConcurrencyConflict):
        await store.append(ref, [message(1), message(2), message(3)], expect=NO_EVENTS)
    assert await store.last_position() == before
    assert [type(e.event) for e in (await store.load(ref)).events] == [SessionOpened]


async def test_retry_with_same_ids_is_a_duplicate_with_original_positions(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    opened = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    # retried with its expectation: nats-server reports "wrong last sequence" first
    again = await store.append(
        ref, [SessionOpened(channel="web")], expect=NO_EVENTS, event_ids=opened.event_ids
    )
    assert again.duplicate
    assert again.positions == opened.positions

    # a batch retried, with and without its expectation
    batch = [message(1), message(2), message(3)]
    first = await store.append(ref, batch, expect=Expect.at(opened.last_position))
    for expect in (Expect.at(opened.last_position), ANY):
        retry = await store.append(ref, batch, expect=expect, event_ids=first.event_ids)
        assert retry.duplicate
        assert retry.positions == first.positions

    # single event, no expectation: JetStream's own duplicate window answers
    sent = MessageSent(message_id="m9", author="agent", text="hi")
    one = await store.append(ref, [sent], event_ids=["fixed-id-1"])
    two = await store.append(ref, [sent], event_ids=["fixed-id-1"])
    assert two.duplicate
    assert two.positions == one.positions
    assert len((await store.load(ref)).events) == 5


async def test_ids_reused_by_different_events_are_refused(
    store: EventStore, workspace: str
) -> None:
    ref = session(workspace)
    first = await store.append(ref, [SessionOpened(channel="web"), message(1)], expect=NO_EVENTS)
    with pytest.raises(InvalidEvent, match="already used"):
        await store.append(
            ref,
            [message(2), message(3)],
            expect=Expect.at(0),
            event_ids=[first.event_ids[1], "brand-new-id"],
        )
    assert len((await store.load(ref)).events) == 2


@pytest.mark.parametrize(
    ("workspace_token", "aggregate_id"),
    [
        ("acme.evil", "s1"),
        ("acme", "s1.opened"),
        ("acme", "*"),
        ("acme", ">"),
        ("ac me", "s1"),
        ("acme", "s\t1"),
        ("", "s1"),
        ("acme", ""),
        ("acme", "x" * 65),
        ("ácme", "s1"),
    ],
)
async def test_invalid_subject_tokens_are_rejected_before_publishing(
    workspace_token: str, aggregate_id: str
) -> None:
    with pytest.raises(InvalidEvent) as error:
        AggregateRef(workspace_token, "session", aggregate_id)
    assert "workspace" in str(error.value) or "session id" in str(error.value)


async def test_invalid_appends_publish_nothing(store: EventStore, nc: NATS, workspace: str) -> None:
    seen: list[str] = []

    async def record(msg: object) -> None:
        seen.append(getattr(msg, "subject", ""))

    sub = await nc.subscribe("evt.>", cb=record)
    before = await store.last_position()
    ref = session(workspace)
    bad_calls = [
        store.append(ref, []),
        store.append(ref, [WorkspaceCreated(display_name="x")]),  # wrong aggregate kind
        store.append(ref, [message(1)] * (MAX_BATCH + 1)),
        store.append(ref, [message(1), message(2)], event_ids=["same", "same"]),
        store.append(ref, [message(1)], event_ids=["has space"]),
        store.append(ref, [message(1)], event_ids=["a", "b"]),
        store.append(ref, [{"not": "an event"}]),  # type: ignore[list-item]
    ]
    for call in bad_calls:
        with pytest.raises(InvalidEvent):
            await call
    await nc.flush()
    await asyncio.sleep(0.1)
    await sub.unsubscribe()
    assert seen == []
    assert await store.last_position() == before


async def test_invalid_event_data_never_becomes_an_event() -> None:
    with pytest.raises(ValueError, match="text"):
        MessageReceived(message_id="m1", author="ada", text="")
    with pytest.raises(ValueError, match="extra"):
        MessageReceived(message_id="m1", author="ada", text="x", mood="happy")  # type: ignore[call-arg]


async def test_read_everything_from_a_position_with_filters(
    store: EventStore, workspace: str
) -> None:
    a, b = session(workspace, "a"), session(workspace, "b")
    ra = await store.append(a, [SessionOpened(channel="web"), message(1)], expect=NO_EVENTS)
    rb = await store.append(b, [SessionOpened(channel="api")], expect=NO_EVENTS)
    ra2 = await store.append(a, [message(2)], expect=Expect.at(ra.last_position))

    everything = [e async for e in store.read(subjects=[f"evt.{workspace}.>"])]
    assert [e.position for e in everything] == [*ra.positions, *rb.positions, *ra2.positions]

    only_a = [e.position async for e in store.read(subjects=[a.filter])]
    assert only_a == [*ra.positions, *ra2.positions]

    from_second = [
        e.position async for e in store.read(from_position=ra.positions[1], subjects=[a.filter])
    ]
    assert from_second == [ra.positions[1], *ra2.positions]

    bounded = [
        e.position
        async for e in store.read(subjects=[f"evt.{workspace}.>"], to_position=rb.last_position)
    ]
    assert bounded == [*ra.positions, *rb.positions]

    # The bound falls on an event the filter does not keep: nothing after it comes through.
    bounded_filtered = [
        e.position async for e in store.read(subjects=[a.filter], to_position=rb.last_position)
    ]
    assert bounded_filtered == list(ra.positions)

    two_filters = [
        e.position
        async for e in store.read(
            subjects=[f"evt.{workspace}.session.a.message_received", b.filter]
        )
    ]
    assert two_filters == [ra.positions[1], *rb.positions, *ra2.positions]

    nothing = [e async for e in store.read(subjects=[f"evt.{workspace}.run.>"])]
    assert nothing == []


async def test_follow_yields_events_appended_later(store: EventStore, workspace: str) -> None:
    ref = session(workspace)
    start = await store.last_position() + 1
    received: list[int] = []

    async def follow() -> None:
        async for event in store.read(from_position=start, subjects=[ref.filter], follow=True):
            received.append(event.position)
            if len(received) == 3:
                return

    task = asyncio.create_task(follow())
    result = await store.append(ref, [SessionOpened(channel="web"), message(1)], expect=NO_EVENTS)
    await asyncio.sleep(0.2)
    more = await store.append(ref, [message(2)], expect=Expect.at(result.last_position))
    await asyncio.wait_for(task, 5)
    assert received == [*result.positions, *more.positions]


async def test_get_by_position_and_last_position(store: EventStore, workspace: str) -> None:
    ref = session(workspace)
    result = await store.append(ref, [SessionOpened(channel="telegram")], expect=NO_EVENTS)
    assert await store.last_position() >= result.last_position
    recorded = await store.get(result.last_position)
    assert recorded is not None
    assert recorded.event == SessionOpened(channel="telegram")
    assert await store.get(10**12) is None


async def test_stored_payload_is_a_valid_structured_cloudevent(
    store: EventStore, nc: NATS, workspace: str
) -> None:
    ref = session(workspace)
    result = await store.append(ref, [message(1)])
    js = nc.jetstream()
    raw = await js.get_msg("EVENTS", result.last_position, direct=True)
    assert raw.data is not None
    as_json = orjson.loads(raw.data)
    assert set(as_json) >= {"specversion", "id", "source", "type", "subject", "time", "data"}
    assert as_json["datacontenttype"] == "application/json"
    CloudEvent.model_validate_json(raw.data)  # strict envelope: no extra fields
    assert raw.headers is not None
    assert raw.headers["Nats-Msg-Id"] == result.event_ids[0]


async def test_nats_down_gives_store_unavailable_quickly_then_recovers(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    port = server.port
    client = await connect(server.url)
    try:
        await apply_project_streams(client)
        store = EventStore(client, default_registry(), timeout=1.0)
        ref = AggregateRef("down", "session", "s1")
        await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)

        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.append(ref, [message(1)], expect=Expect.at(1), event_ids=["retry-me"])
        assert time.monotonic() - started < 3.0
        with pytest.raises(StoreUnavailable):
            await store.load(ref)

        server = EmbeddedNats(tmp_path / "nats", port=port)
        server.start()
        deadline = time.monotonic() + 10
        while not client.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # The retry with the same id either lands now or is reported as the duplicate of the
        # buffered first attempt: never twice.
        result = await store.append(ref, [message(1)], expect=Expect.at(1), event_ids=["retry-me"])
        assert result.positions == (2,)
        history = await store.load(ref)
        assert [e.position for e in history.events] == [1, 2]
    finally:
        await client.close()
        server.stop()


async def test_stream_admin_calls_on_another_stream(nc: NATS, store: EventStore) -> None:
    """`on_stream`, `stream_info`, `subjects`, `last_on`, `purge` (what `forget` uses on LIVE),
    and a missing stream named as such (what `/readyz` reports)."""
    name = f"SCRATCH_{time.monotonic_ns()}"
    prefix = name.lower()
    await nc.jetstream().add_stream(name=name, subjects=[f"{prefix}.>"], allow_direct=True)
    try:
        for n, subject in enumerate(["a.x", "a.y", "a.y", "b.x"]):
            await nc.jetstream().publish(f"{prefix}.{subject}", f"m{n}".encode())
        scratch = store.on_stream(name, timeout=2.0)
        assert scratch.stream == name
        assert (await scratch.stream_info())["state"]["messages"] == 4
        assert await scratch.subjects(f"{prefix}.a.*") == {f"{prefix}.a.x": 1, f"{prefix}.a.y": 2}
        assert await scratch.last_on(f"{prefix}.a.y") == b"m2"
        assert await scratch.last_on(f"{prefix}.c.z") is None
        assert await scratch.purge(f"{prefix}.a.>") == 3
        assert await scratch.subjects(f"{prefix}.>") == {f"{prefix}.b.x": 1}
    finally:
        await nc.jetstream().delete_stream(name)
    with pytest.raises(StreamNotFound, match=name):
        await store.on_stream(name).stream_info()
    with pytest.raises(StreamNotFound):
        await store.on_stream(name).purge(">")
    with pytest.raises(StreamNotFound, match=name):
        await anext(store.on_stream(name).read_raw(follow=True, subjects=[f"{prefix}.>"]))
