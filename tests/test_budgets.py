"""Token budgets end to end on real servers: reservations by real run workers under
concurrency, settlement and release on every way an attempt ends, takeovers, period resets,
queue-time refusal, the `budgets` and `budget_ledger` read models, and the incremental load
path (`StateCache`) they rely on. Tests that touch the run queue have a nats-server each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.domain.budget import (
    BUDGET,
    BudgetExceeded,
    Budgets,
    budget_ref,
    ensure_can_start,
    set_budget,
)
from agentbus.domain.handling import StateCache, handle, load
from agentbus.domain.run import RUN, Cancel, QueueRun, StartRun
from agentbus.domain.session import SESSION, OpenSession, ReceiveMessage
from agentbus.events import AggregateRef
from agentbus.events.budget import (
    BudgetExhausted,
    BudgetPeriodStarted,
    ReservationReleased,
    ReservationSettled,
    TokensReserved,
)
from agentbus.events.run import RunFailed
from agentbus.events.session import (
    MessageReceived,
    MessageSent,
    RunAssigned,
    RunReleased,
    SessionOpened,
)
from agentbus.executors.executor import Executor, ExecutorError, RunOutput, RunRequest
from agentbus.projections.budgets import BudgetsProjection
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.queries.consistency import wait_for_position
from agentbus.settings import AgentConfig
from agentbus.store import EventStore
from agentbus.store.eventstore import RecordedEvent
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.runs import RunWorker

from .conftest import another_database

FAST = RuntimeOptions(batch_size=1000, linger=0.01, lock_poll=0.2, scan_interval=0.2)
DAY = datetime(2026, 11, 21, 12, tzinfo=UTC)


class Metered:
    """A model call that takes a moment and reports 400 + 600 tokens."""

    name = "metered"

    def __init__(self, delay: float = 0.05, fail: ExecutorError | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.calls: list[tuple[str, int]] = []

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        self.calls.append((request.run_id, request.attempt))
        await asyncio.sleep(self.delay)
        if self.fail is not None and len(self.calls) == 1:
            raise self.fail
        await output.usage("m", 400, 600)
        return "done"


class Hanging:
    """Never answers: ends by cancel or timeout, without usage."""

    name = "hanging"

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        self.started.set()
        await asyncio.sleep(60)
        return "too late"


class Broken:
    name = "broken"

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        raise ExecutorError("http_status", "HTTP 400 from the model", retryable=False)


@asynccontextmanager
async def workers(
    store: EventStore,
    agents: dict[str, AgentConfig],
    executors: dict[str, Executor],
    *,
    count: int = 1,
    concurrency: int = 8,
    lease: float = 5.0,
    auto_reply: bool = False,
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    pool = [
        RunWorker(
            store,
            store._nc,
            agents,
            name=f"w{n}",
            executors=executors,
            lease=lease,
            concurrency=concurrency,
            retry_backoff=timedelta(milliseconds=50),
        )
        for n in range(count)
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    if auto_reply:
        tasks.append(asyncio.create_task(AutoReply(store, store._nc, agents).run(stop)))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def queue(store: EventStore, ref: AggregateRef, agent: str, attempts: int = 1) -> None:
    await handle(store, RUN, ref, QueueRun(agent, "echo", "hi", max_attempts=attempts))


async def until(
    store: EventStore, ref: AggregateRef, statuses: Iterable[str], timeout: float = 15
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state, _ = await load(store, RUN, ref)
        if state.status in statuses:
            return state.status
        if time.monotonic() > deadline:
            raise AssertionError(f"run {ref.id} is {state.status}, not {set(statuses)}")
        await asyncio.sleep(0.05)


async def budget_events(store: EventStore, workspace: str) -> list[RecordedEvent]:
    return list((await store.load(budget_ref(workspace))).events)


def of_run(events: list[RecordedEvent], run_id: str) -> list[tuple[str, str | None]]:
    """(event name, release reason) of one run's budget events, in order."""
    return [
        (e.event.kind.name, getattr(e.event, "reason", None))
        for e in events
        if getattr(e.event, "run_id", None) == run_id
    ]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@asynccontextmanager
async def projecting(
    store: EventStore, engine: AsyncEngine, options: RuntimeOptions = FAST
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(Projector([BudgetsProjection()], store, engine, options).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        return [dict(r._mapping) for r in (await connection.execute(text(sql), params)).all()]


# ---------------------------------------------------------------------------- the hard limit


async def test_fifty_concurrent_runs_against_a_budget_worth_ten_calls(
    private_store: EventStore, engine: AsyncEngine
) -> None:
    """Five workers run 50 runs at once; each call reserves 1000 tokens and uses them all.
    Exactly ten calls happen; the rest fail `budget_exhausted` without calling the model."""
    store = private_store
    await set_budget(store, "acme", limit_tokens=10_000, period="none", by="ada")
    metered = Metered(delay=0.1)
    agents = {"metered": AgentConfig(executor="echo", max_tokens=1000)}
    refs = [AggregateRef("acme", "run", f"r{n}") for n in range(50)]
    async with projecting(store, engine):
        async with workers(store, agents, {"metered": metered}, count=5, concurrency=10):
            await asyncio.gather(*(queue(store, ref, "metered") for ref in refs))
            ended = [await until(store, ref, ["succeeded", "failed"]) for ref in refs]
        events = await budget_events(store, "acme")
        await wait_for_position(engine, "budgets", events[-1].position, timeout=10)
    assert ended.count("succeeded") == 10
    assert len(metered.calls) == 10  # no model call without a reservation
    for ref, status in zip(refs, ended, strict=True):
        if status == "failed":
            failed = (await store.load(ref)).events[-1].event
            assert isinstance(failed, RunFailed)
            assert (failed.error_class, failed.retryable) == ("budget_exhausted", False)
            assert "workspace acme: budget exceeded for all" in failed.message

    settled = [e.event for e in events if isinstance(e.event, ReservationSettled)]
    assert sum(s.used for s in settled) == 10_000  # <= the limit, and all of it
    assert all(getattr(e.event, "balance", 0) >= 0 for e in events)
    assert len([e for e in events if isinstance(e.event, TokensReserved)]) == 10
    assert len([e for e in events if isinstance(e.event, BudgetExhausted)]) == 1

    ledger = await rows(
        engine,
        "SELECT * FROM budget_ledger WHERE workspace = 'acme' ORDER BY position",
    )
    assert [r["entry"] for r in ledger].count("reserved") == 10
    assert all(r["balance"] >= 0 for r in ledger)
    used = reserved = 0
    for row in ledger:  # every row's running figures follow from the rows before it
        used, reserved = used + row["used_delta"], reserved + row["reserved_delta"]
        assert (row["period_used"], row["period_reserved"]) == (used, reserved)
        assert row["balance"] == row["limit_tokens"] - used - reserved
    (budget,) = await rows(engine, "SELECT * FROM budgets WHERE workspace = 'acme'")
    assert (budget["scope"], budget["period"], budget["limit_tokens"]) == (
        "workspace",
        "all",
        10_000,
    )
    assert (budget["used"], budget["reserved"], budget["balance"]) == (10_000, 0, 0)
    assert budget["exhausted"] is True
    assert budget["exhausted_at"] is not None


# ---------------------------------------------------------------------------- every way out


async def test_every_way_an_attempt_ends_settles_or_releases(private_store: EventStore) -> None:
    store = private_store
    await set_budget(store, "acme", limit_tokens=100_000, period="monthly", by="ada")
    hanging = Hanging()
    flaky = Metered(fail=ExecutorError("network", "connection reset", retryable=True))
    agents = {
        "ok": AgentConfig(executor="echo", max_tokens=2000),
        "flaky": AgentConfig(executor="echo", max_tokens=2000),
        "broken": AgentConfig(executor="echo", max_tokens=2000),
        "hanging": AgentConfig(executor="echo", max_tokens=2000),
        "late": AgentConfig(executor="echo", max_tokens=2000, timeout=0.3),
    }
    executors: dict[str, Executor] = {
        "ok": Metered(),
        "flaky": flaky,
        "broken": Broken(),
        "hanging": hanging,
        "late": Hanging(),
    }
    ref = {name: AggregateRef("acme", "run", name) for name in agents}
    async with workers(store, agents, executors):
        for name in agents:
            await queue(store, ref[name], name, attempts=2)
        await asyncio.wait_for(hanging.started.wait(), 10)
        await handle(store, RUN, ref["hanging"], Cancel("ada", "never mind"))
        assert await until(store, ref["ok"], ["succeeded"]) == "succeeded"
        assert await until(store, ref["flaky"], ["succeeded"]) == "succeeded"
        assert await until(store, ref["broken"], ["failed"]) == "failed"
        assert await until(store, ref["late"], ["timed_out"]) == "timed_out"
        await until(store, ref["hanging"], ["cancelled"])
        await asyncio.sleep(0.3)  # the cancelled attempt gives its tokens back after the event
    events = await budget_events(store, "acme")
    assert of_run(events, "ok") == [("tokens_reserved", None), ("reservation_settled", None)]
    assert of_run(events, "flaky") == [
        ("tokens_reserved", None),
        ("reservation_released", "retry"),
        ("tokens_reserved", None),
        ("reservation_settled", None),
    ]
    assert of_run(events, "broken") == [
        ("tokens_reserved", None),
        ("reservation_released", "failed"),
    ]
    assert of_run(events, "hanging") == [
        ("tokens_reserved", None),
        ("reservation_released", "cancelled"),
    ]
    assert of_run(events, "late") == [
        ("tokens_reserved", None),
        ("reservation_released", "timed_out"),
    ]
    state, _ = await load(store, BUDGET, budget_ref("acme"))
    assert state.open == {}  # nothing leaked
    books = state.books[state.current or ""]
    assert (books.used, books.reserved, books.balance) == (2000, 0, 98_000)


async def test_a_takeover_or_the_runs_end_gives_back_a_dead_workers_tokens(
    private_store: EventStore,
) -> None:
    """A worker that died mid-attempt leaves its reservation open: the next attempt's
    reservation releases it (superseded); a run that ended meanwhile is released on its end."""
    store = private_store
    budgets = Budgets(store)
    await budgets.set("acme", limit_tokens=3000, period="none", by="ada")
    taken, ended = AggregateRef("acme", "run", "taken"), AggregateRef("acme", "run", "ended")
    for ref in (taken, ended):  # queued, claimed and reserved by a worker that then died
        await queue(store, ref, "ok", attempts=3)
        await handle(store, RUN, ref, StartRun("dead", datetime.now(UTC)))
        await budgets.reserve(ref, "ok", 1, 1500)
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(AggregateRef("acme", "run", "other"), "ok", 1, 1)
    await handle(store, RUN, ended, Cancel("ada"))
    agents = {"ok": AgentConfig(executor="echo", max_tokens=1500)}
    async with workers(store, agents, {"ok": Metered()}):
        assert await until(store, taken, ["succeeded"]) == "succeeded"
        deadline = time.monotonic() + 10
        while (await budgets.state(budget_ref("acme"))).open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    events = await budget_events(store, "acme")
    assert of_run(events, "taken") == [
        ("tokens_reserved", None),
        ("reservation_released", "superseded"),
        ("tokens_reserved", None),
        ("reservation_settled", None),
    ]
    assert of_run(events, "ended") == [
        ("tokens_reserved", None),
        ("reservation_released", "run_ended"),
    ]
    state = await budgets.state(budget_ref("acme"))
    assert state.open == {}
    assert state.books["all"].used == 1000


# ---------------------------------------------------------------------------- queue time


async def test_an_exhausted_workspace_refuses_new_runs_at_queue_time(
    private_store: EventStore,
) -> None:
    store = private_store
    await set_budget(store, "acme", limit_tokens=500, period="daily", by="ada")
    with pytest.raises(
        BudgetExceeded,
        match=r"workspace acme: budget nearly exhausted for \d{4}-\d\d-\d\d: 500 of 500 "
        r"tokens left, a call may use 4096; the budget resets at \d{4}-\d\d-\d\dT00:00:00Z",
    ):
        await ensure_can_start(store, "acme", "echo", 4096)
    await ensure_can_start(store, "elsewhere", "echo", 4096)  # no budget: unlimited

    session = AggregateRef("acme", "session", "chat")
    await handle(store, SESSION, session, OpenSession("web", agent="echo"))
    agents = {"echo": AgentConfig(executor="echo")}
    async with workers(store, agents, {}, auto_reply=True):
        await handle(store, SESSION, session, ReceiveMessage("m1", "ada", "hello"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = [e.event for e in (await store.load(session)).events]
            if any(isinstance(e, RunReleased) for e in events):
                break
            await asyncio.sleep(0.05)
    (notice,) = [e for e in events if isinstance(e, MessageSent)]
    assert notice.author == "agentbus"
    assert notice.text.startswith("Not answered: workspace acme: budget nearly exhausted for")
    opened, received, assigned, _, released = events
    assert (type(opened), type(received), type(released)) == (
        SessionOpened,
        MessageReceived,
        RunReleased,
    )
    assert isinstance(assigned, RunAssigned)
    run_id = assigned.run_id
    assert (await store.load(AggregateRef("acme", "run", run_id))).events == ()


async def test_an_agent_budget_applies_on_top_of_the_workspace_budget(
    store: EventStore, workspace: str
) -> None:
    budgets = Budgets(store)
    await budgets.set(workspace, limit_tokens=10_000, period="none", by="ada")
    await budgets.set(workspace, limit_tokens=1500, period="none", by="ada", agent="helper")
    run = AggregateRef(workspace, "run", "r1")
    hold = await budgets.reserve(run, "helper", 1, 1000)
    assert hold.budgets == (budget_ref(workspace, "helper"), budget_ref(workspace))
    with pytest.raises(BudgetExceeded, match=f"agent helper in workspace {workspace}: budget"):
        await budgets.reserve(AggregateRef(workspace, "run", "r2"), "helper", 1, 1000)
    await budgets.reserve(AggregateRef(workspace, "run", "r3"), "other", 1, 1000)  # no agent cap
    await budgets.settle(hold, 700)
    agent = await budgets.state(budget_ref(workspace, "helper"))
    whole = await budgets.state(budget_ref(workspace))
    assert (agent.books["all"].used, agent.books["all"].reserved) == (700, 0)
    assert (whole.books["all"].used, whole.books["all"].reserved) == (700, 1000)

    # the agent's reservation is given back when the workspace then refuses
    await budgets.set(workspace, limit_tokens=1000, period="none", by="ada")
    with pytest.raises(BudgetExceeded, match=f"workspace {workspace}: budget exceeded"):
        await budgets.reserve(AggregateRef(workspace, "run", "r4"), "helper", 1, 500)
    agent = await budgets.state(budget_ref(workspace, "helper"))
    assert agent.open == {}
    assert [
        e.event.reason
        for e in (await store.load(budget_ref(workspace, "helper"))).events
        if isinstance(e.event, ReservationReleased)
    ] == ["not_started"]


# ---------------------------------------------------------------------------- periods, ledger


async def test_a_daily_period_resets_and_the_read_models_show_both_days(
    store: EventStore, workspace: str, engine: AsyncEngine, database_url: str
) -> None:
    budgets = Budgets(store)
    await budgets.set(workspace, limit_tokens=2000, period="daily", alert_at=0.5, by="ada", now=DAY)
    first = await budgets.reserve(AggregateRef(workspace, "run", "r1"), "echo", 1, 2000, DAY)
    late = await budgets.reserve(AggregateRef(workspace, "run", "r2"), "echo", 1, 0, DAY)
    await budgets.settle(first, 2000)
    with pytest.raises(BudgetExceeded, match="budget exhausted for 2026-11-21"):
        await budgets.ensure_can_start(workspace, "echo", 1, DAY)
    tomorrow = DAY + timedelta(days=1)
    await budgets.ensure_can_start(workspace, "echo", 2000, tomorrow)
    await budgets.reserve(AggregateRef(workspace, "run", "r3"), "echo", 1, 500, tomorrow)
    await budgets.settle(late, 0)  # yesterday's call settles against yesterday

    events = await budget_events(store, workspace)
    names = [e.event.kind.name for e in events]
    assert names == [
        "set",
        "tokens_reserved",
        "tokens_reserved",
        "reservation_settled",
        "alerted",
        "exhausted",
        "period_started",
        "tokens_reserved",
        "reservation_settled",
    ]
    started = events[6].event
    assert isinstance(started, BudgetPeriodStarted)
    assert (started.period, started.balance) == ("2026-11-22", 2000)
    assert [r.reservation_id for r in started.open_reservations] == ["r2:1"]

    # A cold load starts at the last period start, and agrees with the incremental one.
    ref = budget_ref(workspace)
    snapshot = ref.subject("period_started")
    assert await store.last_positions([snapshot]) == {snapshot: events[6].position}
    cold, position = await load(store, BUDGET, ref)
    assert (cold, position) == (await budgets.state(ref), events[-1].position)
    assert cold == BUDGET.fold(e.event for e in events)

    async with projecting(store, engine):
        await wait_for_position(engine, "budgets", events[-1].position, timeout=10)
    days = await rows(
        engine,
        "SELECT period, limit_tokens, used, reserved, balance, exhausted, "
        "alerted_at IS NOT NULL AS alerted FROM budgets WHERE workspace = :w ORDER BY period",
        w=workspace,
    )
    assert days == [
        {
            "period": "2026-11-21",
            "limit_tokens": 2000,
            "used": 2000,
            "reserved": 0,
            "balance": 0,
            "exhausted": True,
            "alerted": True,
        },
        {
            "period": "2026-11-22",
            "limit_tokens": 2000,
            "used": 0,
            "reserved": 500,
            "balance": 1500,
            "exhausted": False,
            "alerted": False,
        },
    ]
    ledger = await rows(
        engine,
        "SELECT period, entry, reservation_id, balance FROM budget_ledger WHERE workspace = :w "
        "ORDER BY position",
        w=workspace,
    )
    assert [tuple(r.values()) for r in ledger] == [
        ("2026-11-21", "limit_set", None, 2000),
        ("2026-11-21", "reserved", "r1:1", 0),
        ("2026-11-21", "reserved", "r2:1", 0),
        ("2026-11-21", "settled", "r1:1", 0),
        ("2026-11-22", "period_started", None, 2000),
        ("2026-11-22", "reserved", "r3:1", 1500),
        ("2026-11-21", "settled", "r2:1", 0),
    ]

    # The batching rule: one event per batch gives the same tables as one big batch.
    async with another_database(database_url, f"one_by_one_{workspace}") as other:
        one = RuntimeOptions(batch_size=1, linger=0, lock_poll=0.2, scan_interval=0.2)
        async with projecting(store, other, one):
            await wait_for_position(other, "budgets", events[-1].position, timeout=20)
        for table in ("budgets", "budget_ledger"):
            sql = f"SELECT * FROM {table} WHERE workspace = :w ORDER BY 1, 2, 3"
            assert await rows(other, sql, w=workspace) == await rows(engine, sql, w=workspace)


# ---------------------------------------------------------------------------- the load path


async def test_a_cached_load_reads_only_what_was_appended_since(
    store: EventStore, workspace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = budget_ref(workspace)
    ours, theirs = Budgets(store, StateCache()), Budgets(store, StateCache())
    await ours.set(workspace, limit_tokens=10_000, period="none", by="ada")
    first = await ours.reserve(AggregateRef(workspace, "run", "r1"), "echo", 1, 1000)
    # another process appends; our cache is stale and our next append must still be right
    await theirs.reserve(AggregateRef(workspace, "run", "r2"), "echo", 1, 1000)
    reads: list[int] = []
    original = store.load

    async def counting(ref: AggregateRef, *, after: int = 0) -> Any:
        history = await original(ref, after=after)
        reads.append(len(history.events))
        return history

    monkeypatch.setattr(store, "load", counting)
    await ours.settle(first, 500)
    monkeypatch.undo()
    assert max(reads) <= 2  # the missed reservation (and the conflict's catch-up), not all
    state = await ours.state(ref)
    assert state == BUDGET.fold(e.event for e in (await store.load(ref)).events)
    assert (state.books["all"].used, state.books["all"].reserved) == (500, 1000)

    cache = StateCache(size=2)
    for n in range(3):
        cache.put(AggregateRef(workspace, "run", f"r{n}"), None, n)
    assert len(cache) == 2
    assert cache.get(AggregateRef(workspace, "run", "r0")) is None
    cache.put(AggregateRef(workspace, "run", "r2"), "older", 1)  # never goes back
    assert cache.get(AggregateRef(workspace, "run", "r2")) == (None, 2)


async def test_incremental_reads_from_the_store(store: EventStore, workspace: str) -> None:
    ref = AggregateRef(workspace, "session", "s1")
    await handle(store, SESSION, ref, OpenSession("web"))
    second = await handle(store, SESSION, ref, ReceiveMessage("m1", "ada", "hi"))
    whole = await store.load(ref)
    assert [e.position for e in (await store.load(ref, after=whole.events[0].position)).events] == [
        second.position
    ]
    empty = await store.load(ref, after=second.position)
    assert (empty.events, empty.last_position) == ((), second.position)
    opened = ref.subject("opened")
    assert await store.last_positions([opened]) == {opened: whole.events[0].position}
    assert await store.last_positions([ref.filter]) == {
        opened: whole.events[0].position,
        ref.subject("message_received"): second.position,
    }
    assert await store.last_positions([ref.subject("closed"), f"evt.{workspace}.run.*.*"]) == {}
