"""Erasure by crypto-shredding (docs/erasure.md): personal fields are sealed with a key per data
subject; `forget` destroys the key; every read then shows `[erased]`, the read model drops its
copies, and the stream's bytes (what the hash chain covers) never change."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, NotFoundError
from sqlalchemy import text as sql
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit.erasure import BUCKET, KEYS_STREAM, Sealer, forget, purge_live_output
from agentbus.audit.sealing import (
    ERASED,
    SubjectKey,
    open_data,
    open_value,
    seal_data,
    seal_value,
    sealed_key_id,
)
from agentbus.domain.approval import (
    APPROVAL,
    AskApproval,
    DecideApproval,
    approval_ref,
    arguments_digest,
    decide_approval,
)
from agentbus.domain.handling import handle, load
from agentbus.domain.run import RUN, Fail, QueueRun, StartRun
from agentbus.domain.session import SESSION, OpenSession, ReceiveMessage
from agentbus.errors import SealBroken, SubjectKeyUnavailable
from agentbus.events import AggregateRef
from agentbus.events.approval import ApprovalRequested
from agentbus.events.catalog import default_registry
from agentbus.events.identity import SYSTEM_WORKSPACE, UserCreated
from agentbus.events.privacy import SubjectForgotten, personal_types, subject_digest
from agentbus.events.run import RunQueued, RunStarted, RunSucceeded, RunWaitingApproval
from agentbus.events.session import MessageReceived, MessageSent, RunAssigned, SessionOpened
from agentbus.events.subjects import LIVE_STREAM
from agentbus.projections.approvals import ApprovalsProjection
from agentbus.projections.projection import Projection
from agentbus.projections.runs import RunsProjection
from agentbus.projections.runtime import RuntimeOptions
from agentbus.projections.sessions import SessionsProjection
from agentbus.queries.consistency import wait_for_position
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store import NO_EVENTS, EventStore
from agentbus.store.eventstore import RawEvent

from .conftest import another_database, connect
from .test_projections import engine, fresh_rebuild_rows, projecting, table_rows
from .test_runs import ECHO, workers

__all__ = ["engine"]  # the fixture, used by name below

REGISTRY = default_registry()
PERSONAL = personal_types(REGISTRY.models)
MESSAGE = PERSONAL[MessageReceived.kind.type]


def new_key() -> SubjectKey:
    return SubjectKey.from_stored(SubjectKey.generate())


# ---------------------------------------------------------------------------- pure sealing


def test_what_is_personal_is_declared_on_the_event_types() -> None:
    assert {t: (p.fields, p.subject) for t, p in PERSONAL.items()} == {
        "agentbus.session.message_received.v1": (("text",), "author"),
        # a message's text copied into what starts the agent's run
        "agentbus.session.run_assigned.v1": (("input",), "author"),
        "agentbus.session.run_enqueued.v1": (("input",), "author"),
        "agentbus.run.queued.v1": (("input",), "author"),
        # an agent's answer to someone, which may repeat their words
        "agentbus.session.message_sent.v1": (("text",), "recipient"),
        "agentbus.run.succeeded.v1": (("output",), "author"),
        # what a run's tool call, its reason to ask and its errors may quote of the input
        "agentbus.approval.requested.v1": (("arguments_preview", "reason"), "author"),
        "agentbus.run.waiting_approval.v1": (("reason",), "author"),
        "agentbus.run.failed.v1": (("message",), "author"),
        "agentbus.run.retry_scheduled.v1": (("message",), "author"),
        "agentbus.user.created.v1": (("display_name",), None),
    }


def test_seal_then_open_round_trips_and_hides_the_plaintext() -> None:
    key = new_key()
    text = "Mon numéro est 06 12 34 56 78 — rappelle-moi 🙂"
    sealed = seal_value(key, "e1", "text", text)
    assert sealed.startswith(f"sealed:v1:{key.key_id}:")
    assert "06 12" not in sealed
    assert sealed.isascii()
    assert sealed_key_id(sealed) == key.key_id
    assert open_value(key, "e1", "text", sealed) == text
    assert seal_value(key, "e1", "text", text) != sealed  # a fresh nonce each time


def test_a_sealed_value_moved_to_another_event_or_field_does_not_open() -> None:
    key = new_key()
    sealed = seal_value(key, "event-a", "text", "secret")
    with pytest.raises(SealBroken, match="moved"):
        open_value(key, "event-b", "text", sealed)
    with pytest.raises(SealBroken):
        open_value(key, "event-a", "display_name", sealed)
    middle = len(sealed) - 12  # inside the ciphertext, before any padding
    tampered = sealed[:middle] + ("A" if sealed[middle] != "A" else "B") + sealed[middle + 1 :]
    with pytest.raises(SealBroken):
        open_value(key, "event-a", "text", tampered)
    with pytest.raises(SealBroken):  # another subject's key
        open_value(SubjectKey(key.key_id, new_key().cipher), "event-a", "text", sealed)


def test_only_declared_fields_are_sealed_and_a_destroyed_key_reads_erased() -> None:
    key = new_key()
    data = {"message_id": "m1", "author": "ada", "text": "hello", "external_id": "x1"}
    sealed = seal_data(MESSAGE, key, "e1", dict(data))
    assert {k: v for k, v in sealed.items() if k != "text"} == {
        k: v for k, v in data.items() if k != "text"
    }
    assert sealed_key_id(sealed["text"]) == key.key_id
    assert open_data(MESSAGE, {key.key_id: key}, "e1", dict(sealed)) == data
    erased = open_data(MESSAGE, {key.key_id: None}, "e1", dict(sealed))
    assert erased["text"] == ERASED
    assert MessageReceived.model_validate(erased).text == ERASED  # constraints still hold
    with pytest.raises(SubjectKeyUnavailable):
        open_data(MESSAGE, {}, "e1", dict(sealed))
    plain = {"message_id": "m1", "author": "ada", "text": "written before sealing"}
    assert open_data(MESSAGE, {}, "e1", dict(plain)) == plain


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
async def sealed(nc: NATS, streams_ready: None) -> AsyncIterator[EventStore]:
    sealer = await Sealer.open(nc, REGISTRY)
    yield EventStore(nc, REGISTRY, timeout=5.0, sealer=sealer)
    await sealer.close()


@pytest.fixture
async def second_process(
    nats_server: EmbeddedNats, streams_ready: None
) -> AsyncIterator[EventStore]:
    """Another process's store: its own connection and its own key cache."""
    client = await connect(nats_server.url)
    sealer = await Sealer.open(client, REGISTRY)
    yield EventStore(client, REGISTRY, timeout=5.0, sealer=sealer)
    await sealer.close()
    await client.close()


async def run_output(engine: AsyncEngine, workspace: str, run_id: str) -> str | None:
    async with engine.connect() as connection:
        found = await connection.execute(
            sql("SELECT output FROM runs WHERE workspace = :w AND id = :r"),
            {"w": workspace, "r": run_id},
        )
        output: str | None = found.scalar_one()
        return output


async def raw_bytes(nc: NATS, workspace: str) -> dict[int, bytes]:
    """Every stored event of the workspace, as the stream holds it (no sealer)."""
    plain = EventStore(nc, REGISTRY, timeout=5.0)
    return {raw.position: raw.data async for raw in plain.read_raw(subjects=[f"evt.{workspace}.>"])}


async def test_crypto_shredding_end_to_end(
    sealed: EventStore,
    second_process: EventStore,
    nc: NATS,
    engine: AsyncEngine,
    database_url: str,
    workspace: str,
) -> None:
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    ada = ["ada's secret one: 4111 1111 1111 1111", "ada's secret two", "ada's secret three"]
    for n, text in enumerate(ada):
        await sealed.append(session, [MessageReceived(message_id=f"a{n}", author="ada", text=text)])
    await sealed.append(session, [MessageReceived(message_id="b0", author="bob", text="bob here")])
    to_ada = "ada, your card ends in 1111"
    answer = MessageSent(message_id="r1", author="agent", text=to_ada, recipient="ada")
    await sealed.append(session, [answer])
    await sealed.append(
        session, [MessageSent(message_id="r0", author="agent", text="the agent's reply")]
    )
    # A run that answered ada: its output is hers too.
    run = AggregateRef(workspace, "run", "r-ada")
    queued = RunQueued(agent="echo", executor="echo", input=ada[1], session_id="s1", author="ada")
    await sealed.append(run, [queued], expect=NO_EVENTS)
    await sealed.append(run, [RunStarted(attempt=1, worker="w1")])
    await sealed.append(run, [RunSucceeded(attempt=1, output=to_ada, author="ada")])

    # Stored sealed: not a byte of the plaintext in the stream, replies to ada included; a
    # message that answers nobody in particular is not personal.
    before = await raw_bytes(nc, workspace)
    stored = b"".join(before.values())
    assert not any(text.encode() in stored for text in [*ada, "bob here", to_ada])
    assert b"the agent's reply" in stored
    assert b'"author":"ada"' in stored

    # Every read path opens them, in this process and in another one.
    def texts(events: list[MessageReceived]) -> dict[str, str]:
        return {e.message_id: e.text for e in events}

    expected = {"a0": ada[0], "a1": ada[1], "a2": ada[2], "b0": "bob here"}
    history = await sealed.load(session)
    received = [e.event for e in history.events if isinstance(e.event, MessageReceived)]
    assert texts(received) == expected
    replayed = [e.event async for e in sealed.read(subjects=[f"evt.{workspace}.>"])]
    assert texts([e for e in replayed if isinstance(e, MessageReceived)]) == expected
    other = await second_process.load(session)
    assert texts([e.event for e in other.events if isinstance(e.event, MessageReceived)]) == (
        expected
    )
    first_ada = history.events[1]
    got = await sealed.get(first_ada.position)
    assert got is not None
    assert isinstance(got.event, MessageReceived)
    assert got.event.text == ada[0]
    assert got.envelope.data["text"] == ada[0]
    page = await sealed.read_page(after=0, subject=f"evt.{workspace}.session.s1.*")
    assert [sealed.decode(raw).event for raw in page] == [e.event for e in history.events]

    assert (await sealed.load(session)).events[-2].event == answer
    assert [e.event for e in (await second_process.load(run)).events][-1] == RunSucceeded(
        attempt=1, output=to_ada, author="ada"
    )

    # The messages and runs read models hold the plaintext for now.
    last = (await sealed.load(run)).last_position
    both = [SessionsProjection(), RunsProjection()]
    async with projecting(sealed, engine, both):
        await wait_for_position(engine, "sessions", last, timeout=30)
        await wait_for_position(engine, "runs", last, timeout=30)
    _, rows = await table_rows(engine, workspace)
    assert sorted(r[6] for r in rows) == sorted([*ada, "bob here", to_ada, "the agent's reply"])
    assert await run_output(engine, workspace, "r-ada") == to_ada

    # Forget ada: the other process stops opening her fields within the bound.
    key_id = await sealed.sealer.stored_key_id(workspace, "ada")  # type: ignore[union-attr]
    assert key_id is not None
    assert sealed_key_id(orjson.loads(before[first_ada.position])["data"]["text"]) == key_id
    started = time.monotonic()
    done = await forget(sealed, sealed.sealer, workspace, "ada", by="dpo", settle=0)  # type: ignore[arg-type]
    assert (done.outcome, done.key_id) == ("destroyed", key_id)
    raw_first = RawEvent(first_ada.position, first_ada.subject, before[first_ada.position], None, 0)
    while second_process.decode(raw_first).event.text != ERASED:  # type: ignore[attr-defined]
        assert time.monotonic() - started < 2.0, "the other process still opens ada's text"
        await asyncio.sleep(0.001)
    print(f"\nforget -> other process reads [erased] after {time.monotonic() - started:.4f} s")

    erased = {"a0": ERASED, "a1": ERASED, "a2": ERASED, "b0": "bob here"}
    for store in (sealed, second_process):
        history = await store.load(session)
        assert (
            texts([e.event for e in history.events if isinstance(e.event, MessageReceived)])
            == erased
        )
        replayed = [e.event async for e in store.read(subjects=[f"evt.{workspace}.session.>"])]
        assert texts([e for e in replayed if isinstance(e, MessageReceived)]) == erased
        replies = {e.message_id: e.text for e in replayed if isinstance(e, MessageSent)}
        assert replies == {"r1": ERASED, "r0": "the agent's reply"}  # r0 answers nobody
        outputs = [e.event for e in (await store.load(run)).events]
        assert outputs[-1] == RunSucceeded(attempt=1, output=ERASED, author="ada")

    # The stream is byte for byte what it was: the hash chain still verifies.
    after = await raw_bytes(nc, workspace)
    assert {p: b for p, b in after.items() if p in before} == before
    forgotten = [orjson.loads(b) for p, b in after.items() if p not in before]
    assert [(e["type"], e["data"]["subject"], e["data"]["key_id"]) for e in forgotten] == [
        (SubjectForgotten.kind.type, "ada", key_id)
    ]
    assert done.position == max(after)

    # ada writes again: a new key, readable; the old texts stay erased.
    again = await sealed.append(
        session, [MessageReceived(message_id="a3", author="ada", text="ada is back")]
    )
    new_id = await sealed.sealer.stored_key_id(workspace, "ada")  # type: ignore[union-attr]
    assert new_id not in (None, key_id)
    back = await second_process.get(again.last_position)
    assert back is not None
    assert isinstance(back.event, MessageReceived)
    assert back.event.text == "ada is back"

    # The read models erased their copies; a rebuild from scratch gives the same rows.
    async with projecting(sealed, engine, both):
        await wait_for_position(engine, "sessions", again.last_position, timeout=30)
        await wait_for_position(engine, "runs", again.last_position, timeout=30)
    live = await table_rows(engine, workspace)
    assert sorted((r[3], r[6]) for r in live[1]) == [
        ("a0", ERASED),
        ("a1", ERASED),
        ("a2", ERASED),
        ("a3", "ada is back"),
        ("b0", "bob here"),
        ("r0", "the agent's reply"),
        ("r1", ERASED),
    ]
    assert await run_output(engine, workspace, "r-ada") == ERASED
    assert live == await fresh_rebuild_rows(sealed, database_url, workspace, again.last_position)

    # Idempotent: forgetting again changes nothing; an unknown subject has nothing to forget.
    sealer = sealed.sealer
    assert sealer is not None
    await forget(sealed, sealer, workspace, "ada", by="dpo", settle=0)  # the new key
    repeat = await forget(sealed, sealer, workspace, "ada", by="dpo", settle=0)
    assert repeat.outcome == "already_forgotten"
    assert repeat.position is None
    assert (await forget(sealed, sealer, workspace, "nobody", by="dpo")).outcome == "unknown"


async def test_a_forgotten_key_stops_opening_in_another_process_within_the_bound(
    sealed: EventStore, second_process: EventStore, nc: NATS, workspace: str
) -> None:
    """The bound docs/erasure.md quotes: from `forget_key` being called to another process
    (its own connection and cache, the key cached there) reading [erased]."""
    plain = EventStore(nc, REGISTRY)
    sealer = sealed.sealer
    assert sealer is not None
    delays = []
    for n in range(20):
        session = AggregateRef(workspace, "session", f"s{n}")
        await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
        message = MessageReceived(message_id="m", author=f"p{n}", text="secret")
        result = await sealed.append(session, [message])
        assert (await second_process.get(result.last_position)).event == message  # type: ignore[union-attr]
        raw = (await plain.read_page(after=result.last_position - 1, subject=session.filter))[0]
        started = time.monotonic()
        await sealer.forget_key(workspace, f"p{n}")
        while second_process.decode(raw).event.text != ERASED:  # type: ignore[attr-defined]
            assert time.monotonic() - started < 1.0, "the other process still opens it"
            await asyncio.sleep(0.0005)
        delays.append(time.monotonic() - started)
    delays.sort()
    print(
        f"\nforget_key -> [erased] elsewhere: median {delays[10] * 1000:.1f} ms, "
        f"max {delays[-1] * 1000:.1f} ms"
    )
    assert delays[-1] < 0.5


async def test_forget_removes_the_key_from_the_bucket_stream_and_the_disk(
    sealed: EventStore, nc: NATS, nats_server: EmbeddedNats, workspace: str
) -> None:
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="api")], expect=NO_EVENTS)
    await sealed.append(session, [MessageReceived(message_id="m", author="eve", text="hi")])
    js = nc.jetstream()
    digest = subject_digest(workspace, "eve")
    stored = await js.get_msg(KEYS_STREAM, subject=f"$KV.{BUCKET}.{digest}")
    assert stored.data is not None
    assert len(stored.data) == 40
    files = list(nats_server.store_dir.rglob(f"{KEYS_STREAM}/msgs/*.blk"))
    assert any(stored.data in f.read_bytes() for f in files)

    done = await forget(sealed, sealed.sealer, workspace, "eve", by="dpo", settle=0)  # type: ignore[arg-type]
    assert done.outcome == "destroyed"
    with pytest.raises(NotFoundError):  # the key's message, by its sequence
        await js.get_msg(KEYS_STREAM, seq=stored.seq)
    marker = await js.get_msg(KEYS_STREAM, subject=f"$KV.{BUCKET}.{digest}")
    assert (marker.headers or {}).get("KV-Operation") == "PURGE"
    assert not marker.data
    with pytest.raises(KeyNotFoundError):
        await (await js.key_value(BUCKET)).get(digest)
    # A purge alone leaves the bytes in the block file; forget overwrites them first.
    files = list(nats_server.store_dir.rglob(f"{KEYS_STREAM}/msgs/*"))
    assert files
    assert not any(stored.data in f.read_bytes() for f in files if f.is_file())


async def test_a_forget_stopped_before_its_event_is_completed_by_the_next_one(
    sealed: EventStore, workspace: str
) -> None:
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    await sealed.append(session, [MessageReceived(message_id="m", author="ian", text="hi")])
    sealer = sealed.sealer
    assert sealer is not None
    step = await sealer.forget_key(workspace, "ian")  # then "crashed": no event recorded
    privacy = AggregateRef(workspace, "privacy", subject_digest(workspace, "ian"))
    assert (await sealed.load(privacy)).events == ()
    done = await forget(sealed, sealer, workspace, "ian", by="dpo", settle=0)
    assert done.outcome == "completed"
    events = (await sealed.load(privacy)).events
    assert [e.position for e in events] == [done.position]
    assert events[0].event == SubjectForgotten(subject="ian", key_id=None, by="dpo")
    assert step.destroyed is not None
    again = await forget(sealed, sealer, workspace, "ian", by="dpo", settle=0)
    assert again.outcome == "already_forgotten"


async def test_concurrent_first_appends_of_a_subject_share_one_key(
    sealed: EventStore, second_process: EventStore, nc: NATS, workspace: str
) -> None:
    refs = [AggregateRef(workspace, "session", f"s{n}") for n in range(20)]
    for ref in refs:
        await sealed.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    stores = [sealed, second_process] * 10
    await asyncio.gather(
        *(
            store.append(ref, [MessageReceived(message_id="m", author="zoe", text=f"t{n}")])
            for n, (store, ref) in enumerate(zip(stores, refs, strict=True))
        )
    )
    key_ids = set()
    for n, ref in enumerate(refs):
        history = await second_process.load(ref)
        assert history.events[-1].event.text == f"t{n}"  # type: ignore[attr-defined]
    plain = EventStore(nc, REGISTRY)
    for ref in refs:
        raws = [r async for r in plain.read_raw(subjects=[ref.filter])]
        key_ids.add(sealed_key_id(orjson.loads(raws[-1].data)["data"]["text"]))
    assert len(key_ids) == 1


async def test_user_display_names_are_sealed_with_the_user_as_subject(
    sealed: EventStore, nc: NATS, workspace: str
) -> None:
    user = AggregateRef(SYSTEM_WORKSPACE, "user", f"u{workspace}")
    event = UserCreated(display_name="Ada Lovelace", password_hash="$argon2id$x")
    result = await sealed.append(user, [event], expect=NO_EVENTS)
    raw = await EventStore(nc, REGISTRY).get(result.last_position)
    assert raw is not None
    assert raw.envelope.data["display_name"].startswith("sealed:v1:")
    assert raw.envelope.data["password_hash"] == "$argon2id$x"
    assert (await sealed.load(user)).events[0].event == event
    done = await forget(sealed, sealed.sealer, SYSTEM_WORKSPACE, user.id, by="dpo", settle=0)  # type: ignore[arg-type]
    assert done.outcome == "destroyed"
    assert (await sealed.load(user)).events[0].event.display_name == ERASED  # type: ignore[attr-defined]


async def test_a_raw_event_forwarded_as_json_is_opened_as_the_sse_bridge_does(
    sealed: EventStore, second_process: EventStore, workspace: str
) -> None:
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    await sealed.append(session, [MessageReceived(message_id="m", author="kim", text="hej")])
    page = await second_process.read_page(after=0, subject=f"evt.{workspace}.session.s1.*")
    envelopes = [orjson.loads(raw.data) for raw in page]
    assert envelopes[1]["data"]["text"].startswith("sealed:v1:")
    opened = [
        await second_process.open_sealed(e, r.data) for e, r in zip(envelopes, page, strict=True)
    ]
    assert opened == [False, True]
    assert envelopes[1]["data"]["text"] == "hej"


async def test_a_key_never_loaded_is_loaded_after_a_retryable_miss(
    sealed: EventStore, nc: NATS, workspace: str
) -> None:
    """A raw event from a consumer of one's own (the auto-reply worker) may name a key this
    process never loaded: decode says retry (and loads it), or `prepare` first avoids that."""
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    result = await sealed.append(
        session, [MessageReceived(message_id="m", author="lou", text="allo")]
    )
    page = await EventStore(nc, REGISTRY).read_page(
        after=result.last_position - 1, subject=session.filter
    )
    fresh, other = await Sealer.open(nc, REGISTRY), await Sealer.open(nc, REGISTRY)
    try:
        store = EventStore(nc, REGISTRY, sealer=fresh)
        with pytest.raises(SubjectKeyUnavailable):
            store.decode(page[0])
        for _ in range(200):
            try:
                assert store.decode(page[0]).event.text == "allo"  # type: ignore[attr-defined]
                break
            except SubjectKeyUnavailable:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("the key was never loaded")
        prepared = EventStore(nc, REGISTRY, sealer=other)
        await prepared.prepare(page[0])
        assert prepared.decode(page[0]).event.text == "allo"  # type: ignore[attr-defined]
    finally:
        await fresh.close()
        await other.close()


async def test_the_key_cache_is_bounded_and_every_read_path_reloads_what_it_let_go(
    sealed: EventStore, nc: NATS, engine: AsyncEngine, workspace: str
) -> None:
    """A process keeps at most `cached_keys` keys (and as many ids of destroyed ones). A key
    pushed out between a read loading it and the event being decoded or forwarded is loaded
    again: no read path fails, skips or dead-letters an event for it."""
    authors = [f"p{n}" for n in range(12)]
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    expected = {}
    for round_ in range(3):  # authors alternate: each event needs another key than the last
        for author in authors:
            message = MessageReceived(
                message_id=f"{author}-{round_}", author=author, text=f"{author} says {round_}"
            )
            last = await sealed.append(session, [message])
            expected[message.message_id] = message.text

    def texts(events: list[Any]) -> dict[str, str]:
        return {e.message_id: e.text for e in events if isinstance(e, MessageReceived)}

    tiny = await Sealer.open(nc, REGISTRY, cached_keys=2)
    try:
        store = EventStore(nc, REGISTRY, timeout=5.0, sealer=tiny)
        reloads = 0
        prepare = store.prepare

        async def counted(raw: RawEvent) -> None:  # how the projection runtime loads again
            nonlocal reloads
            reloads += 1
            await prepare(raw)

        store.prepare = counted  # type: ignore[method-assign]
        history = await store.load(session)
        assert texts([e.event for e in history.events]) == expected
        replayed = [e.event async for e in store.read(subjects=[session.filter])]
        assert texts(replayed) == expected
        page = await store.read_page(after=0, subject=session.filter)
        envelopes = [orjson.loads(raw.data) for raw in page]
        assert [
            await store.open_sealed(e, raw.data) for e, raw in zip(envelopes, page, strict=True)
        ] == [
            False,
            *[True] * len(expected),
        ]
        assert {e["data"]["message_id"]: e["data"]["text"] for e in envelopes[1:]} == expected
        assert tiny.cached_keys <= 2

        # The projection runtime, reading 36 events whose keys keep leaving a cache of 2.
        async with projecting(store, engine):
            await wait_for_position(engine, "sessions", last.last_position, timeout=30)
        assert reloads > 0, "no key was pushed out between load and decode: nothing tested"
        _, rows = await table_rows(engine, workspace)
        assert {r[3]: r[6] for r in rows} == expected
        async with engine.connect() as connection:
            dead = await connection.execute(
                sql("SELECT count(*) FROM dead_letters WHERE subject LIKE :s"),
                {"s": f"evt.{workspace}.%"},
            )
            assert dead.scalar_one() == 0

        # Forgotten keys: their ids are bounded too, and each still reads [erased].
        for author in authors[:6]:
            await forget(sealed, sealed.sealer, workspace, author, by="dpo", settle=0)  # type: ignore[arg-type]
        gone = {k: ERASED if k.split("-")[0] in authors[:6] else v for k, v in expected.items()}
        for _ in range(2):
            replayed = [e.event async for e in store.read(subjects=[session.filter])]
            assert texts(replayed) == gone
        assert len(tiny._keys) <= 4  # 2 keys + 2 ids of destroyed keys
        assert tiny.cached_keys <= 2
    finally:
        await tiny.close()


async def test_keys_created_elsewhere_never_push_out_the_keys_a_process_uses(
    sealed: EventStore, nc: NATS, workspace: str
) -> None:
    """The watcher hears every key created in the cluster. One created elsewhere is cached
    only while there is room, as the least recently used: the keys this process uses stay."""
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)

    async def say(author: str) -> None:
        await sealed.append(
            session, [MessageReceived(message_id=author, author=author, text=f"{author} here")]
        )

    await say("ada")
    await say("bob")
    tiny = await Sealer.open(nc, REGISTRY, cached_keys=3)
    try:
        here = EventStore(nc, REGISTRY, timeout=5.0, sealer=tiny)
        await here.load(session)  # this process uses ada's and bob's keys

        def held() -> set[str]:
            return set(tiny._by_digest)

        ada, bob, carl = (subject_digest(workspace, s) for s in ("ada", "bob", "carl"))
        assert held() == {ada, bob}

        async def until(condition: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 5
            while not condition():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.005)

        await say("carl")  # created by the other process: room for it, at the cold end
        await until(lambda: carl in held(), "the watcher did not hear carl's key")
        assert next(iter(tiny._by_digest)) == carl  # the least recently used
        await say("dan")  # no room: heard, not cached
        await say("eve")
        sealer = sealed.sealer
        assert sealer is not None
        await forget(sealed, sealer, workspace, "carl", by="dpo", settle=0)
        # The watcher hears in order: once carl's purge is heard, dan and eve were too.
        await until(lambda: carl not in held(), "the watcher did not hear carl's purge")
        assert held() == {ada, bob}
        texts = {e.event.message_id: e.event.text for e in (await here.load(session)).events[1:]}  # type: ignore[attr-defined]
        assert texts == {
            "ada": "ada here",
            "bob": "bob here",
            "carl": ERASED,
            "dan": "dan here",
            "eve": "eve here",
        }
        assert tiny.cached_keys <= 3
    finally:
        await tiny.close()


async def test_an_auto_replied_message_is_sealed_wherever_it_is_copied(
    private_store: EventStore,
) -> None:
    """The auto-reply path copies a message's text into the run's input (session and run
    events), and the agent's answer (the run's output, the reply message) may repeat it: all
    sealed with the author's key, opened by the worker, erased by forget."""
    nc = private_store._nc
    sealer = await Sealer.open(nc, REGISTRY)
    store = EventStore(nc, REGISTRY, timeout=5.0, sealer=sealer)
    session = AggregateRef("acme", "session", "chat1")
    await handle(store, SESSION, session, OpenSession("web", agent="echo"))
    await handle(store, SESSION, session, ReceiveMessage("m1", "ada", "hello there"))
    bobs = AggregateRef("acme", "session", "chat2")
    await handle(store, SESSION, bobs, OpenSession("web", agent="echo"))
    await handle(store, SESSION, bobs, ReceiveMessage("m2", "bob", "bob speaking"))

    async def reply_in(session: AggregateRef) -> MessageSent:
        deadline = time.monotonic() + 15
        while True:
            events = (await store.load(session)).events
            reply = next((e.event for e in events if isinstance(e.event, MessageSent)), None)
            if reply is not None:
                return reply
            assert time.monotonic() < deadline, f"no reply in {session.id}"
            await asyncio.sleep(0.05)

    try:
        async with workers(store, ECHO, auto_reply=True):
            reply = await reply_in(session)
            bobs_reply = await reply_in(bobs)
        assert reply.text == "echo: hello there"
        assert reply.run_id is not None
        assert bobs_reply.run_id is not None
        run = AggregateRef("acme", "run", reply.run_id)
        # The run's live output (token deltas) repeats the text in clear, in LIVE.
        live = store.on_stream(LIVE_STREAM)
        streamed = await live.subjects("live.acme.run.*.*")
        assert {s.split(".")[3] for s in streamed} == {run.id, bobs_reply.run_id}
        everything = await raw_bytes(nc, "acme")
        copies = {
            orjson.loads(data)["type"].split(".")[2]
            for data in everything.values()
            if b"hello there" in data
        }
        assert copies == set()  # not the input, not the reply that repeats it

        done = await forget(store, sealer, "acme", "ada", by="dpo", settle=0)
        assert done.outcome == "destroyed"
        ada_live = sum(n for s, n in streamed.items() if s.split(".")[3] == run.id)
        assert done.live_purged == ada_live > 0
        left = await live.subjects("live.acme.run.*.*")
        assert {s.split(".")[3] for s in left} == {bobs_reply.run_id}  # bob's output stays
        again = await forget(store, sealer, "acme", "ada", by="dpo", settle=0)
        assert (again.outcome, again.live_purged) == ("already_forgotten", 0)
        assert await purge_live_output(store, "acme", "bob", stream="NO_SUCH_STREAM") == 0
        inputs = [
            getattr(e.event, "input", None) or getattr(e.event, "text", None)
            for e in [*(await store.load(session)).events, *(await store.load(run)).events]
            if isinstance(e.event, MessageReceived | RunAssigned | RunQueued)
        ]
        assert inputs == [ERASED, ERASED, ERASED]
        answers = [
            getattr(e.event, "output", None) or getattr(e.event, "text", None)
            for e in [*(await store.load(session)).events, *(await store.load(run)).events]
            if isinstance(e.event, MessageSent | RunSucceeded)
        ]
        assert answers == [ERASED, ERASED]
    finally:
        await sealer.close()


async def test_an_approval_asked_for_someone_is_sealed_and_erased_with_them(
    private_store: EventStore,
) -> None:
    """A tool call's arguments come from the run's input: the approval's preview and reason,
    the run's `waiting_approval` and the chat notice asking for it are sealed with the input's
    author's key, and erased by forget; the decision itself stays."""
    nc = private_store._nc
    sealer = await Sealer.open(nc, REGISTRY)
    store = EventStore(nc, REGISTRY, timeout=5.0, sealer=sealer)
    session = AggregateRef("acme", "session", "chat1")
    secret = "ada-diary-page-7"
    await handle(store, SESSION, session, OpenSession("web", agent="echo"))
    asked = f'/tool shell {{"command": "cat {secret}"}}'
    await handle(store, SESSION, session, ReceiveMessage("m1", "ada", asked))

    async def sent(prefix: str) -> MessageSent | None:
        for recorded in (await store.load(session)).events:
            event = recorded.event
            if isinstance(event, MessageSent) and event.message_id.startswith(prefix):
                return event
        return None

    async def eventually(prefix: str) -> MessageSent:
        deadline = time.monotonic() + 15
        while (found := await sent(prefix)) is None:
            assert time.monotonic() < deadline, f"no message {prefix}*"
            await asyncio.sleep(0.05)
        return found

    try:
        async with workers(store, ECHO, auto_reply=True):
            notice = await eventually("ask-")
            assert secret in notice.text
            assert notice.recipient == "ada"
            approval_id = notice.message_id.removeprefix("ask-")
            await decide_approval(store, "acme", approval_id, "granted", by="bob", reason="ok")
            reply = await eventually("reply-")
        assert reply.text == f'tool shell approved: {{"command":"cat {secret}"}}'
        assert reply.run_id is not None
        run = AggregateRef("acme", "run", reply.run_id)
        approval = approval_ref("acme", approval_id)
        requested = (await store.load(approval)).events[0].event
        assert isinstance(requested, ApprovalRequested)
        assert secret in requested.arguments_preview
        assert requested.author == "ada"
        everything = await raw_bytes(nc, "acme")
        assert [data for data in everything.values() if secret.encode() in data] == []
        assert not any(b"the echo agent calls shell" in data for data in everything.values())

        done = await forget(store, sealer, "acme", "ada", by="dpo", settle=0)
        assert done.outcome == "destroyed"
        state, _ = await load(store, APPROVAL, approval)
        assert (state.arguments_preview, state.reason) == (ERASED, ERASED)
        assert state.verdict is not None
        assert (state.verdict.outcome, state.verdict.by, state.verdict.reason) == (
            "granted",
            "bob",
            "ok",
        )
        assert (await eventually("ask-")).text == ERASED
        waiting = [
            e.event
            for e in (await store.load(run)).events
            if isinstance(e.event, RunWaitingApproval)
        ]
        assert [(w.tool, w.reason, w.author) for w in waiting] == [("shell", ERASED, "ada")]
    finally:
        await sealer.close()


async def test_run_errors_and_approvals_in_the_read_models_are_erased_batch_independently(
    sealed: EventStore, engine: AsyncEngine, database_url: str, workspace: str
) -> None:
    """An executor's error may quote what it was sent: `runs.error_message`, the turn ledger
    and the `approvals` rows drop a forgotten subject's copies. What a later transition keeps
    (a retried run's error, a preview decided after the forget) is erased too, also when the
    projector decoded it before the forget and applies it in one batch with the forget and the
    later transition; a from-scratch rebuild in one batch gives the same rows."""
    now = datetime.now(UTC)

    async def queue(run_id: str) -> AggregateRef:
        ref = AggregateRef(workspace, "run", run_id)
        await handle(sealed, RUN, ref, QueueRun("echo", "echo", "hi", author="ada"))
        await handle(sealed, RUN, ref, StartRun("w1", now))
        return ref

    def fail(attempt: int, message: str, retryable: bool) -> Fail:
        return Fail(attempt, "http_status", message, retryable, now, timedelta(0))

    async def projected(engine: AsyncEngine) -> None:
        last = await sealed.last_position()
        await wait_for_position(engine, "runs", last, timeout=30)
        await wait_for_position(engine, "approvals", last, timeout=30)

    models: list[Projection] = [RunsProjection(), ApprovalsProjection()]
    # A batch waits 1.5 s for more events once it has one: the events below, from the retry
    # to the late run, are decoded as they arrive (the retry's error with ada's key) and
    # applied together, the forget between the retry and the transitions that follow it.
    lingering = RuntimeOptions(batch_size=1000, linger=1.5, lock_poll=0.2, scan_interval=0.2)
    async with projecting(sealed, engine, models, lingering):
        failed = await queue("r-failed")  # fails before the forget
        await handle(sealed, RUN, failed, fail(1, "502 for 'ada-secret-1'", retryable=False))
        await projected(engine)
        assert await run_column(engine, "error_message", "r-failed") == "502 for 'ada-secret-1'"

        retried = await queue("r-retried")
        await handle(sealed, RUN, retried, fail(1, "503 for 'ada-secret-2'", retryable=True))
        approval = approval_ref(workspace, "ap_1")
        await handle(
            sealed,
            APPROVAL,
            approval,
            AskApproval(
                run_id="r-retried",
                attempt=1,
                tool="shell",
                arguments_digest=arguments_digest({"command": "cat ada-secret-3"}),
                arguments_preview='{"command": "cat ada-secret-3"}',
                expires_at=now + timedelta(hours=1),
                requested_by="agent:echo",
                reason="ada-secret-4",
                author="ada",
            ),
        )
        sealer = sealed.sealer
        assert sealer is not None
        forgotten = await forget(sealed, sealer, workspace, "ada", by="dpo", settle=0)
        assert forgotten.outcome == "destroyed"
        # After the forget: the retried run starts again (keeping its error), the approval is
        # decided, and a new run fails with a new error (under a new key: not erased).
        await handle(sealed, RUN, retried, StartRun("w1", now + timedelta(seconds=1)))
        await handle(sealed, APPROVAL, approval, DecideApproval("denied", "bob", now, "no"))
        late = await queue("r-late")
        await handle(sealed, RUN, late, fail(1, "504 after the forget", retryable=False))
        await projected(engine)

    stored = b"".join((await raw_bytes(sealed._nc, workspace)).values())
    assert not any(f"ada-secret-{n}".encode() in stored for n in range(1, 5))
    live = await runs_and_approvals(engine, workspace)
    errors = {row[1]: row[14] for row in live[0]}  # id: error_message
    assert errors == {"r-failed": ERASED, "r-retried": ERASED, "r-late": "504 after the forget"}
    assert await approval_row(engine, workspace) == (ERASED, ERASED)
    ledger = " ".join(str(row[5]) for row in live[1])  # run_steps.detail
    assert "ada-secret" not in ledger
    assert "504 after the forget" not in ledger  # the ledger keeps no sealed field at all
    assert "http_status" in ledger

    # One batch from scratch: the same rows.
    async with another_database(database_url, f"rebuild_{workspace}") as fresh:
        async with projecting(sealed, fresh, models, lingering):
            await projected(fresh)
        assert await runs_and_approvals(fresh, workspace) == live


async def run_column(engine: AsyncEngine, column: str, run_id: str) -> Any:
    async with engine.connect() as connection:
        found = await connection.execute(
            sql(f"SELECT {column} FROM runs WHERE id = :r"), {"r": run_id}
        )
        return found.scalar_one()


async def approval_row(engine: AsyncEngine, workspace: str) -> tuple[Any, ...]:
    async with engine.connect() as connection:
        found = await connection.execute(
            sql("SELECT arguments_preview, reason FROM approvals WHERE workspace = :w"),
            {"w": workspace},
        )
        return tuple(found.one())


async def runs_and_approvals(engine: AsyncEngine, workspace: str) -> list[list[tuple[Any, ...]]]:
    queries = [
        "SELECT * FROM runs WHERE workspace = :w ORDER BY id",
        "SELECT * FROM run_steps WHERE workspace = :w ORDER BY position",
        "SELECT * FROM approvals WHERE workspace = :w ORDER BY id",
    ]
    async with engine.connect() as connection:
        return [
            [tuple(r) for r in (await connection.execute(sql(q), {"w": workspace})).all()]
            for q in queries
        ]


# ---------------------------------------------------------------------------- the command


def cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "agentbus", *args],
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_audit_forget_command(
    sealed: EventStore, nats_server: EmbeddedNats, workspace: str, tmp_path: Path
) -> None:
    session = AggregateRef(workspace, "session", "s1")
    await sealed.append(session, [SessionOpened(channel="web")], expect=NO_EVENTS)
    await sealed.append(session, [MessageReceived(message_id="m", author="max", text="my data")])
    env = {"AGENTBUS_NATS_URL": nats_server.url}
    args = ("audit", "forget", "max", "--workspace", workspace, "--data-dir", str(tmp_path))

    declined = await asyncio.to_thread(cli, *args, env=env, stdin="n\n")
    assert declined.returncode == 1
    assert "Destroy the key of 'max'" in declined.stdout
    assert (await sealed.load(session)).events[-1].event.text == "my data"  # type: ignore[attr-defined]

    done = await asyncio.to_thread(cli, *args, "--yes", "--reason", "GDPR art. 17", env=env)
    assert done.returncode == 0, done.stderr
    assert "forgot 'max'" in done.stdout
    assert "destroyed key" in done.stdout
    assert "now read as [erased];" in done.stdout  # printed as text, not taken for markup
    assert "removed 0 live output message(s) of their runs" in done.stdout  # ran no agent
    await asyncio.sleep(0.1)
    assert (await sealed.load(session)).events[-1].event.text == ERASED  # type: ignore[attr-defined]

    replay = await asyncio.to_thread(cli, "replay", "-w", workspace, env=env)
    assert replay.returncode == 0, replay.stderr
    exported = [orjson.loads(line) for line in replay.stdout.splitlines()]
    assert [e["data"].get("text") for e in exported] == [None, ERASED, None]
    assert exported[-1]["type"] == SubjectForgotten.kind.type
    assert "sealed:v1" not in replay.stdout

    again = await asyncio.to_thread(cli, *args, "--yes", env=env)
    assert again.returncode == 0
    assert "already forgotten" in again.stdout
    unknown = await asyncio.to_thread(
        cli, "audit", "forget", "nobody", "-w", workspace, "-y", env=env
    )
    assert unknown.returncode == 0
    assert "no key for 'nobody'" in unknown.stdout
    bad = await asyncio.to_thread(cli, "audit", "forget", "x", "-w", "a.b", "-y", env=env)
    assert bad.returncode == 1
    assert "workspace" in bad.stderr
    assert "Traceback" not in bad.stderr
