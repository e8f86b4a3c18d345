"""The CloudEvents 1.0 envelope every durable event travels in (structured JSON mode)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

# Extension attribute values are bounded so a header or an id cannot carry a payload.
_SHORT = 256


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event, with agentbus's extension attributes.

    `data` holds the typed domain event (see `DomainEvent`) as JSON.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = Field(default="1.0", description="CloudEvents version.")
    id: str = Field(
        min_length=1,
        max_length=_SHORT,
        description="Event id, unique per source: a UUIDv7 unless given by the caller. "
        "Also the JetStream idempotency key (Nats-Msg-Id).",
    )
    source: str = Field(
        min_length=1, max_length=_SHORT, description="What produced the event (URI-reference)."
    )
    type: str = Field(
        min_length=1,
        max_length=_SHORT,
        examples=["agentbus.run.started.v1"],
        description="Versioned event type: agentbus.<aggregate>.<event>.v<n>.",
    )
    subject: str = Field(
        min_length=1,
        max_length=_SHORT,
        examples=["run/01J9Z..."],
        description="The aggregate the event belongs to: <aggregate>/<id>.",
    )
    time: datetime = Field(description="When the occurrence happened (RFC 3339).")
    datacontenttype: Literal["application/json"] = Field(
        default="application/json", description="Media type of data."
    )
    data: dict[str, Any] = Field(description="The event's payload, as its type's model defines.")
    workspace: str = Field(
        min_length=1, max_length=64, description="Extension: the workspace (tenant) of the event."
    )
    traceparent: str | None = Field(
        default=None, max_length=_SHORT, description="Extension: W3C Trace Context traceparent."
    )
    causationid: str | None = Field(
        default=None, max_length=_SHORT, description="Extension: id of what caused this event."
    )
    correlationid: str | None = Field(
        default=None,
        max_length=_SHORT,
        description="Extension: id shared by every event of one conversation or request.",
    )
    actor: str | None = Field(
        default=None, max_length=_SHORT, description="Extension: who acted (user, agent, service)."
    )


class EventContext(BaseModel):
    """Who and what caused the events being appended: copied onto each envelope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(default="agentbus", min_length=1, max_length=_SHORT)
    actor: str | None = Field(default=None, max_length=_SHORT)
    traceparent: str | None = Field(default=None, max_length=_SHORT)
    causationid: str | None = Field(default=None, max_length=_SHORT)
    correlationid: str | None = Field(default=None, max_length=_SHORT)

    DEFAULT: ClassVar[EventContext]


EventContext.DEFAULT = EventContext()


def uuid7(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits. Sorts by time.

    Formatted directly from hex (no `uuid.UUID` object): this is on every append's path."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = os.urandom(10).hex()
    stamp = f"{ms & 0xFFFFFFFFFFFF:012x}"
    variant = "89ab"[int(rand[3], 16) & 3]  # the two variant bits are 10
    return f"{stamp[:8]}-{stamp[8:]}-7{rand[:3]}-{variant}{rand[4:7]}-{rand[7:19]}"


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))` (RFC 9562: SHA-1 of the namespace and the name),
    formatted directly from hex: 1.3 µs instead of 4.3 (every post with an Idempotency-Key)."""
    digest = hashlib.sha1(namespace.bytes + name.encode(), usedforsecurity=False).hexdigest()
    variant = "89ab"[int(digest[16], 16) & 3]
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-{variant}{digest[17:20]}-{digest[20:32]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
