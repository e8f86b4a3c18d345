"""Events of the run aggregate: one turn of an agent, from queued to its end."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from agentbus.events.privacy import Personal
from agentbus.events.registry import DomainEvent, EventKind

ErrorClass = Literal[
    "timeout", "network", "http_status", "executor", "protocol", "budget_exhausted", "lease_lost"
]
_ID = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
_AUTHOR = Field(
    default=None,
    max_length=200,
    description="whose input the run works on (the data subject of the sealed fields)",
)


class RunQueued(DomainEvent):
    """A run was requested: by an inbound chat message (auto-reply) or through the API."""

    kind: ClassVar[EventKind] = EventKind("run", "queued", 1)
    # `input` copies the triggering message's text: sealed with its author's key.
    personal: ClassVar[Personal] = Personal(fields=("input",), subject="author")

    agent: str = Field(min_length=1, max_length=64)
    executor: str = Field(min_length=1, max_length=64)
    input: str = Field(max_length=32_000)
    session_id: str | None = Field(default=None, max_length=64)
    trigger_message_id: str | None = Field(default=None, max_length=64)
    max_attempts: int = Field(default=3, ge=1, le=100)
    deadline_at: datetime | None = None
    author: str | None = Field(
        default=None, max_length=200, description="whose words `input` is (its data subject)"
    )


class RunStarted(DomainEvent):
    """A worker claimed the run (attempt n). Claiming *is* appending this with an expectation."""

    kind: ClassVar[EventKind] = EventKind("run", "started", 1)

    attempt: int = Field(ge=1)
    worker: str = Field(min_length=1, max_length=200)


class RunWaitingApproval(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "waiting_approval", 1)
    # The agent's reason may quote the input: sealed with the input's author's key.
    personal: ClassVar[Personal] = Personal(fields=("reason",), subject="author")

    approval_id: str = _ID
    tool: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=2000)
    author: str | None = _AUTHOR


class RunResumed(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "resumed", 1)

    approval_id: str = _ID
    decision: Literal["granted", "denied", "expired"]


class RunSucceeded(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "succeeded", 1)
    # The agent's answer to `author`'s input, which it may repeat: sealed with their key.
    personal: ClassVar[Personal] = Personal(fields=("output",), subject="author")

    attempt: int = Field(ge=1)
    output: str = Field(max_length=200_000)
    author: str | None = Field(
        default=None,
        max_length=200,
        description="whose input the run answered (the data subject of `output`)",
    )


class RunFailed(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "failed", 1)
    # An executor's error can quote what it was sent: sealed with the input's author's key.
    personal: ClassVar[Personal] = Personal(fields=("message",), subject="author")

    attempt: int = Field(ge=1)
    error_class: ErrorClass
    message: str = Field(max_length=4000)
    retryable: bool
    author: str | None = _AUTHOR


class RunRetryScheduled(DomainEvent):
    """A retryable failure with attempts left: attempt `attempt` may start at `at`."""

    kind: ClassVar[EventKind] = EventKind("run", "retry_scheduled", 1)
    personal: ClassVar[Personal] = Personal(fields=("message",), subject="author")

    attempt: int = Field(ge=2)
    at: datetime
    error_class: ErrorClass
    message: str = Field(max_length=4000)
    author: str | None = _AUTHOR


class RunCancelled(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "cancelled", 1)

    by: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=2000)


class RunTimedOut(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "timed_out", 1)

    attempt: int = Field(ge=0)


class RunUsageRecorded(DomainEvent):
    kind: ClassVar[EventKind] = EventKind("run", "usage_recorded", 1)

    model: str = Field(min_length=1, max_length=200)
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)
