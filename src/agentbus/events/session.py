"""Events of the session aggregate: a conversation and its messages."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from agentbus.events.privacy import Personal
from agentbus.events.registry import DomainEvent, EventKind

Channel = Literal["web", "api", "telegram", "feishu", "wecom"]
ConcurrencyPolicy = Literal["enqueue", "interrupt", "reject"]
"""What a message does while a run of its session is active: wait its turn (`enqueue`), cancel
the active run (`interrupt`), or be refused (`reject`)."""
MAX_TEXT = 32_000


class SessionOpened(DomainEvent):
    """A conversation began on a channel."""

    kind: ClassVar[EventKind] = EventKind("session", "opened", 1)

    channel: Channel
    title: str | None = Field(default=None, max_length=200)
    agent: str | None = Field(default=None, max_length=64, description="agent that answers")
    concurrency: ConcurrencyPolicy = "enqueue"


class SessionClosed(DomainEvent):
    """The conversation ended."""

    kind: ClassVar[EventKind] = EventKind("session", "closed", 1)

    reason: str | None = Field(default=None, max_length=500)


class MessageReceived(DomainEvent):
    """A person (or a channel) wrote into the session."""

    kind: ClassVar[EventKind] = EventKind("session", "message_received", 1)
    # What the person wrote is theirs: sealed with the author's key (docs/erasure.md).
    personal: ClassVar[Personal] = Personal(fields=("text",), subject="author")

    message_id: str = Field(min_length=1, max_length=64)
    author: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    external_id: str | None = Field(
        default=None, max_length=200, description="the channel's own id of the message"
    )


class MessageSent(DomainEvent):
    """An agent (or an operator) wrote into the session."""

    kind: ClassVar[EventKind] = EventKind("session", "message_sent", 1)
    # An agent's reply answers someone's words and may repeat them: sealed with the key of
    # the person it answers (`recipient`), so forgetting them erases it too. Without one
    # (operator notices; events written before the field existed) it is not sealed.
    personal: ClassVar[Personal] = Personal(fields=("text",), subject="recipient")

    message_id: str = Field(min_length=1, max_length=64)
    author: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    run_id: str | None = Field(default=None, max_length=64)
    recipient: str | None = Field(
        default=None,
        max_length=200,
        description="whose message this answers (the data subject of `text`)",
    )


class RunAssigned(DomainEvent):
    """Run `run_id` now answers this session (the session's active run)."""

    kind: ClassVar[EventKind] = EventKind("session", "run_assigned", 1)
    # `input` copies a message's text: sealed with its author's key, as the message is.
    personal: ClassVar[Personal] = Personal(fields=("input",), subject="author")

    run_id: str = Field(min_length=1, max_length=64)
    input: str = Field(max_length=MAX_TEXT)
    trigger_message_id: str | None = Field(default=None, max_length=64)
    author: str | None = Field(
        default=None, max_length=200, description="whose words `input` is (its data subject)"
    )


class RunEnqueued(DomainEvent):
    """A run waits for the active run to end (policy `enqueue`)."""

    kind: ClassVar[EventKind] = EventKind("session", "run_enqueued", 1)
    personal: ClassVar[Personal] = Personal(fields=("input",), subject="author")

    run_id: str = Field(min_length=1, max_length=64)
    input: str = Field(max_length=MAX_TEXT)
    trigger_message_id: str | None = Field(default=None, max_length=64)
    author: str | None = Field(
        default=None, max_length=200, description="whose words `input` is (its data subject)"
    )


class RunInterrupted(DomainEvent):
    """The active run is to be cancelled for a newer message (policy `interrupt`)."""

    kind: ClassVar[EventKind] = EventKind("session", "run_interrupted", 1)

    run_id: str = Field(min_length=1, max_length=64)


class RunReleased(DomainEvent):
    """A run of this session ended (or was dropped while waiting)."""

    kind: ClassVar[EventKind] = EventKind("session", "run_released", 1)

    run_id: str = Field(min_length=1, max_length=64)
