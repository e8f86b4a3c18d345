"""The session aggregate: a conversation in one channel, and its messages."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from agentbus.domain.decider import Decider, DomainError
from agentbus.events.registry import DomainEvent
from agentbus.events.session import (
    Channel,
    MessageReceived,
    MessageSent,
    SessionClosed,
    SessionOpened,
)

# ---------------------------------------------------------------------------- state

Status = Literal["new", "open", "closed"]


@dataclass(frozen=True, slots=True)
class SessionState:
    status: Status = "new"
    channel: Channel | None = None
    agent: str | None = None
    messages: int = 0


INITIAL = SessionState()


def evolve(state: SessionState, event: DomainEvent) -> SessionState:
    match event:
        case SessionOpened():
            return replace(state, status="open", channel=event.channel, agent=event.agent)
        case MessageReceived() | MessageSent():
            return replace(state, messages=state.messages + 1)
        case SessionClosed():
            return replace(state, status="closed")
    return state


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class OpenSession:
    channel: Channel
    title: str | None = None
    agent: str | None = None


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class CloseSession:
    reason: str | None = None


SessionCommand = OpenSession | ReceiveMessage | SendMessage | CloseSession


class SessionNotFound(DomainError):
    pass


class SessionClosedError(DomainError):
    pass


class SessionAlreadyExists(DomainError):
    pass


def decide(command: SessionCommand, state: SessionState) -> list[DomainEvent]:
    match command:
        case OpenSession():
            if state.status != "new":
                if (state.channel, state.agent) == (command.channel, command.agent):
                    return []  # opening the same session twice is one session
                raise SessionAlreadyExists("a different session with this id exists")
            return [
                SessionOpened(channel=command.channel, title=command.title, agent=command.agent)
            ]
        case ReceiveMessage() | SendMessage():
            if state.status == "new":
                raise SessionNotFound("cannot post to a session that does not exist")
            if state.status == "closed":
                raise SessionClosedError("cannot post to a closed session")
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
                )
            ]
        case CloseSession():
            if state.status == "new":
                raise SessionNotFound("cannot close a session that does not exist")
            if state.status == "closed":
                return []
            return [SessionClosed(reason=command.reason)]
    raise TypeError(f"not a session command: {command!r}")


SESSION: Decider[SessionCommand, SessionState] = Decider("session", INITIAL, evolve, decide)
