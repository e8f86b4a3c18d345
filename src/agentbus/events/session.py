"""Events of the session aggregate: a conversation and its messages."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from agentbus.events.registry import DomainEvent, EventKind

Channel = Literal["web", "api", "telegram", "feishu", "wecom"]
MAX_TEXT = 32_000


class SessionOpened(DomainEvent):
    """A conversation began on a channel."""

    kind: ClassVar[EventKind] = EventKind("session", "opened", 1)

    channel: Channel
    title: str | None = Field(default=None, max_length=200)
    agent: str | None = Field(default=None, max_length=64, description="agent that answers")


class SessionClosed(DomainEvent):
    """The conversation ended."""

    kind: ClassVar[EventKind] = EventKind("session", "closed", 1)

    reason: str | None = Field(default=None, max_length=500)


class MessageReceived(DomainEvent):
    """A person (or a channel) wrote into the session."""

    kind: ClassVar[EventKind] = EventKind("session", "message_received", 1)

    message_id: str = Field(min_length=1, max_length=64)
    author: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    external_id: str | None = Field(
        default=None, max_length=200, description="the channel's own id of the message"
    )


class MessageSent(DomainEvent):
    """An agent (or an operator) wrote into the session."""

    kind: ClassVar[EventKind] = EventKind("session", "message_sent", 1)

    message_id: str = Field(min_length=1, max_length=64)
    author: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    run_id: str | None = Field(default=None, max_length=64)
