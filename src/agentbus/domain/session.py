"""The session aggregate: a conversation in one channel, and its messages."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from agentbus.domain.decider import Decider, DomainError
from agentbus.events.registry import DomainEvent
from agentbus.events.session import (
    Channel,
    ConcurrencyPolicy,
    MessageReceived,
    MessageSent,
    RunAssigned,
    RunEnqueued,
    RunInterrupted,
    RunReleased,
    SessionClosed,
    SessionOpened,
)
from agentbus.values import value

# ---------------------------------------------------------------------------- state

Status = Literal["new", "open", "closed"]


@dataclass(frozen=True, slots=True)
class PendingRun:
    run_id: str
    input: str
    trigger_message_id: str | None
    author: str | None = None


@value
class SessionState:
    status: Status = "new"
    channel: Channel | None = None
    agent: str | None = None
    concurrency: ConcurrencyPolicy = "enqueue"
    messages: int = 0
    active_run: str | None = None
    pending: tuple[PendingRun, ...] = ()


INITIAL = SessionState()


def evolve(state: SessionState, event: DomainEvent) -> SessionState:
    match event:
        case SessionOpened():
            return replace(
                state,
                status="open",
                channel=event.channel,
                agent=event.agent,
                concurrency=event.concurrency,
            )
        case MessageReceived() | MessageSent():
            # Every post evolves its session: built directly, not through `replace` (which
            # walks the fields each time).
            return SessionState(
                status=state.status,
                channel=state.channel,
                agent=state.agent,
                concurrency=state.concurrency,
                messages=state.messages + 1,
                active_run=state.active_run,
                pending=state.pending,
            )
        case SessionClosed():
            return replace(state, status="closed")
        case RunAssigned():
            pending = tuple(p for p in state.pending if p.run_id != event.run_id)
            return replace(state, active_run=event.run_id, pending=pending)
        case RunEnqueued():
            entry = PendingRun(event.run_id, event.input, event.trigger_message_id, event.author)
            return replace(state, pending=(*state.pending, entry))
        case RunReleased():
            pending = tuple(p for p in state.pending if p.run_id != event.run_id)
            active = None if state.active_run == event.run_id else state.active_run
            return replace(state, active_run=active, pending=pending)
    return state  # run_interrupted: the cancel follows on the run itself


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class OpenSession:
    channel: Channel
    title: str | None = None
    agent: str | None = None
    concurrency: ConcurrencyPolicy = "enqueue"


@value
class ReceiveMessage:
    message_id: str
    author: str
    text: str
    external_id: str | None = None


@dataclass(frozen=True, slots=True)
class SendMessage:
    message_id: str
    author: str
    text: str
    run_id: str | None = None
    recipient: str | None = None
    """Whose message this answers: `text` is sealed with their key (docs/erasure.md)."""


@dataclass(frozen=True, slots=True)
class CloseSession:
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AssignRun:
    """A run answers a message of this session: start it now, queue it, or interrupt."""

    run_id: str
    input: str
    trigger_message_id: str | None = None
    author: str | None = None
    """Whose message `input` is: its data subject (docs/erasure.md)."""


@dataclass(frozen=True, slots=True)
class ReleaseRun:
    """Run `run_id` ended: the next waiting run (if any) gets the session."""

    run_id: str


SessionCommand = OpenSession | ReceiveMessage | SendMessage | CloseSession | AssignRun | ReleaseRun


class SessionNotFound(DomainError):
    pass


class SessionClosedError(DomainError):
    pass


class SessionAlreadyExists(DomainError):
    pass


class SessionBusy(DomainError):
    """Policy `reject`: a message arrived while a run of the session is active."""


def decide(command: SessionCommand, state: SessionState) -> list[DomainEvent]:
    match command:
        case OpenSession():
            if state.status != "new":
                if (state.channel, state.agent) == (command.channel, command.agent):
                    return []  # opening the same session twice is one session
                raise SessionAlreadyExists("a different session with this id exists")
            return [
                SessionOpened(
                    channel=command.channel,
                    title=command.title,
                    agent=command.agent,
                    concurrency=command.concurrency,
                )
            ]
        case ReceiveMessage() | SendMessage():
            if state.status == "new":
                raise SessionNotFound("cannot post to a session that does not exist")
            if state.status == "closed":
                raise SessionClosedError("cannot post to a closed session")
            if (
                isinstance(command, ReceiveMessage)
                and state.concurrency == "reject"
                and state.active_run is not None
            ):
                raise SessionBusy(
                    f"run {state.active_run} of this session is still active "
                    "(the session's policy is reject): wait for it or cancel it"
                )
            if isinstance(command, ReceiveMessage):
                return [
                    MessageReceived(
                        message_id=command.message_id,
                        author=command.author,
                        text=command.text,
                        external_id=command.external_id,
                    )
                ]
            return [
                MessageSent(
                    message_id=command.message_id,
                    author=command.author,
                    text=command.text,
                    run_id=command.run_id,
                    recipient=command.recipient,
                )
            ]
        case CloseSession():
            if state.status == "new":
                raise SessionNotFound("cannot close a session that does not exist")
            if state.status == "closed":
                return []
            return [SessionClosed(reason=command.reason)]
        case AssignRun():
            if state.status == "new":
                raise SessionNotFound("cannot run an agent in a session that does not exist")
            known = {p.run_id for p in state.pending} | {state.active_run}
            if command.run_id in known:
                return []  # assigned before: redelivery
            assigned = RunAssigned(
                run_id=command.run_id,
                input=command.input,
                trigger_message_id=command.trigger_message_id,
                author=command.author,
            )
            if state.active_run is None:
                return [assigned]
            if state.concurrency == "interrupt":
                return [RunInterrupted(run_id=state.active_run), assigned]
            return [
                RunEnqueued(
                    run_id=command.run_id,
                    input=command.input,
                    trigger_message_id=command.trigger_message_id,
                    author=command.author,
                )
            ]
        case ReleaseRun():
            waiting = any(p.run_id == command.run_id for p in state.pending)
            if command.run_id != state.active_run and not waiting:
                return []  # not this session's business any more (released before)
            released: list[DomainEvent] = [RunReleased(run_id=command.run_id)]
            remaining = [p for p in state.pending if p.run_id != command.run_id]
            if command.run_id == state.active_run and remaining:
                following = remaining[0]
                released.append(
                    RunAssigned(
                        run_id=following.run_id,
                        input=following.input,
                        trigger_message_id=following.trigger_message_id,
                        author=following.author,
                    )
                )
            return released
    raise TypeError(f"not a session command: {command!r}")


SESSION: Decider[SessionCommand, SessionState] = Decider("session", INITIAL, evolve, decide)
