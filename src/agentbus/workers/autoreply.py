"""The auto-reply pipeline: an inbound message in a session that has an agent queues a run;
the run's final output becomes the session's outbound message.

Both steps are idempotent, so redelivery is harmless: the run id is derived from the inbound
message's event id, and the reply's event id from the run id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from agentbus.domain.decider import DomainError
from agentbus.domain.handling import handle, load
from agentbus.domain.run import RUN, QueueRun
from agentbus.domain.session import SESSION, SendMessage
from agentbus.events.envelope import EventContext
from agentbus.events.run import RunSucceeded
from agentbus.events.session import MessageReceived
from agentbus.events.subjects import AggregateRef
from agentbus.settings import AgentConfig
from agentbus.store.eventstore import EVENTS_STREAM, EventStore, RawEvent, RecordedEvent
from agentbus.workers.queue import AUTO_REPLY, auto_reply_config, ensure_consumer

log = structlog.get_logger("agentbus.autoreply")


def run_id_for(message_event_id: str) -> str:
    """The run answering an inbound message: one per message, whoever queues it."""
    return "r" + message_event_id.replace("-", "")[:60]


class AutoReply:
    def __init__(self, store: EventStore, nc: NATS, agents: Mapping[str, AgentConfig]) -> None:
        self._store = store
        self._nc = nc
        self._agents = dict(agents)

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_consumer(self._nc, auto_reply_config())
        js = self._nc.jetstream()
        sub = await js.pull_subscribe_bind(durable=AUTO_REPLY, stream=EVENTS_STREAM)
        try:
            while not stop.is_set():
                try:
                    messages = await sub.fetch(64, timeout=0.5)
                except (NatsTimeout, TimeoutError):
                    continue
                except Exception as exc:
                    log.warning("fetch failed", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                for message in messages:
                    await self._process(message)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _process(self, message: Msg) -> None:
        meta = message.metadata
        raw = RawEvent(meta.sequence.stream, message.subject, message.data, meta.timestamp, 0)
        try:
            recorded = self._store.decode(raw)
            if isinstance(recorded.event, MessageReceived):
                await self._queue_run(recorded)
            elif isinstance(recorded.event, RunSucceeded):
                await self._reply(recorded)
            await message.ack()
        except DomainError as exc:
            log.info("nothing to do", position=raw.position, reason=str(exc))
            await message.ack()
        except Exception as exc:
            log.warning("auto-reply failed; retrying", position=raw.position, error=str(exc))
            await message.nak(delay=1.0)

    async def _queue_run(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        assert isinstance(event, MessageReceived)
        session = recorded.ref
        state, _ = await load(self._store, SESSION, session)
        if state.agent is None:
            return
        config = self._agents.get(state.agent)
        if config is None:
            log.warning("session agent is not configured", session=session.id, agent=state.agent)
            return
        run = AggregateRef(session.workspace, "run", run_id_for(recorded.id))
        await handle(
            self._store,
            RUN,
            run,
            QueueRun(
                agent=state.agent,
                executor=config.executor,
                input=event.text,
                session_id=session.id,
                trigger_message_id=event.message_id,
                max_attempts=config.max_attempts,
                deadline_at=datetime.now(UTC) + timedelta(seconds=config.timeout),
            ),
            context=EventContext(
                source="agentbus/auto-reply",
                causationid=recorded.id,
                correlationid=recorded.envelope.correlationid or recorded.id,
            ),
        )

    async def _reply(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        assert isinstance(event, RunSucceeded)
        run = recorded.ref
        state, _ = await load(self._store, RUN, run)
        if state.session_id is None:
            return
        reply_id = f"reply-{run.id}"
        await handle(
            self._store,
            SESSION,
            AggregateRef(run.workspace, "session", state.session_id),
            SendMessage(
                message_id=reply_id[:64], author=state.agent, text=event.output, run_id=run.id
            ),
            context=EventContext(
                source="agentbus/auto-reply",
                causationid=recorded.id,
                correlationid=recorded.envelope.correlationid,
            ),
            event_ids=[reply_id],
        )
