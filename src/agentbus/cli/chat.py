"""`agentbus chat`: talk to an agent from the terminal, through the real pipeline.

It opens the session (with its agent) if needed, posts the message as an inbound chat message,
and shows the reply as it streams on the LIVE stream, then the stored outbound message. The run
id is known before posting (it derives from the message's event id), so no delta is missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.audit.redaction import Redactor
from agentbus.domain.handling import handle, load
from agentbus.domain.session import SESSION, OpenSession, ReceiveMessage
from agentbus.domain.workspace import WORKSPACE
from agentbus.errors import AgentbusError
from agentbus.events.envelope import EventContext, uuid7
from agentbus.events.run import RunCancelled, RunFailed, RunTimedOut
from agentbus.events.session import MAX_TEXT, MessageSent
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import EventStore, RawEvent
from agentbus.workers.autoreply import run_id_for


class ChatError(AgentbusError):
    """The reply did not come (no worker, no agent, the run failed, ...)."""


@dataclass(frozen=True, slots=True)
class Reply:
    run_id: str
    text: str
    position: int


async def say(
    nc: NATS,
    store: EventStore,
    session: AggregateRef,
    text: str,
    *,
    agent: str,
    author: str = "you",
    on_delta: Callable[[str], None] = lambda _: None,
    timeout: float = 60.0,
    redactor: Redactor | None = None,
) -> Reply:
    """Post `text` into `session` and wait for the agent's reply (streaming deltas). With a
    `redactor`, the text is masked first unless the workspace keeps inbound text as sent."""
    ws = session.workspace
    if redactor is not None:
        workspace, _ = await load(store, WORKSPACE, AggregateRef(ws, "workspace", ws))
        if workspace.redaction == "mask":
            text = redactor.redact(text, max_length=MAX_TEXT).text
    state, _ = await load(store, SESSION, session)
    if state.status == "new":
        await handle(store, SESSION, session, OpenSession("api", agent=agent))
    elif state.agent is None:
        raise ChatError(f"session {session.id} has no agent: nobody would answer")
    message_event = uuid7()
    run_id = run_id_for(message_event)
    done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    async def on_live(msg: Msg) -> None:
        body = orjson.loads(msg.data)
        if body.get("type") == "delta":
            on_delta(str(body.get("text", "")))

    async def on_session(msg: Msg) -> None:
        event = store.decode(RawEvent(0, msg.subject, msg.data, None, 0)).event
        if isinstance(event, MessageSent) and event.run_id == run_id and not done.done():
            done.set_result(Reply(run_id, event.text, 0))

    async def on_run(msg: Msg) -> None:
        event = store.decode(RawEvent(0, msg.subject, msg.data, None, 0)).event
        if isinstance(event, RunFailed | RunCancelled | RunTimedOut) and not done.done():
            detail = getattr(event, "message", None) or event.kind.name
            done.set_exception(ChatError(f"run {run_id} {event.kind.name}: {detail}"))

    subscriptions = [
        await nc.subscribe(f"live.{ws}.run.{run_id}.>", cb=on_live),
        await nc.subscribe(f"evt.{ws}.session.{session.id}.message_sent", cb=on_session),
        await nc.subscribe(f"evt.{ws}.run.{run_id}.>", cb=on_run),
    ]
    try:
        await nc.flush()
        await handle(
            store,
            SESSION,
            session,
            ReceiveMessage(uuid7(), author, text),
            context=EventContext(source="agentbus/chat", actor=author),
            event_ids=[message_event],
        )
        try:
            async with asyncio.timeout(timeout):
                return await done
        except TimeoutError:
            raise ChatError(
                f"no reply within {timeout:g}s: is a worker running (`agentbus up`) and is "
                f"agent {state.agent or agent!r} configured?"
            ) from None
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
