"""Runs end to end on real servers: the queue, workers, executors, live output, auto-reply and
the runs read models. Each test has its own nats-server (the run queue is server-wide)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.domain.handling import handle, load
from agentbus.domain.run import RUN, Cancel, QueueRun
from agentbus.domain.session import SESSION, OpenSession, ReceiveMessage, SessionBusy
from agentbus.events import AggregateRef
from agentbus.events.run import RunStarted, RunSucceeded
from agentbus.events.session import MessageSent, RunAssigned, RunReleased
from agentbus.executors.executor import Executor, ExecutorError, RunOutput, RunRequest
from agentbus.projections.runs import RunsProjection
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.projections.sessions import SessionsProjection
from agentbus.queries.consistency import wait_for_position
from agentbus.settings import AgentConfig
from agentbus.store import EventStore
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.capacity import RunSlots
from agentbus.workers.runs import RunWorker

ECHO = {"echo": AgentConfig(executor="echo", options={"word_delay": 0})}


@asynccontextmanager
async def workers(
    store: EventStore,
    agents: dict[str, AgentConfig],
    *,
    count: int = 1,
    executors: dict[str, Executor] | None = None,
    lease: float = 5.0,
    concurrency: int = 8,
    auto_reply: bool = False,
) -> AsyncIterator[list[RunWorker]]:
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
            retry_backoff=timedelta(milliseconds=100),
        )
        for n in range(count)
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    if auto_reply:
        tasks.append(asyncio.create_task(AutoReply(store, store._nc, agents).run(stop)))
    try:
        yield pool
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def until(
    store: EventStore, ref: AggregateRef, statuses: Iterable[str], timeout: float = 15
) -> str:
    deadline = time.monotonic() + timeout
    wanted = set(statuses)
    while True:
        state, _ = await load(store, RUN, ref)
        if state.status in wanted:
            return state.status
        if time.monotonic() > deadline:
            raise AssertionError(f"run {ref.id} is {state.status}, not {wanted}")
        await asyncio.sleep(0.05)


async def queue(
    store: EventStore,
    ref: AggregateRef,
    agent: str = "echo",
    text_: str = "hello",
    executor: str = "echo",
    max_attempts: int = 3,
    deadline: datetime | None = None,
) -> None:
    await handle(
        store,
        RUN,
        ref,
        QueueRun(agent, executor, text_, max_attempts=max_attempts, deadline_at=deadline),
    )


def types(history: Iterable[object]) -> list[str]:
    return [e.event.kind.name for e in history]  # type: ignore[attr-defined]


async def test_a_queued_run_is_executed_and_streams_live_output(private_store: EventStore) -> None:
    store = private_store
    ref = AggregateRef("acme", "run", "r1")
    live: list[dict[str, object]] = []

    async def collect(msg: object) -> None:
        live.append(orjson.loads(msg.data))  # type: ignore[attr-defined]

    sub = await store._nc.subscribe("live.acme.run.r1.>", cb=collect)
    async with workers(store, {"echo": AgentConfig(executor="echo", options={"word_delay": 0.01})}):
        await queue(store, ref, text_="one two three four")
        assert await until(store, ref, ["succeeded"]) == "succeeded"
    await sub.unsubscribe()
    history = (await store.load(ref)).events
    assert types(history) == ["queued", "started", "usage_recorded", "succeeded"]
    succeeded = history[-1].event
    assert isinstance(succeeded, RunSucceeded)
    assert succeeded.output == "echo: one two three four"
    deltas = [m for m in live if m["type"] == "delta"]
    assert "".join(str(m["text"]) for m in deltas) == succeeded.output
    assert [m["seq"] for m in live] == sorted(m["seq"] for m in live)  # type: ignore[type-var]
    # coalesced: fewer messages than words
    assert 1 <= len(deltas) <= 5


async def test_the_same_run_id_queued_twice_is_one_run(private_store: EventStore) -> None:
    ref = AggregateRef("acme", "run", "twice")
    await queue(private_store, ref)
    await queue(private_store, ref)
    assert types((await private_store.load(ref)).events) == ["queued"]


class Flaky:
    name = "flaky"

    def __init__(self, failures: int, retryable: bool = True) -> None:
        self.failures = failures
        self.retryable = retryable
        self.calls: list[int] = []

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        self.calls.append(request.attempt)
        if len(self.calls) <= self.failures:
            raise ExecutorError("network", f"flaky #{len(self.calls)}", retryable=self.retryable)
        return "finally"


async def test_retry_with_backoff_until_success(private_store: EventStore) -> None:
    flaky = Flaky(failures=2)
    ref = AggregateRef("acme", "run", "flaky")
    agents = {"flaky": AgentConfig(executor="echo", max_attempts=3)}
    async with workers(private_store, agents, executors={"flaky": flaky}):
        await queue(private_store, ref, agent="flaky", max_attempts=3)
        assert await until(private_store, ref, ["succeeded", "failed"]) == "succeeded"
    history = (await private_store.load(ref)).events
    assert types(history) == [
        "queued",
        "started",
        "retry_scheduled",
        "started",
        "retry_scheduled",
        "started",
        "succeeded",
    ]
    assert flaky.calls == [1, 2, 3]
    retries = [e for e in history if e.event.kind.name == "retry_scheduled"]
    gaps = [(r.event.at - r.time).total_seconds() for r in retries]  # type: ignore[attr-defined]
    assert gaps[1] > gaps[0]  # exponential backoff


async def test_max_attempts_then_failed(private_store: EventStore) -> None:
    flaky = Flaky(failures=10)
    ref = AggregateRef("acme", "run", "hopeless")
    async with workers(
        private_store, {"flaky": AgentConfig(executor="echo")}, executors={"flaky": flaky}
    ):
        await queue(private_store, ref, agent="flaky", max_attempts=2)
        assert await until(private_store, ref, ["failed"]) == "failed"
    assert flaky.calls == [1, 2]
    assert types((await private_store.load(ref)).events)[-1] == "failed"


async def test_non_retryable_failure_fails_at_once(private_store: EventStore) -> None:
    flaky = Flaky(failures=10, retryable=False)
    ref = AggregateRef("acme", "run", "fatal")
    async with workers(
        private_store, {"flaky": AgentConfig(executor="echo")}, executors={"flaky": flaky}
    ):
        await queue(private_store, ref, agent="flaky", max_attempts=5)
        assert await until(private_store, ref, ["failed"]) == "failed"
    assert flaky.calls == [1]


class Slow:
    name = "slow"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled_at: float | None = None

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            raise
        return "too late"


async def test_cancel_is_honoured_mid_run_within_a_second(private_store: EventStore) -> None:
    slow = Slow()
    ref = AggregateRef("acme", "run", "cancel-me")
    async with workers(
        private_store, {"slow": AgentConfig(executor="echo")}, executors={"slow": slow}
    ):
        await queue(private_store, ref, agent="slow")
        await asyncio.wait_for(slow.started.wait(), 10)
        asked = time.monotonic()
        await handle(private_store, RUN, ref, Cancel("ada", "stop"))
        for _ in range(100):
            if slow.cancelled_at is not None:
                break
            await asyncio.sleep(0.02)
    assert slow.cancelled_at is not None
    assert slow.cancelled_at - asked < 1.0
    assert types((await private_store.load(ref)).events) == ["queued", "started", "cancelled"]


async def test_deadline_ends_in_timed_out(private_store: EventStore) -> None:
    slow = Slow()
    ref = AggregateRef("acme", "run", "late")
    agents = {"slow": AgentConfig(executor="echo", timeout=0.5)}
    async with workers(private_store, agents, executors={"slow": slow}):
        await queue(private_store, ref, agent="slow")
        assert await until(private_store, ref, ["timed_out"]) == "timed_out"
    assert slow.cancelled_at is not None


async def test_a_run_queued_past_its_deadline_times_out_without_starting(
    private_store: EventStore,
) -> None:
    ref = AggregateRef("acme", "run", "expired")
    async with workers(private_store, ECHO):
        await queue(private_store, ref, deadline=datetime.now(UTC) - timedelta(seconds=1))
        assert await until(private_store, ref, ["timed_out"]) == "timed_out"
    assert types((await private_store.load(ref)).events) == ["queued", "timed_out"]


async def test_twenty_workers_five_hundred_runs_each_succeeds_exactly_once(
    private_store: EventStore,
) -> None:
    store = private_store
    refs = [AggregateRef("load", "run", f"r{n}") for n in range(500)]
    async with workers(store, ECHO, count=20, concurrency=4):
        await asyncio.gather(*(queue(store, ref, text_=f"n {n}") for n, ref in enumerate(refs)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = len([e async for e in store.read(subjects=["evt.load.run.*.succeeded"])])
            if done >= 500:
                break
            await asyncio.sleep(0.5)
    succeeded: dict[str, int] = {}
    started_by: dict[str, set[str]] = {}
    async for event in store.read(subjects=["evt.load.run.>"]):
        if isinstance(event.event, RunSucceeded):
            succeeded[event.ref.id] = succeeded.get(event.ref.id, 0) + 1
        if isinstance(event.event, RunStarted):
            started_by.setdefault(event.ref.id, set()).add(event.event.worker)
    assert len(succeeded) == 500
    assert set(succeeded.values()) == {1}
    workers_used = set().union(*started_by.values())
    assert len(workers_used) > 5, "the work should spread over the workers"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


async def test_auto_reply_and_the_runs_read_models(
    private_store: EventStore, engine: AsyncEngine
) -> None:
    store = private_store
    session = AggregateRef("acme", "session", "chat1")
    await handle(store, SESSION, session, OpenSession("web", agent="echo"))
    await handle(store, SESSION, session, ReceiveMessage("m1", "ada", "hello there"))
    stop = asyncio.Event()
    projector = Projector(
        [SessionsProjection(), RunsProjection()],
        store,
        engine,
        RuntimeOptions(lock_poll=0.2, scan_interval=0.2),
    )
    projecting = asyncio.create_task(projector.run(stop))
    try:
        async with workers(store, ECHO, auto_reply=True):
            deadline = time.monotonic() + 15
            reply = None
            while reply is None and time.monotonic() < deadline:
                events = (await store.load(session)).events
                reply = next((e for e in events if isinstance(e.event, MessageSent)), None)
                await asyncio.sleep(0.05)
        assert reply is not None
        assert isinstance(reply.event, MessageSent)
        assert reply.event.text == "echo: hello there"
        assert reply.event.author == "echo"
        run_id = reply.event.run_id
        assert run_id is not None
        await wait_for_position(engine, "runs", reply.position, timeout=10)
        await wait_for_position(engine, "sessions", reply.position, timeout=10)
    finally:
        stop.set()
        await projecting
    async with engine.connect() as connection:
        run = (
            await connection.execute(
                text(
                    "SELECT status, attempts, tokens_in, tokens_out, session_id, output, "
                    "started_at,"
                    " finished_at FROM runs WHERE workspace = 'acme' AND id = :id"
                ),
                {"id": run_id},
            )
        ).one()
        steps = (
            (
                await connection.execute(
                    text(
                        "SELECT step FROM run_steps WHERE workspace = 'acme' AND run_id = :id "
                        "ORDER BY position"
                    ),
                    {"id": run_id},
                )
            )
            .scalars()
            .all()
        )
        messages = (
            await connection.execute(
                text(
                    "SELECT direction, text FROM messages WHERE workspace = 'acme' "
                    "ORDER BY position"
                )
            )
        ).all()
    assert run.status == "succeeded"
    assert run.attempts == 1
    assert (run.tokens_in, run.tokens_out) == (2, 3)
    assert run.session_id == "chat1"
    assert run.output == "echo: hello there"
    assert run.started_at is not None
    assert run.finished_at is not None
    assert steps == ["queued", "started", "usage_recorded", "succeeded"]
    assert [tuple(m) for m in messages] == [("in", "hello there"), ("out", "echo: hello there")]


# ---------------------------------------------------------------------------- session policies

SLOW_ECHO = {"echo": AgentConfig(executor="echo", options={"word_delay": 0.15})}


async def session_with(store: EventStore, sid: str, policy: str) -> AggregateRef:
    ref = AggregateRef("acme", "session", sid)
    await handle(store, SESSION, ref, OpenSession("web", agent="echo", concurrency=policy))  # type: ignore[arg-type]
    return ref


async def wait_for(store: EventStore, ref: AggregateRef, count: int, kind: type) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in (await store.load(ref)).events if isinstance(e.event, kind)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def run_history(store: EventStore, run_id: str) -> list[str]:
    return types((await store.load(AggregateRef("acme", "run", run_id))).events)


async def test_enqueue_policy_runs_messages_one_after_another(private_store: EventStore) -> None:
    store = private_store
    session = await session_with(store, "queueing", "enqueue")
    async with workers(store, SLOW_ECHO, auto_reply=True):
        await handle(store, SESSION, session, ReceiveMessage("m1", "ada", "first message here"))
        await handle(store, SESSION, session, ReceiveMessage("m2", "ada", "second message"))
        replies = await wait_for(store, session, 2, MessageSent)
    assert [r.event.text for r in replies] == ["echo: first message here", "echo: second message"]
    first, second = (r.event.run_id for r in replies)
    history = (await store.load(AggregateRef("acme", "run", second))).events
    first_done = next(
        e
        for e in (await store.load(AggregateRef("acme", "run", first))).events
        if e.event.kind.name == "succeeded"
    )
    # the second run was only queued once the first had ended
    assert history[0].event.kind.name == "queued"
    assert history[0].position > first_done.position


async def test_interrupt_policy_cancels_the_active_run(private_store: EventStore) -> None:
    store = private_store
    session = await session_with(store, "interrupting", "interrupt")
    async with workers(store, SLOW_ECHO, auto_reply=True):
        await handle(
            store,
            SESSION,
            session,
            ReceiveMessage("m1", "ada", "a long first message to be cut off"),
        )
        await wait_for(store, session, 1, RunAssigned)
        await asyncio.sleep(0.3)
        await handle(store, SESSION, session, ReceiveMessage("m2", "ada", "never mind"))
        replies = await wait_for(store, session, 1, MessageSent)
        await asyncio.sleep(0.5)
    events = (await store.load(session)).events
    assigned = [e.event.run_id for e in events if isinstance(e.event, RunAssigned)]
    assert len(assigned) == 2
    assert await run_history(store, assigned[0]) == ["queued", "started", "cancelled"]
    assert [r.event.text for r in replies] == ["echo: never mind"]
    assert len([e for e in events if isinstance(e.event, MessageSent)]) == 1


async def test_reject_policy_refuses_a_message_while_a_run_is_active(
    private_store: EventStore,
) -> None:
    store = private_store
    session = await session_with(store, "rejecting", "reject")
    async with workers(store, SLOW_ECHO, auto_reply=True):
        await handle(store, SESSION, session, ReceiveMessage("m1", "ada", "one two three four"))
        await wait_for(store, session, 1, RunAssigned)
        with pytest.raises(SessionBusy, match="still active"):
            await handle(store, SESSION, session, ReceiveMessage("m2", "ada", "hurry"))
        await wait_for(store, session, 1, RunReleased)
        await handle(store, SESSION, session, ReceiveMessage("m3", "ada", "now"))
        replies = await wait_for(store, session, 2, MessageSent)
    assert [r.event.text for r in replies] == ["echo: one two three four", "echo: now"]


class Counting:
    """Records how many runs of each workspace execute at the same time."""

    name = "counting"

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        ws = request.workspace
        self.now[ws] = self.now.get(ws, 0) + 1
        self.peak[ws] = max(self.peak.get(ws, 0), self.now[ws])
        try:
            await asyncio.sleep(0.2)
        finally:
            self.now[ws] -= 1
        return "counted"


async def test_per_workspace_cap_on_concurrent_runs(private_store: EventStore) -> None:
    store = private_store
    counting = Counting()
    stop = asyncio.Event()
    agents = {"count": AgentConfig(executor="echo")}
    pool = [
        RunWorker(
            store,
            store._nc,
            agents,
            name=f"w{n}",
            executors={"count": counting},
            concurrency=4,
            run_limit=2,
            run_limits={"unlimited": 0},
            lease=5,
        )
        for n in range(3)
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    capped = [AggregateRef("capped", "run", f"c{n}") for n in range(10)]
    free = [AggregateRef("unlimited", "run", f"u{n}") for n in range(6)]
    try:
        for ref in [*capped, *free]:
            await queue(store, ref, agent="count", executor="echo")
        for ref in [*capped, *free]:
            assert await until(store, ref, ["succeeded"], timeout=30) == "succeeded"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert counting.peak["capped"] == 2
    assert counting.peak["unlimited"] > 2
    assert await RunSlots(store._nc).holders("capped") == []
