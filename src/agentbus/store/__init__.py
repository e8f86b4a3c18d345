"""The event store on JetStream, stream definitions, and the NATS connection."""

from agentbus.store.eventstore import (
    ANY,
    NO_EVENTS,
    AggregateHistory,
    AppendResult,
    EventStore,
    Expect,
    RawEvent,
    RecordedEvent,
)

__all__ = [
    "ANY",
    "NO_EVENTS",
    "AggregateHistory",
    "AppendResult",
    "EventStore",
    "Expect",
    "RawEvent",
    "RecordedEvent",
]
