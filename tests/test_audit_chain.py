"""Tamper evidence: the hash chain (pure), the notary against the real servers, and `verify`
catching each kind of tampering.

EVENTS denies deletes, so tampering is staged on streams of their own (`TAMPER_<hex>`, deletes
allowed): the test deletes messages, or rewrites the whole stream with chosen bytes at chosen
positions (a deleted filler keeps a position empty), as someone with admin rights on the
server could."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit import records
from agentbus.audit.chain import (
    Checkpoint,
    NotaryKey,
    checkpoint_message,
    genesis,
    key_id,
    link,
    load_public_key,
    payload_digest,
    public_key_pem,
    signature_problem,
)
from agentbus.audit.notary import Notary, NotaryOptions, notary_key
from agentbus.audit.records import ChainRecord
from agentbus.audit.tampering import ChainWalk, Finding, classify
from agentbus.audit.verify import Report, verify
from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.events import AggregateRef
from agentbus.events.catalog import default_registry
from agentbus.events.session import MessageReceived, SessionOpened
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.runtime.platform import Platform
from agentbus.runtime.roles import run_roles
from agentbus.settings import Settings
from agentbus.store import EventStore

# --------------------------------------------------------------------------- the chain, pure


def test_link_is_sha256_over_previous_position_subject_and_payload_digest() -> None:
    """The definition in docs/audit.md, re-implemented from the text."""
    previous = genesis("EVENTS")
    assert previous == hashlib.sha256(b"agentbus-audit-chain/v1\x00EVENTS").digest()
    payload = b'{"type":"x"}'
    subject = "evt.acme.session.s1.opened"
    expected = hashlib.sha256(
        previous
        + (7).to_bytes(8, "big")
        + len(subject).to_bytes(4, "big")
        + subject.encode()
        + hashlib.sha256(payload).digest()
    ).digest()
    assert link(previous, 7, subject, payload) == expected


def test_every_input_of_a_link_changes_it() -> None:
    base = (genesis("EVENTS"), 7, "evt.a.session.s.opened", b"payload")
    reference = link(*base)
    assert link(genesis("OTHER"), *base[1:]) != reference
    assert link(base[0], 8, *base[2:]) != reference
    assert link(base[0], 7, "evt.a.session.s.closed", base[3]) != reference
    assert link(*base[:3], b"payloae") != reference
    with pytest.raises(ValueError, match="32 bytes"):
        link(b"short", 7, "s", b"")
    with pytest.raises(ValueError, match="positions are"):
        link(reference, 0, "s", b"")


def test_checkpoints_sign_canonical_bytes_and_verify_only_with_their_key() -> None:
    key = NotaryKey.from_seed(bytes(range(32)))
    at = datetime(2026, 11, 21, 9, 12, 0, 123456, tzinfo=UTC)
    checkpoint = key.sign("EVENTS", 42, b"\x01" * 32, at)
    assert checkpoint_message("EVENTS", 42, b"\x01" * 32, at) == (
        b"agentbus-audit-checkpoint/v1\nstream=EVENTS\nposition=42\n"
        b"link=" + b"01" * 32 + b"\ntime=2026-11-21T09:12:00.123456Z\n"
    )
    assert checkpoint.key_id == key_id(key.public)
    assert len(checkpoint.key_id) == 16
    assert signature_problem(checkpoint, key.public) is None
    # Exported and read back (the witness's copy), it still verifies.
    copy = Checkpoint.from_json(orjson.loads(orjson.dumps(checkpoint.to_json())))
    assert copy == checkpoint
    assert signature_problem(copy, key.public) is None
    # Any field changed breaks the signature; another key is told apart by its id.
    for changed in (
        Checkpoint(copy.stream, 43, copy.link, copy.time, copy.key_id, copy.signature),
        Checkpoint(copy.stream, 42, b"\x02" * 32, copy.time, copy.key_id, copy.signature),
        Checkpoint("OTHER", 42, copy.link, copy.time, copy.key_id, copy.signature),
    ):
        assert signature_problem(changed, key.public) == "bad-signature"
    other = NotaryKey.from_seed(bytes(32))
    assert signature_problem(checkpoint, other.public) == "unknown-key"
    # The public key round-trips through PEM and hex.
    assert key_id(load_public_key(public_key_pem(key.public).encode())) == key.key_id
    with pytest.raises(ValueError, match="position must be an integer"):
        Checkpoint.from_json({"stream": "EVENTS", "position": "42"})


Event = tuple[str, bytes]


def chained(stream: str, events: Sequence[Event | None]) -> list[ChainRecord]:
    """What the notary records for `events` at positions 1.. (None: an empty position)."""
    out: list[ChainRecord] = []
    previous = genesis(stream)
    for position, event in enumerate(events, start=1):
        if event is not None:
            previous = link(previous, position, *event)
            out.append(ChainRecord(position, previous, payload_digest(event[1])))
    return out


def walk(
    chain: list[ChainRecord],
    now: Sequence[Event | None],
    checkpoints: dict[int, bytes] | None = None,
) -> Finding | None:
    """The pure walk and classification over plain data, as `verify` runs them."""
    head = chain[-1].position
    walker = ChainWalk(genesis("S"), head, checkpoints)
    walker.add_records(chain, max(head, len(now)))
    finding = None
    for position, event in enumerate(now, start=1):
        if event is not None and (finding := walker.event(position, *event)) is not None:
            break
    finding = finding or walker.end()
    if finding is None:
        return None
    stream = {p: payload_digest(e[1]) for p, e in enumerate(now, start=1) if e is not None}
    return classify(finding, stream, {r.position: r.digest for r in chain})


EVENTS_10: list[Event | None] = [(f"t.s.{n}", f"event {n}".encode()) for n in range(1, 11)]


def _with(events: Sequence[Event | None], **at: Event | None) -> list[Event | None]:
    out = list(events)
    for key, value in at.items():
        out[int(key[1:]) - 1] = value
    return out


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (EVENTS_10, None),
        (_with(EVENTS_10, p5=("t.s.5", b"forged")), ("modified", 5)),
        (_with(EVENTS_10, p5=("t.s.other", b"event 5")), ("modified", 5)),
        (_with(EVENTS_10, p5=None), ("removed", 5)),
        (EVENTS_10[:8], ("removed", 9)),  # the tail cut off
        ([*EVENTS_10[:4], ("t.s.x", b"new"), *EVENTS_10[4:]], ("inserted", 5)),
        ([*EVENTS_10[:4], *EVENTS_10[5:]], ("removed", 5)),  # removed, later ones shifted up
        (_with(EVENTS_10, p3=EVENTS_10[6], p7=EVENTS_10[2]), ("reordered", 3)),
        ([*EVENTS_10, ("t.s.11", b"not chained yet")], None),
    ],
    ids=[
        "intact",
        "bytes-modified",
        "subject-modified",
        "deleted",
        "truncated",
        "inserted-shifting",
        "removed-shifting",
        "swapped",
        "unchained-tail",
    ],
)
def test_walk_names_the_first_position_and_kind(
    now: list[Event | None], expected: tuple[str, int] | None
) -> None:
    finding = walk(chained("S", EVENTS_10), now)
    assert (finding and (finding.kind, finding.position)) == expected


def test_walk_finds_an_insertion_into_a_gap_the_notary_saw() -> None:
    then = _with(EVENTS_10, p4=None)
    finding = walk(chained("S", then), _with(then, p4=("t.s.4", b"backdated")))
    assert finding is not None
    assert (finding.kind, finding.position) == ("inserted", 4)


def test_a_signed_checkpoint_catches_records_rewritten_with_the_stream() -> None:
    forged = _with(EVENTS_10, p5=("t.s.5", b"forged"))
    original = chained("S", EVENTS_10)
    finding = walk(chained("S", forged), forged, {8: original[7].link})
    assert finding is not None
    assert (finding.kind, finding.position) == ("checkpoint-mismatch", 8)


# --------------------------------------------------------------------------- real servers


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@dataclass
class TamperStream:
    """A stream of its own whose messages the test may delete and rewrite."""

    nc: NATS
    name: str
    prefix: str

    @property
    def subjects(self) -> tuple[str, ...]:
        return (f"{self.prefix}.>",)

    def store(self) -> EventStore:
        return EventStore(self.nc, default_registry(), stream=self.name)

    async def create(self) -> None:
        await self.nc.jetstream().add_stream(
            StreamConfig(
                name=self.name,
                subjects=list(self.subjects),
                storage=StorageType.MEMORY,
                deny_delete=False,
                allow_direct=True,
            )
        )

    async def publish(self, events: Sequence[Event | None]) -> None:
        """Append `events` in order; None leaves a position empty (published, then deleted)."""
        js = self.nc.jetstream()
        for event in events:
            subject, payload = event if event is not None else (f"{self.prefix}.filler", b"")
            ack = await js.publish(subject, payload, stream=self.name)
            if event is None:
                await js.delete_msg(self.name, ack.seq)

    async def rewrite(self, events: Sequence[Event | None]) -> None:
        """Replace the whole stream: the same positions, with the bytes the test chooses."""
        await self.nc.jetstream().delete_stream(self.name)
        await self.create()
        await self.publish(events)

    async def delete(self, position: int) -> None:
        await self.nc.jetstream().delete_msg(self.name, position)


@pytest.fixture
async def tamper(nc: NATS) -> AsyncIterator[TamperStream]:
    suffix = secrets.token_hex(4)
    stream = TamperStream(nc, f"TAMPER_{suffix}", f"tamper{suffix}")
    await stream.create()
    yield stream
    await nc.jetstream().delete_stream(stream.name)


def events(stream: TamperStream, count: int) -> list[Event | None]:
    """`count` distinct messages; one is not JSON at all (the chain never decodes)."""
    out: list[Event | None] = []
    for n in range(1, count + 1):
        payload = orjson.dumps({"id": secrets.token_hex(8), "n": n, "text": "hello " * 10})
        out.append((f"{stream.prefix}.session.s{n % 3}.message", payload))
    out[1] = (f"{stream.prefix}.blob.b.sealed", secrets.token_bytes(64))
    return out


@asynccontextmanager
async def notary_running(
    store: EventStore, engine: AsyncEngine, key: NotaryKey, subjects: Sequence[str], every: int = 4
) -> AsyncIterator[Notary]:
    notary = Notary(
        store,
        engine,
        key,
        subjects=subjects,
        options=NotaryOptions(checkpoint_every=every, checkpoint_interval=3600, lock_poll=0.2),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(notary.run(stop))
    try:
        yield notary
    finally:
        stop.set()
        await task


async def notarize(
    stream: TamperStream, engine: AsyncEngine, key: NotaryKey, every: int = 4
) -> None:
    store = stream.store()
    async with notary_running(store, engine, key, stream.subjects, every) as notary:
        await notary.wait_for(await store.last_position(), timeout=20)


async def check(
    stream: TamperStream,
    engine: AsyncEngine,
    key: NotaryKey,
    *,
    first: int = 1,
    last: int | None = None,
    witness: list[Checkpoint] | None = None,
) -> Report:
    return await verify(
        stream.store(),
        engine,
        key.public,
        subjects=stream.subjects,
        first=first,
        last=last,
        witness=witness,
    )


def found(report: Report) -> tuple[str, int] | None:
    return None if report.finding is None else (report.finding.kind, report.finding.position)


async def test_the_notary_chains_events_and_verify_says_ok(
    private_store: EventStore, engine: AsyncEngine
) -> None:
    """Real domain events on the real EVENTS stream, chained while they are appended."""
    key = await notary_key(private_store._nc)
    ref = AggregateRef("acme", "session", "s1")
    await private_store.append(ref, [SessionOpened(channel="web", title="t", agent="echo")])
    async with notary_running(private_store, engine, key, ("evt.>",)) as notary:
        await notary.wait_for(1, timeout=20)
        for n in range(20):
            result = await private_store.append(
                ref, [MessageReceived(message_id=f"m{n}", author="user:a", text=f"hi {n}")]
            )
            await notary.wait_for(result.last_position, timeout=20)  # one event per batch
        last = await private_store.last_position()
    report = await verify(private_store, engine, key.public)
    assert report.ok, report.finding
    assert (report.first, report.last, report.walked, report.unchained) == (1, last, last, 0)
    assert report.checkpoints == 5  # one signed every 4 events: at 4, 8, 12, 16, 20
    # The stored links are the chain recomputed from scratch.
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        stored = await records.records_between(raw.driver_connection, "EVENTS", 1, last)
    previous = genesis("EVENTS")
    for event, record in zip([e async for e in private_store.read_raw()], stored, strict=True):
        previous = link(previous, event.position, event.subject, event.data)
        assert record == ChainRecord(event.position, previous, payload_digest(event.data))


async def test_the_projector_role_keeps_the_chain(
    private_store: EventStore, engine: AsyncEngine, database_url: str
) -> None:
    """`agentbus up` and `serve --role projector` run the notary beside the projections."""
    url = private_store._nc.connected_url
    assert url is not None
    ref = AggregateRef("acme", "session", "s2")
    await private_store.append(ref, [SessionOpened(channel="web", title="t", agent="echo")])
    platform = await Platform.connect(Settings(), url.geturl(), database_url)
    stop = asyncio.Event()
    roles = asyncio.create_task(
        run_roles(platform, {"projector"}, host="127.0.0.1", port=0, stop=stop)
    )
    try:
        result = await private_store.append(
            ref, [MessageReceived(message_id="m1", author="user:a", text="hello")]
        )
        async with asyncio.timeout(20):
            while True:
                async with engine.connect() as connection:
                    raw = await connection.get_raw_connection()
                    chain = await records.head(raw.driver_connection, "EVENTS")
                if chain is not None and chain.position == result.last_position:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await roles
        await platform.close()
    report = await verify(private_store, engine, (await notary_key(private_store._nc)).public)
    assert report.ok
    assert report.walked == result.last_position


async def test_events_appended_after_the_notary_stopped_are_reported_unchained(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    await tamper.publish(events(tamper, 8))
    await notarize(tamper, engine, key)
    await tamper.publish(events(tamper, 3))
    report = await check(tamper, engine, key)
    assert report.ok
    assert (report.walked, report.unchained, report.checkpoints) == (11, 3, 2)


async def test_the_notary_resumes_where_it_stopped_and_one_instance_writes(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    store = tamper.store()
    await tamper.publish(events(tamper, 10))
    async with (
        notary_running(store, engine, key, tamper.subjects) as one,
        notary_running(store, engine, key, tamper.subjects) as two,
    ):
        await asyncio.wait_for(_either(one, two, 10), 20)
        await tamper.publish(events(tamper, 5))
        await asyncio.wait_for(_either(one, two, 15), 20)
        assert {one.position, two.position} & {15}
        assert 0 in {one.position, two.position}  # the other one waited for the lock
    await tamper.publish(events(tamper, 5))
    await notarize(tamper, engine, key)
    report = await check(tamper, engine, key)
    assert report.ok
    assert report.walked == 20
    assert report.unchained == 0


async def _either(one: Notary, two: Notary, position: int) -> None:
    while max(one.position, two.position) < position:
        await asyncio.sleep(0.05)


async def test_a_deleted_message_is_removed_at_its_position(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    await tamper.publish(events(tamper, 12))
    await notarize(tamper, engine, key)
    await tamper.delete(7)
    assert found(await check(tamper, engine, key)) == ("removed", 7)


async def test_a_deleted_message_republished_modified_is_removed_then_unchained(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    """What the server allows without a rewrite: delete an event, publish an edited copy (it
    lands at the end, after the notary's head)."""
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    await tamper.delete(5)
    subject, _ = original[4] or ("", b"")
    await tamper.publish([(subject, b'{"edited": true}')])
    report = await check(tamper, engine, key)
    assert found(report) == ("removed", 5)


async def test_a_rewritten_event_is_modified_at_its_position(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    subject, _ = original[5] or ("", b"")
    await tamper.rewrite(_with(original, p6=(subject, b'{"amount": 1000000}')))
    report = await check(tamper, engine, key)
    assert found(report) == ("modified", 6)
    assert report.finding is not None
    assert "bytes differ" in report.finding.detail


async def test_an_event_inserted_before_others_is_inserted(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    forged = (f"{tamper.prefix}.session.s9.message", b'{"text": "I approve"}')
    await tamper.rewrite([*original[:8], forged, *original[8:]])
    assert found(await check(tamper, engine, key)) == ("inserted", 9)


async def test_an_event_inserted_into_an_empty_position_is_inserted(
    tamper: TamperStream, engine: AsyncEngine
) -> None:
    key = await notary_key(tamper.nc)
    original = _with(events(tamper, 12), p4=None)  # position 4 was empty when chained
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    assert (await check(tamper, engine, key)).ok
    await tamper.rewrite(_with(original, p4=(f"{tamper.prefix}.x.y.z", b"backdated")))
    assert found(await check(tamper, engine, key)) == ("inserted", 4)


async def test_swapped_events_are_reordered(tamper: TamperStream, engine: AsyncEngine) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    await tamper.rewrite(_with(original, p3=original[9], p10=original[2]))
    report = await check(tamper, engine, key)
    assert found(report) == ("reordered", 3)
    assert report.finding is not None
    assert "chained at 10 is now at 3" in report.finding.detail


async def test_from_and_to_verify_a_range(tamper: TamperStream, engine: AsyncEngine) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    await tamper.rewrite(_with(original, p6=(f"{tamper.prefix}.a.b.c", b"forged")))
    before = await check(tamper, engine, key, last=5)
    after = await check(tamper, engine, key, first=7)
    around = await check(tamper, engine, key, first=3, last=8)
    assert before.ok
    assert (before.first, before.last, before.walked) == (1, 5, 5)
    assert after.ok
    assert (after.first, after.last, after.walked) == (7, 12, 6)
    assert after.checkpoints == 2  # at 8 and 12: the chain from the stored link at 6 holds
    assert found(around) == ("modified", 6)


async def _rewrite_records(
    database_url: str, stream: str, events_now: Sequence[Event | None], key: NotaryKey | None
) -> None:
    """What an attacker with the database (and maybe the key) does after rewriting the stream:
    recompute the links (and re-sign the checkpoints) so they match it."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("ALTER TABLE audit_links DISABLE TRIGGER USER")
        await connection.execute("ALTER TABLE audit_checkpoints DISABLE TRIGGER USER")
        for record in chained(stream, events_now):
            await connection.execute(
                "UPDATE audit_links SET link = $3, digest = $4 WHERE stream = $1 AND position = $2",
                stream,
                record.position,
                record.link,
                record.digest,
            )
            if key is not None:
                signed = key.sign(stream, record.position, record.link, datetime.now(UTC))
                await connection.execute(
                    "UPDATE audit_checkpoints SET link = $3, signature = $4, time = $5 "
                    "WHERE stream = $1 AND position = $2",
                    stream,
                    record.position,
                    signed.link,
                    signed.signature,
                    signed.time,
                )
    finally:
        await connection.close()


async def test_the_evidence_tables_refuse_updates_and_deletes(
    tamper: TamperStream, engine: AsyncEngine, database_url: str
) -> None:
    await tamper.publish(events(tamper, 4))
    await notarize(tamper, engine, await notary_key(tamper.nc))
    connection = await asyncpg.connect(database_url)
    try:
        for statement in (
            "UPDATE audit_links SET link = link",
            "DELETE FROM audit_links",
            "DELETE FROM audit_checkpoints",
        ):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute(statement)
        assert await connection.fetchval("SELECT count(*) FROM audit_links") == 4
    finally:
        await connection.close()


async def test_signed_checkpoints_catch_a_stream_rewritten_with_the_records(
    tamper: TamperStream, engine: AsyncEngine, database_url: str
) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    forged = _with(original, p6=(f"{tamper.prefix}.a.b.c", b"forged"))
    await tamper.rewrite(forged)
    await _rewrite_records(database_url, tamper.name, forged, None)
    report = await check(tamper, engine, key)
    assert found(report) == ("checkpoint-mismatch", 8)


async def test_only_a_witness_copy_catches_an_attacker_who_holds_the_key(
    tamper: TamperStream, engine: AsyncEngine, database_url: str
) -> None:
    key = await notary_key(tamper.nc)
    original = events(tamper, 12)
    await tamper.publish(original)
    await notarize(tamper, engine, key)
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        witness = await records.checkpoints(raw.driver_connection, tamper.name)
    assert [c.position for c in witness] == [4, 8, 12]

    forged = _with(original, p6=(f"{tamper.prefix}.a.b.c", b"forged"))
    await tamper.rewrite(forged)
    await _rewrite_records(database_url, tamper.name, forged, key)
    assert (await check(tamper, engine, key)).ok  # everything the deployment holds agrees
    report = await check(tamper, engine, key, witness=witness)
    assert found(report) == ("checkpoint-mismatch", 8)


async def test_a_bad_signature_or_an_untrusted_key_fails(
    tamper: TamperStream, engine: AsyncEngine, database_url: str
) -> None:
    key = await notary_key(tamper.nc)
    await tamper.publish(events(tamper, 12))
    await notarize(tamper, engine, key)
    stranger = NotaryKey.from_seed(secrets.token_bytes(32))
    untrusted = await check(tamper, engine, stranger)
    assert found(untrusted) == ("unknown-key", 4)
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("ALTER TABLE audit_checkpoints DISABLE TRIGGER USER")
        await connection.execute(
            "UPDATE audit_checkpoints SET time = time + interval '1 second' "
            "WHERE stream = $1 AND position = 8",
            tamper.name,
        )
    finally:
        await connection.close()
    assert found(await check(tamper, engine, key)) == ("bad-signature", 8)


# --------------------------------------------------------------------------- the CLI


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "agentbus", "audit", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_notarize_export_and_verify_then_exit_1_on_tampering(
    tamper: TamperStream,
    engine: AsyncEngine,
    database_url: str,
    nats_server: EmbeddedNats,
    tmp_path: Path,
) -> None:
    env = {"AGENTBUS_NATS_URL": nats_server.url, "AGENTBUS_DATABASE_URL": database_url}
    await tamper.publish(events(tamper, 30))
    stream = ("--stream", tamper.name)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=env)

    notarized = await asyncio.to_thread(run, "notarize", *stream)
    assert notarized.returncode == 0, notarized.stderr
    assert "through position 30" in notarized.stdout

    public = tmp_path / "notary.pem"
    exported = tmp_path / "checkpoints.jsonl"
    assert (await asyncio.to_thread(run, "public-key", "--output", str(public))).returncode == 0
    result = await asyncio.to_thread(run, "checkpoints", *stream, "--output", str(exported))
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in exported.read_bytes().splitlines()]
    assert lines
    assert lines[-1]["position"] == 30
    assert set(lines[0]) == {"stream", "position", "link", "time", "key_id", "signature"}
    assert load_public_key(public.read_bytes()) == (await notary_key(tamper.nc)).public

    ok = await asyncio.to_thread(
        run, "verify", *stream, "--public-key", str(public), "--checkpoints", str(exported)
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    assert "30 event(s) recomputed" in ok.stdout

    stranger = tmp_path / "stranger.pem"
    stranger.write_text(public_key_pem(NotaryKey.from_seed(secrets.token_bytes(32)).public))
    wrong = await asyncio.to_thread(run, "verify", *stream, "--public-key", str(stranger))
    assert wrong.returncode == 1
    assert "unknown-key" in wrong.stdout

    await tamper.delete(17)
    tampered = await asyncio.to_thread(run, "verify", *stream)
    assert tampered.returncode == 1
    assert "TAMPERED" in tampered.stdout
    assert "position 17 removed" in tampered.stdout
    in_range = await asyncio.to_thread(run, "verify", *stream, "--to", "16")
    assert in_range.returncode == 0, in_range.stdout

    missing = await asyncio.to_thread(run, "verify", "--stream", "NO_SUCH_STREAM")
    assert missing.returncode == 1
    assert "error:" in missing.stderr
