"""Events: the CloudEvents envelope, typed domain events, subjects and the type registry."""

from agentbus.events.envelope import CloudEvent, EventContext, uuid7
from agentbus.events.registry import DomainEvent, EventKind, EventRegistry, Upcaster
from agentbus.events.subjects import AggregateRef

__all__ = [
    "AggregateRef",
    "CloudEvent",
    "DomainEvent",
    "EventContext",
    "EventKind",
    "EventRegistry",
    "Upcaster",
    "uuid7",
]
