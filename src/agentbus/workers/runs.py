"""The run worker: competing consumers of the run queue.

For each work item (a `run.queued` event) a worker

1. loads the run; ended runs are acked, runs whose retry is not due are naked until then;
2. claims it by appending `started` with an expectation (`StartRun`): only one worker wins; on
   a run that is still `running` this is a takeover (the previous worker's lease ran out);
3. executes it, renewing the lease (`in_progress`) while the executor streams to LIVE, watching
   for a cancel (a core NATS subscription on the run's `cancelled` subject: honoured at once)
   and for the deadline;
4. records the outcome (`succeeded`, `failed`, `retry_scheduled`, `timed_out`) and acks, or naks
   with the backoff delay for a retry.

A worker that stops gracefully naks what it holds, so another worker takes over immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from agentbus.domain.budget import BudgetExceeded, Budgets, Hold
from agentbus.domain.decider import DomainError
from agentbus.domain.handling import Loaded, StateCache
from agentbus.domain.run import RUN, Fail, RunCommand, RunState, StartRun, Succeed, TimeOut
from agentbus.errors import AgentbusError, StoreUnavailable
from agentbus.events.budget import ReleaseReason
from agentbus.events.envelope import EventContext
from agentbus.events.run import RunRetryScheduled, RunStarted
from agentbus.events.session import MessageReceived, MessageSent
from agentbus.events.subjects import AggregateRef
from agentbus.executors.catalog import make_executor
from agentbus.executors.executor import ChatTurn, Executor, ExecutorError, RunRequest
from agentbus.settings import AgentConfig
from agentbus.store.eventstore import EVENTS_STREAM, EventStore
from agentbus.workers.approvals import ApprovalGate
from agentbus.workers.capacity import CapacityFull, RunSlots
from agentbus.workers.live import LiveOutput
from agentbus.workers.queue import RUN_QUEUE, ensure_consumer, run_queue_config

log = structlog.get_logger("agentbus.worker")

HISTORY_TURNS = 20


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RunWorker:
    """Runs queued runs, `concurrency` at a time, until stopped."""

    def __init__(
        self,
        store: EventStore,
        nc: NATS,
        agents: Mapping[str, AgentConfig],
        *,
        name: str | None = None,
        concurrency: int = 16,
        lease: float = 30.0,
        retry_backoff: timedelta = timedelta(seconds=1),
        executors: Mapping[str, Executor] | None = None,
        run_limit: int = 0,
        run_limits: Mapping[str, int] | None = None,
    ) -> None:
        """`executors` overrides the executor of some agents (by agent name); the others are
        built from their configuration. `run_limit` caps concurrent runs per workspace (0: no
        cap), `run_limits` per workspace."""
        self.name = name or worker_name()
        self._store = store
        self._nc = nc
        self._agents = dict(agents)
        self._executors: dict[str, Executor] = dict(executors or {})
        self._concurrency = concurrency
        self._lease = lease
        self._retry_backoff = retry_backoff
        self._run_limit = run_limit
        self._run_limits = dict(run_limits or {})
        self._slots = RunSlots(nc)
        self._budgets = Budgets(
            store,
            StateCache(),
            context=EventContext(source="agentbus/worker", actor=f"worker:{self.name}"),
        )
        self._log = log.bind(worker=self.name)

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_consumer(self._nc, run_queue_config(self._lease))
        js = self._nc.jetstream()
        queue = await js.pull_subscribe_bind(durable=RUN_QUEUE, stream=EVENTS_STREAM)
        active: set[asyncio.Task[None]] = set()
        self._log.info("worker ready", concurrency=self._concurrency)
        try:
            while not stop.is_set():
                free = self._concurrency - len(active)
                if free <= 0:
                    await asyncio.wait(active, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    messages = await queue.fetch(free, timeout=0.5)
                except (NatsTimeout, TimeoutError):
                    continue
                except Exception as exc:  # NATS reconnecting: back off, keep the loop alive
                    self._log.warning("fetch failed", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                for message in messages:
                    task = asyncio.create_task(self._process(message))
                    active.add(task)
                    task.add_done_callback(active.discard)
        finally:
            for task in active:
                task.cancel()
            await asyncio.gather(*active, return_exceptions=True)
            with contextlib.suppress(Exception):
                await queue.unsubscribe()

    # ------------------------------------------------------------------ one work item

    async def _process(self, message: Msg) -> None:
        ref = AggregateRef.from_subject(message.subject)
        cancelled = asyncio.Event()

        async def on_cancel(_: Msg) -> None:
            cancelled.set()

        # Subscribed before claiming, so a cancel appended meanwhile is not missed.
        watch = await self._nc.subscribe(
            f"evt.{ref.workspace}.run.{ref.id}.cancelled", cb=on_cancel
        )
        try:
            await self._claim_and_run(message, ref, cancelled)
        except asyncio.CancelledError:
            # Stopping: hand the item back now, so another worker takes the run over.
            with contextlib.suppress(Exception):
                await message.nak()
            raise
        except StoreUnavailable as exc:
            self._log.warning("store unavailable; will retry", run=ref.id, error=str(exc))
            with contextlib.suppress(Exception):
                await message.nak(delay=1.0)
        except Exception:
            self._log.exception("run processing failed", run=ref.id)
            with contextlib.suppress(Exception):
                await message.nak(delay=1.0)
        finally:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _claim_and_run(
        self, message: Msg, ref: AggregateRef, cancelled: asyncio.Event
    ) -> None:
        run = await Loaded.load(self._store, RUN, ref)
        state = run.state
        limit = self._run_limits.get(ref.workspace, self._run_limit)
        if state.finished or state.status == "new":
            if state.finished:  # it may have ended while its worker was dead: free its tokens
                await self._budgets.release_run(ref, state.agent, "run_ended")
            await self._release(ref, limit)
            await message.ack()
            return
        now = datetime.now(UTC)
        if state.status == "retry_scheduled" and state.retry_at and state.retry_at > now:
            await message.nak(delay=(state.retry_at - now).total_seconds())
            return
        if limit:
            try:
                await self._slots.acquire(ref.workspace, ref.id, limit)
            except CapacityFull:
                await message.nak(delay=1.0)  # the workspace is at its cap: wait for a slot
                return
        context = EventContext(source="agentbus/worker", actor=f"worker:{self.name}")
        try:
            claimed = await run.handle(StartRun(self.name, now), context=context)
        except DomainError:
            if run.state.finished:
                await self._budgets.release_run(ref, state.agent, "run_ended")
            await self._release(ref, limit)
            await message.ack()  # ended meanwhile (cancelled, ...)
            return
        started = [e for e in claimed.events if isinstance(e, RunStarted)]
        if not started:  # the claim ended it: timed out before starting, or out of attempts
            await self._budgets.release_run(ref, state.agent, "run_ended")
            await self._release(ref, limit)
            await message.ack()
            return
        attempt = started[0].attempt
        self._log.info("run started", run=ref.id, attempt=attempt)
        retry_at = await self._execute(message, run, attempt, cancelled, context)
        await self._release(ref, limit)
        if retry_at is None:
            await message.ack()
        else:
            delay = max(0.0, (retry_at - datetime.now(UTC)).total_seconds())
            await message.nak(delay=delay)

    async def _release(self, ref: AggregateRef, limit: int) -> None:
        if limit:
            await self._slots.release(ref.workspace, ref.id)

    async def _execute(
        self,
        message: Msg,
        run: Loaded[RunCommand, RunState],
        attempt: int,
        cancelled: asyncio.Event,
        context: EventContext,
    ) -> datetime | None:
        """Run the executor; record the outcome. Returns when a retry is due, if one is."""
        ref, state = run.ref, run.state
        config = self._agents.get(state.agent)
        now = datetime.now(UTC)
        if config is None:
            return await self._finish(
                run,
                Fail(
                    attempt, "executor", f"unknown agent {state.agent!r}", retryable=False, now=now
                ),
                context,
            )
        executor = self._executor(state.agent, config)
        request = RunRequest(
            workspace=ref.workspace,
            run_id=ref.id,
            attempt=attempt,
            agent=state.agent,
            input=state.input,
            session_id=state.session_id,
            history=await self._history(ref.workspace, state.session_id, state.input),
            options=config.options,
            max_tokens=config.max_tokens,
        )
        deadline = now + timedelta(seconds=config.timeout)
        if state.deadline_at is not None:
            deadline = min(deadline, state.deadline_at)
        try:  # one model call per attempt: hold its maximum tokens first
            hold = await self._budgets.reserve(ref, state.agent, attempt, config.max_tokens, now)
        except BudgetExceeded as exc:
            self._log.info("budget exhausted", run=ref.id, reason=str(exc))
            refusal = Fail(attempt, "budget_exhausted", str(exc)[:4000], retryable=False, now=now)
            return await self._finish(run, refusal, context)
        except DomainError as exc:  # a later attempt of the run holds tokens: taken over
            self._log.info("attempt superseded", run=ref.id, reason=str(exc))
            return None
        gate = ApprovalGate(
            self._store,
            self._nc,
            run,
            attempt,
            timeout=config.approval_timeout,
            deadline=deadline,
            context=context,
        )
        output = LiveOutput(self._nc, run, attempt, approvals=gate)
        running = asyncio.create_task(executor.execute(request, output))
        stop_watch = asyncio.create_task(cancelled.wait())
        lease = asyncio.create_task(self._renew(message))
        try:
            remaining = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
            await asyncio.wait(
                {running, stop_watch}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lease.cancel()
            stop_watch.cancel()
            if not running.done():
                running.cancel()
            with contextlib.suppress(BaseException):
                await running
            await output.close()
        # The budget is settled before the outcome is recorded: a worker dying in between
        # leaves a settled budget, and the takeover's new reservation is its own.
        if cancelled.is_set() and not (running.done() and not running.cancelled()):
            await self._spend(hold, output, "cancelled")
            self._log.info("run cancelled", run=ref.id, attempt=attempt)
            return None
        if running.cancelled():
            await self._spend(hold, output, "timed_out")
            return await self._finish(run, TimeOut(datetime.now(UTC)), context)
        error = running.exception()
        now = datetime.now(UTC)
        if error is None:
            await self._spend(hold, output, None)
            return await self._finish(run, Succeed(attempt, running.result()), context)
        if isinstance(error, ExecutorError):
            fail = Fail(
                attempt,
                error.error_class,
                str(error)[:4000],
                retryable=error.retryable,
                now=now,
                backoff=self._retry_backoff,
            )
        else:
            self._log.error("executor crashed", run=ref.id, error=repr(error))
            fail = Fail(
                attempt,
                "executor",
                f"{type(error).__name__}: {error}"[:4000],
                retryable=False,
                now=now,
            )
        retry = fail.retryable and attempt < state.max_attempts
        await self._spend(hold, output, "retry" if retry else "failed")
        return await self._finish(run, fail, context)

    async def _spend(self, hold: Hold, output: LiveOutput, reason: ReleaseReason | None) -> None:
        """Charge the attempt's reported usage to its budgets (the rest of the reservation goes
        back), or give the reservation back whole when the attempt failed without usage.
        `reason` None: the attempt succeeded (charged even when it reported no usage)."""
        if not hold.budgets:
            return
        if reason is None or output.tokens:
            await self._budgets.settle(hold, output.tokens)
        else:
            await self._budgets.release(hold, reason)

    async def _finish(
        self,
        run: Loaded[RunCommand, RunState],
        command: Succeed | Fail | TimeOut,
        context: EventContext,
    ) -> datetime | None:
        ref = run.ref
        try:
            outcome = await run.handle(command, context=context)
        except DomainError as exc:
            # Cancelled or taken over meanwhile: the other outcome stands.
            self._log.info("outcome not recorded", run=ref.id, reason=str(exc))
            return None
        for event in outcome.events:
            if isinstance(event, RunRetryScheduled):
                return event.at
        self._log.info("run ended", run=ref.id, status=outcome.state.status)
        return None

    async def _renew(self, message: Msg) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await message.in_progress()
            except Exception as exc:
                self._log.warning("lease renewal failed", error=str(exc))

    def _executor(self, agent: str, config: AgentConfig) -> Executor:
        if agent not in self._executors:
            self._executors[agent] = make_executor(config)
        return self._executors[agent]

    async def _history(
        self, workspace: str, session_id: str | None, current: str
    ) -> tuple[ChatTurn, ...]:
        """The session's earlier messages (most recent `HISTORY_TURNS`), oldest first."""
        if session_id is None:
            return ()
        try:
            events = (await self._store.load(AggregateRef(workspace, "session", session_id))).events
        except AgentbusError:
            return ()
        turns = [
            ChatTurn("user" if isinstance(e.event, MessageReceived) else "assistant", e.event.text)
            for e in events
            if isinstance(e.event, MessageReceived | MessageSent)
        ]
        if turns and turns[-1] == ChatTurn("user", current):
            turns.pop()  # the message this run answers is the input, not history
        return tuple(turns[-HISTORY_TURNS:])
