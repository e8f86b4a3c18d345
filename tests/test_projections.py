"""The projection runtime against real NATS and Postgres: exactly-once effects, batching,
dead letters, halting, blue-green rebuilds, version bumps, health and read-your-writes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from agentbus.db.engine import create_engine
from agentbus.db.leadership import sleep_or_stop
from agentbus.db.migrations import upgrade
from agentbus.errors import ProjectionTimeout
from agentbus.events import AggregateRef
from agentbus.events.catalog import default_registry
from agentbus.events.registry import DomainEvent
from agentbus.events.session import MessageReceived, MessageSent, SessionClosed, SessionOpened
from agentbus.projections.deadletters import list_dead_letters, retry_dead_letters
from agentbus.projections.generations import (
    Generation,
    ensure_generations,
    list_generations,
    start_rebuild,
)
from agentbus.projections.health import classify, projection_health, prometheus_text
from agentbus.projections.projection import Handler, PoisonPolicy, Projection, Write
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.projections.sessions import SessionsProjection
from agentbus.queries.consistency import wait_for_position
from agentbus.queries.sessions import get_session, list_messages
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store import NO_EVENTS, EventStore, Expect

from .conftest import another_database, apply_project_streams, connect

FAST = RuntimeOptions(batch_size=500, linger=0.01, lock_poll=0.2, scan_interval=0.2)


@pytest.fixture(scope="module")
async def module_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """This module's own nats-server. A fresh projection reads the stream from position 1: on
    the shared server, its catch-up would grow with every test that ran before (80k events
    after the SSE and replay tests, too many to project in the waits here)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("projections-nats"), port=0)
    server.start()
    client = await connect(server.url)
    try:
        await apply_project_streams(client)
    finally:
        await client.close()
    yield server
    server.stop()


@pytest.fixture
async def store(module_nats: EmbeddedNats) -> AsyncIterator[EventStore]:
    """The event store of this module's tests (see `module_nats`)."""
    client = await connect(module_nats.url)
    yield EventStore(client, default_registry(), timeout=5.0)
    await client.close()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@asynccontextmanager
async def projecting(
    store: EventStore,
    engine: AsyncEngine,
    projections: list[Projection] | None = None,
    options: RuntimeOptions = FAST,
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    projector = Projector(projections or [SessionsProjection()], store, engine, options)
    task = asyncio.create_task(projector.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def conversation(
    store: EventStore, workspace: str, sessions: int, messages: int, seed: int = 1
) -> int:
    """Append a realistic mix; returns the last position."""
    rng = random.Random(seed)
    last = 0
    for n in range(sessions):
        ref = AggregateRef(workspace, "session", f"s{n}")
        result = await store.append(
            ref,
            [SessionOpened(channel=rng.choice(["web", "telegram"]), title=f"t{n}")],
            expect=NO_EVENTS,
        )
        position = result.last_position
        for m in range(rng.randint(1, messages)):
            inbound = rng.random() < 0.5
            event: DomainEvent = (
                MessageReceived(
                    message_id=f"m{m}", author="ada", text=f"hi {m}", external_id=f"x{m}"
                )
                if inbound
                else MessageSent(message_id=f"m{m}", author="bot", text=f"re {m}", run_id="r1")
            )
            position = (await store.append(ref, [event], expect=Expect.at(position))).last_position
        if rng.random() < 0.3:
            position = (
                await store.append(ref, [SessionClosed(reason="bye")], expect=Expect.at(position))
            ).last_position
        last = position
    return last


async def table_rows(engine: AsyncEngine, workspace: str) -> tuple[list[Any], list[Any]]:
    async with engine.connect() as connection:
        sessions = (
            await connection.execute(
                text("SELECT * FROM sessions WHERE workspace = :w ORDER BY id"), {"w": workspace}
            )
        ).all()
        messages = (
            await connection.execute(
                text("SELECT * FROM messages WHERE workspace = :w ORDER BY position"),
                {"w": workspace},
            )
        ).all()
    return [tuple(r) for r in sessions], [tuple(r) for r in messages]


async def fresh_rebuild_rows(
    store: EventStore, database_url: str, workspace: str, last: int
) -> tuple[list[Any], list[Any]]:
    """The same events projected from scratch into a brand-new database."""
    async with another_database(database_url, f"rebuild_{workspace}") as engine:
        async with projecting(store, engine):
            await wait_for_position(engine, "sessions", last, timeout=30)
        return await table_rows(engine, workspace)


# ---------------------------------------------------------------------------- read models


async def test_sessions_and_messages_rows(
    store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    ref = AggregateRef(workspace, "session", "s1")
    opened = await store.append(
        ref, [SessionOpened(channel="telegram", title="Help", agent="helper")], expect=NO_EVENTS
    )
    batch = await store.append(
        ref,
        [
            MessageReceived(message_id="m1", author="ada", text="hello", external_id="tg-1"),
            MessageSent(message_id="m2", author="helper", text="hi!", run_id="run-1"),
            SessionClosed(reason="done"),
        ],
        expect=Expect.at(opened.last_position),
    )
    async with projecting(store, engine):
        session = await get_session(engine, workspace, "s1", min_position=batch.last_position)
        messages = await list_messages(engine, workspace, "s1", min_position=batch.last_position)
    assert session is not None
    assert (session.channel, session.title, session.agent) == ("telegram", "Help", "helper")
    assert session.status == "closed"
    assert session.message_count == 2
    assert session.position == batch.last_position
    assert session.last_message_at is not None
    assert [(m.direction, m.author, m.text, m.external_id, m.run_id) for m in messages] == [
        ("in", "ada", "hello", "tg-1", None),
        ("out", "helper", "hi!", None, "run-1"),
    ]
    assert [m.position for m in messages] == list(batch.positions[:2])


async def test_batch_size_does_not_change_the_tables(
    store: EventStore, engine: AsyncEngine, database_url: str, workspace: str
) -> None:
    """The projection contract (projection.py): cutting the stream differently gives the same
    rows. Batch size 1 here, the default large batches in the from-scratch rebuild."""
    last = await conversation(store, workspace, sessions=12, messages=15, seed=7)
    one_by_one = RuntimeOptions(batch_size=1, linger=0, lock_poll=0.2, scan_interval=0.2)
    async with projecting(store, engine, options=one_by_one):
        await wait_for_position(engine, "sessions", last, timeout=60)
    small = await table_rows(engine, workspace)
    assert small == await fresh_rebuild_rows(store, database_url, workspace, last)
    assert len(small[0]) == 12


async def test_an_idle_worker_gives_its_database_connection_back(
    store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    """A worker holds one connection while it has batches to apply and returns it to the pool
    once idle: projections and the gateway share a process's pool."""
    last = await conversation(store, workspace, sessions=3, messages=5, seed=3)
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", last)
        pool = engine.pool
        assert isinstance(pool, QueuePool)  # the engine's default, which counts checkouts
        async with asyncio.timeout(10):
            while pool.checkedout() > 1:  # only the lock's connection stays out
                await asyncio.sleep(0.05)
        ref = AggregateRef(workspace, "session", "later")
        later = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
        await wait_for_position(engine, "sessions", later.last_position)
    session = await get_session(engine, workspace, "later")
    assert session is not None


async def test_restart_resumes_from_the_checkpoint_exactly_once(
    store: EventStore, engine: AsyncEngine, database_url: str, workspace: str
) -> None:
    first = await conversation(store, workspace, sessions=5, messages=10, seed=1)
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", first)
    second = await conversation(store, f"{workspace}b", sessions=5, messages=10, seed=2)
    more = await conversation(store, workspace, sessions=0, messages=0) or second
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", max(second, more))
    assert await table_rows(engine, workspace) == await fresh_rebuild_rows(
        store, database_url, workspace, max(second, more)
    )


async def test_two_projectors_one_active_and_nothing_applied_twice(
    store: EventStore, engine: AsyncEngine, database_url: str, workspace: str
) -> None:
    async with projecting(store, engine), projecting(store, engine):
        last = await conversation(store, workspace, sessions=10, messages=10, seed=3)
        await wait_for_position(engine, "sessions", last, timeout=30)
        async with engine.connect() as connection:
            holders = await connection.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            )
    assert holders == 1
    assert await table_rows(engine, workspace) == await fresh_rebuild_rows(
        store, database_url, workspace, last
    )


# ---------------------------------------------------------------------------- dead letters


async def test_poison_events_go_to_dead_letters_while_the_others_apply(
    private_store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    store = private_store
    ref = AggregateRef(workspace, "session", "s1")
    opened = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    js = store._nc.jetstream()
    # not a CloudEvent at all
    garbage = await js.publish(f"evt.{workspace}.session.s1.opened", b"{not json")
    # valid event, but Postgres refuses the text (NUL byte): found by the slow path
    nul = await store.append(ref, [MessageReceived(message_id="m1", author="a", text="x\x00y")])
    good = await store.append(ref, [MessageReceived(message_id="m2", author="a", text="fine")])
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", good.last_position)
    letters = {d.position: d for d in await list_dead_letters(engine, "sessions")}
    assert set(letters) == {garbage.seq, nul.last_position}
    assert "CloudEvent" in letters[garbage.seq].error or "JSON" in letters[garbage.seq].error
    assert letters[nul.last_position].event_type == "agentbus.session.message_received.v1"
    assert "0x00" in letters[nul.last_position].error or "UntranslatableCharacter" in (
        letters[nul.last_position].error
    )
    messages = await list_messages(engine, workspace, "s1")
    assert [m.text for m in messages] == ["fine"]
    session = await get_session(engine, workspace, "s1")
    assert session is not None
    assert session.message_count == 1
    assert opened.last_position < session.position


async def test_a_copied_row_that_exists_already_is_a_dead_letter_not_skipped(
    private_store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    """Messages are appended with COPY (`Statement.copy`: no ON CONFLICT): a row the table
    already holds fails its batch, and isolation makes its event a dead letter."""
    store = private_store
    ref = AggregateRef(workspace, "session", "s1")
    opened = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", opened.last_position)
    clash = await store.append(ref, [MessageReceived(message_id="m1", author="a", text="one")])
    after = await store.append(ref, [MessageReceived(message_id="m2", author="a", text="two")])
    async with engine.begin() as connection:
        physical = await connection.scalar(
            text(
                "SELECT 'messages_g' || generation FROM "
                "projection_generations WHERE projection = 'sessions' AND status = 'live'"
            )
        )
        await connection.execute(
            text(
                f"INSERT INTO {physical} (workspace, session_id, position, message_id, "
                "direction, author, text, created_at) "
                "VALUES (:w, 's1', :p, 'planted', 'in', 'x', 'planted', now())"
            ),
            {"w": workspace, "p": clash.last_position},
        )
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", after.last_position)
    [letter] = await list_dead_letters(engine, "sessions")
    assert letter.position == clash.last_position
    assert "UniqueViolation" in letter.error
    messages = await list_messages(engine, workspace, "s1")
    assert [(m.position, m.text) for m in messages] == [
        (clash.last_position, "planted"),
        (after.last_position, "two"),
    ]


FAIL_ON: set[str] = set()


class Picky(SessionsProjection):
    """A sessions projection with a handler that refuses chosen texts, and halts on poison."""

    name: ClassVar[str] = "picky"
    on_poison: ClassVar[PoisonPolicy] = "halt"

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        def message(recorded: Any) -> Iterator[Write]:
            if recorded.event.text in FAIL_ON:
                raise ValueError(f"refusing {recorded.event.text!r}")
            yield from SessionsProjection.received(recorded)

        return {**super().handlers(), MessageReceived: message}


async def test_halt_policy_stops_before_the_poison_event_until_retried(
    private_store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    store = private_store
    picky = Picky()
    ref = AggregateRef(workspace, "session", "s1")
    opened = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    FAIL_ON.add(f"bad-{workspace}")
    bad = await store.append(
        ref, [MessageReceived(message_id="m1", author="a", text=f"bad-{workspace}")]
    )
    after = await store.append(ref, [MessageReceived(message_id="m2", author="a", text="ok")])
    async with projecting(store, engine, [picky]):
        await wait_for_position(engine, "picky", opened.last_position)
        await asyncio.sleep(0.5)
        async with engine.connect() as connection:
            [live] = await list_generations(connection, "picky")
        assert live.position < bad.last_position
        assert live.halted is not None
        assert "refusing" in live.halted
        [health] = [h for h in await projection_health(engine, store) if h.projection == "picky"]
        assert health.state == "failed"
        assert health.dead_letters == 1

        FAIL_ON.clear()  # the "fix" is deployed
        result = await retry_dead_letters(engine, store, picky)
        assert result.unhalted
        await wait_for_position(engine, "picky", after.last_position, timeout=10)
    # Picky owns the `messages` view in this database: both messages, in order, once each.
    messages = await list_messages(engine, workspace, "s1")
    assert [m.text for m in messages] == [f"bad-{workspace}", "ok"]
    assert await list_dead_letters(engine, "picky") == []


async def test_continue_policy_retry_applies_dead_letters(
    private_store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    store = private_store

    class Lenient(Picky):
        name: ClassVar[str] = "lenient"
        on_poison = "continue"

    lenient = Lenient()
    ref = AggregateRef(workspace, "session", "s1")
    await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    FAIL_ON.add(f"later-{workspace}")
    bad = await store.append(
        ref, [MessageReceived(message_id="m1", author="a", text=f"later-{workspace}")]
    )
    ok = await store.append(ref, [MessageReceived(message_id="m2", author="a", text="ok")])
    async with projecting(store, engine, [lenient]):
        await wait_for_position(engine, "lenient", ok.last_position)
    [letter] = await list_dead_letters(engine, "lenient")
    assert letter.position == bad.last_position
    FAIL_ON.clear()
    result = await retry_dead_letters(engine, store, lenient)
    assert result.resolved == [letter.id]
    assert result.failed == {}
    assert await list_dead_letters(engine, "lenient") == []


# ---------------------------------------------------------------------------- rebuilds


async def _view_target(engine: AsyncEngine, view: str) -> str:
    async with engine.connect() as connection:
        definition = await connection.scalar(
            text("SELECT definition FROM pg_views WHERE viewname = :v"), {"v": view}
        )
    return str(definition)


async def test_blue_green_rebuild_while_events_are_appended(
    store: EventStore, engine: AsyncEngine, database_url: str, workspace: str
) -> None:
    last = await conversation(store, workspace, sessions=20, messages=20, seed=5)
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", last, timeout=30)
        assert "sessions_g1" in await _view_target(engine, "sessions")
        counts: list[int] = []
        stop_watch = asyncio.Event()

        async def watch() -> None:
            while not stop_watch.is_set():
                async with engine.connect() as connection:
                    counts.append(
                        int(
                            await connection.scalar(
                                text("SELECT count(*) FROM messages WHERE workspace = :w"),
                                {"w": workspace},
                            )
                            or 0
                        )
                    )
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        building = await start_rebuild(engine, SessionsProjection())
        assert building.status == "building"
        assert building.generation == 2
        more = await conversation(store, f"{workspace}x", sessions=5, messages=5, seed=6)
        extra = await conversation(store, workspace, sessions=0, messages=0) or more
        for _ in range(200):
            async with engine.connect() as connection:
                gens = {
                    g.generation: g
                    for g in await list_generations(connection, "sessions", include_retired=True)
                }
            if gens[2].status == "live":
                break
            await asyncio.sleep(0.05)
        assert gens[2].status == "live"
        assert gens[1].status == "retired"
        await wait_for_position(engine, "sessions", max(more, extra))
        stop_watch.set()
        await watcher
    assert "sessions_g2" in await _view_target(engine, "sessions")
    # the live view never went backwards (no partial generation was ever visible)
    assert counts == sorted(counts)
    async with engine.connect() as connection:
        old_tables = await connection.scalar(
            text("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%\\_g1'")
        )
    assert old_tables == 0
    assert await table_rows(engine, workspace) == await fresh_rebuild_rows(
        store, database_url, workspace, max(more, extra)
    )


async def test_version_bump_rebuilds_and_queries_keep_the_old_tables_until_the_swap(
    store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    last = await conversation(store, workspace, sessions=5, messages=5, seed=9)
    async with projecting(store, engine):
        await wait_for_position(engine, "sessions", last)

    current = SessionsProjection.version

    class SessionsV2(SessionsProjection):
        version: ClassVar[int] = current + 1

    await ensure_generations(engine, [SessionsV2()])
    async with engine.connect() as connection:
        gens = await list_generations(connection, "sessions")
    assert [(g.generation, g.version, g.status) for g in gens] == [
        (1, current, "live"),
        (2, current + 1, "building"),
    ]
    assert "sessions_g1" in await _view_target(engine, "sessions")
    async with projecting(store, engine, [SessionsV2()]):
        for _ in range(200):
            async with engine.connect() as connection:
                gens = await list_generations(connection, "sessions")
            if [g.generation for g in gens if g.status == "live"] == [2]:
                break
            await asyncio.sleep(0.05)
    assert [(g.generation, g.status) for g in gens] == [(2, "live")]
    assert "sessions_g2" in await _view_target(engine, "sessions")


# ---------------------------------------------------------------------------- health


def generation(position: int, updated_ago: float, halted: str | None = None) -> Generation:
    now = datetime.now(UTC)
    return Generation(
        "p", 1, 1, "live", position, None, halted, now, now - timedelta(seconds=updated_ago)
    )


@pytest.mark.parametrize(
    ("lag", "lag_seconds", "updated_ago", "halted", "state"),
    [
        (0, 0.0, 999, None, "running"),
        (10, 1.0, 0.5, None, "catching up"),
        (10, 60.0, 1.0, None, "catching up"),  # checkpoint moving: slow, not stalled
        (10, 60.0, 60.0, None, "stalled"),
        (0, 0.0, 0.0, "boom", "failed"),
    ],
)
def test_classify(
    lag: int, lag_seconds: float, updated_ago: float, halted: str | None, state: str
) -> None:
    assert (
        classify(
            generation(5, updated_ago, halted),
            lag_events=lag,
            lag_seconds=lag_seconds,
            now=datetime.now(UTC),
            stall_after=30,
        )
        == state
    )


async def test_a_projection_that_does_not_advance_is_reported_stalled(
    store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    await ensure_generations(engine, [SessionsProjection()])  # a generation, but no worker
    await conversation(store, workspace, sessions=1, messages=1)
    await asyncio.sleep(1.2)
    [health] = await projection_health(engine, store, stall_after=1.0)
    assert health.state == "stalled"
    assert health.lag_events > 0
    assert health.lag_seconds > 1.0
    metrics = prometheus_text([health])
    assert (
        'agentbus_projection_state{projection="sessions",generation="1",status="live",'
        'state="stalled"} 1' in metrics
    )
    assert "agentbus_projection_lag_events{" in metrics


async def test_read_your_writes_waits_then_times_out_clearly(
    store: EventStore, engine: AsyncEngine, workspace: str
) -> None:
    await ensure_generations(engine, [SessionsProjection()])
    ref = AggregateRef(workspace, "session", "s1")
    written = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    with pytest.raises(ProjectionTimeout) as timeout:
        await get_session(engine, workspace, "s1", min_position=written.last_position, timeout=0.3)
    assert f"not {written.last_position}" in str(timeout.value)
    async with projecting(store, engine):
        session = await get_session(engine, workspace, "s1", min_position=written.last_position)
    assert session is not None


async def test_sleep_or_stop_passes_on_a_cancellation_that_comes_with_stop() -> None:
    """On Python 3.11, `asyncio.wait_for` returns, and drops the cancellation, when the task is
    cancelled as the awaited event is set: a worker cancelled at that moment would go on. The
    waits in src/ use `asyncio.timeout`, which passes it on."""
    for yields in range(4):
        for _ in range(25):
            stop = asyncio.Event()
            task = asyncio.create_task(sleep_or_stop(stop, 10))
            for _ in range(yields):
                await asyncio.sleep(0)
            stop.set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_the_waits_in_src_do_not_use_wait_for() -> None:
    """For the reason above."""
    source = Path(__file__).resolve().parent.parent / "src"
    assert not [
        str(path.relative_to(source))
        for path in source.rglob("*.py")
        if "asyncio.wait_for(" in path.read_text()
    ]
