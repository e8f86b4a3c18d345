"""The auto-reply pipeline: an inbound message in a session that has an agent gets a run; the
run's final output becomes the session's outbound message.

The session decides (its concurrency policy: enqueue, interrupt, reject) and this reactor acts
on each decision *as an event*, so a crash between two steps loses nothing on redelivery:

- `message_received`      -> `AssignRun` on the session (run id derived from the message),
  unless it is a chat command (`/approve <id>`, `/deny <id> <reason>`: see `chat_commands`);
- `session.run_assigned`  -> `QueueRun` (the run starts now);
- `session.run_interrupted` -> `Cancel` the interrupted run;
- run `succeeded`         -> `SendMessage` (the reply), then `ReleaseRun`;
- run `failed` / `cancelled` / `timed_out` -> `ReleaseRun` (the next waiting run is assigned).

A run is not queued when the workspace's (or the agent's) token budget cannot pay for one more
call this period: the session gets a `message_sent` from `agentbus` saying so, and is released.

Every step is idempotent: run ids derive from message event ids, reply event ids from run ids.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.domain.budget import BudgetExceeded, Budgets
from agentbus.domain.decider import DomainError
from agentbus.domain.handling import StateCache, handle, load
from agentbus.domain.run import RUN, Cancel, QueueRun
from agentbus.domain.session import SESSION, AssignRun, ReleaseRun, SendMessage
from agentbus.events.envelope import EventContext
from agentbus.events.run import RunCancelled, RunFailed, RunSucceeded, RunTimedOut
from agentbus.events.session import MessageReceived, RunAssigned, RunInterrupted
from agentbus.events.subjects import AggregateRef
from agentbus.settings import AgentConfig
from agentbus.store.eventstore import EventStore, RawEvent, RecordedEvent
from agentbus.workers.chat_commands import answer_chat_command
from agentbus.workers.queue import auto_reply_config, consume

log = structlog.get_logger("agentbus.autoreply")


def run_id_for(message_event_id: str) -> str:
    """The run answering an inbound message: one per message, whoever queues it."""
    return "r" + message_event_id.replace("-", "")[:60]


class AutoReply:
    def __init__(self, store: EventStore, nc: NATS, agents: Mapping[str, AgentConfig]) -> None:
        self._store = store
        self._nc = nc
        self._agents = dict(agents)
        self._budgets = Budgets(store, StateCache())

    async def run(self, stop: asyncio.Event) -> None:
        await consume(self._nc, auto_reply_config(), self._process, stop)

    async def _process(self, message: Msg) -> None:
        meta = message.metadata
        raw = RawEvent(meta.sequence.stream, message.subject, message.data, meta.timestamp, 0)
        try:
            await self._store.prepare(raw)  # the keys of sealed fields (docs/erasure.md)
            recorded = self._store.decode(raw)
            await self._react(recorded)
            await message.ack()
        except DomainError as exc:
            log.info("nothing to do", position=raw.position, reason=str(exc))
            await message.ack()
        except Exception as exc:
            log.warning("auto-reply failed; retrying", position=raw.position, error=str(exc))
            await message.nak(delay=1.0)

    async def _react(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        context = EventContext(
            source="agentbus/auto-reply",
            causationid=recorded.id,
            correlationid=recorded.envelope.correlationid or recorded.id,
        )
        match event:
            case MessageReceived():
                if await answer_chat_command(self._store, recorded, context):
                    return  # `/approve`, `/deny`: a decision, not a question for the agent
                state, _ = await load(self._store, SESSION, recorded.ref)
                if state.agent is None:
                    return
                assign = AssignRun(
                    run_id_for(recorded.id), event.text, event.message_id, author=event.author
                )
                await handle(self._store, SESSION, recorded.ref, assign, context=context)
            case RunAssigned():
                await self._queue(recorded.ref, event, context)
            case RunInterrupted():
                run = AggregateRef(recorded.ref.workspace, "run", event.run_id)
                reason = "interrupted by a newer message in the session"
                cancel = Cancel(f"session:{recorded.ref.id}", reason)
                with contextlib.suppress(DomainError):  # it may have ended on its own
                    await handle(self._store, RUN, run, cancel, context=context)
            case RunSucceeded() | RunFailed() | RunCancelled() | RunTimedOut():
                await self._ended(recorded, context)

    async def _queue(
        self, session: AggregateRef, event: RunAssigned, context: EventContext
    ) -> None:
        state, _ = await load(self._store, SESSION, session)
        config = self._agents.get(state.agent or "")
        if state.agent is None or config is None:
            log.warning("session agent is not configured", session=session.id, agent=state.agent)
            await handle(self._store, SESSION, session, ReleaseRun(event.run_id), context=context)
            return
        queue = QueueRun(
            agent=state.agent,
            executor=config.executor,
            input=event.input,
            session_id=session.id,
            trigger_message_id=event.trigger_message_id,
            max_attempts=config.max_attempts,
            deadline_at=datetime.now(UTC) + timedelta(seconds=config.timeout),
            author=event.author,
        )
        run = AggregateRef(session.workspace, "run", event.run_id)
        queued, _ = await load(self._store, RUN, run)
        if queued.status == "new":  # (a redelivery of a run queued before is not re-checked)
            try:
                await self._budgets.ensure_can_start(
                    session.workspace, state.agent, config.max_tokens
                )
            except BudgetExceeded as exc:
                await self._refuse(session, event.run_id, exc, context)
                return
        await handle(self._store, RUN, run, queue, context=context)

    async def _refuse(
        self, session: AggregateRef, run_id: str, why: BudgetExceeded, context: EventContext
    ) -> None:
        """Tell the session why its message gets no answer, and hand the session on."""
        log.info("run refused: budget exhausted", session=session.id, run=run_id, why=str(why))
        notice_id = f"budget-{run_id}"[:64]
        notice = SendMessage(notice_id, "agentbus", f"Not answered: {why}")
        with contextlib.suppress(DomainError):  # e.g. the session was closed meanwhile
            await handle(
                self._store, SESSION, session, notice, context=context, event_ids=[notice_id]
            )
        await handle(self._store, SESSION, session, ReleaseRun(run_id), context=context)

    async def _ended(self, recorded: RecordedEvent, context: EventContext) -> None:
        run = recorded.ref
        state, _ = await load(self._store, RUN, run)
        if state.session_id is None:
            return
        session = AggregateRef(run.workspace, "session", state.session_id)
        if isinstance(recorded.event, RunSucceeded):
            reply_id = f"reply-{run.id}"[:64]
            reply = SendMessage(
                reply_id,
                state.agent,
                recorded.event.output,
                run_id=run.id,
                recipient=state.author,
            )
            with contextlib.suppress(DomainError):  # e.g. the session was closed meanwhile
                await handle(
                    self._store, SESSION, session, reply, context=context, event_ids=[reply_id]
                )
        await handle(self._store, SESSION, session, ReleaseRun(run.id), context=context)
