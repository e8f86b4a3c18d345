"""Wiring a decider to the event store: load, decide, append with the expectation, and on a
concurrency conflict reload and decide again (a bounded number of times)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agentbus.domain.decider import Decider
from agentbus.errors import ConcurrencyConflict
from agentbus.events.envelope import EventContext
from agentbus.events.registry import DomainEvent
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import EventStore, Expect

C = TypeVar("C")
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Handled(Generic[S]):
    """The outcome of a command: the events it appended (maybe none), their positions, and
    the aggregate's state and last position afterwards."""

    events: tuple[DomainEvent, ...]
    positions: tuple[int, ...]
    state: S
    position: int


async def load(store: EventStore, decider: Decider[C, S], ref: AggregateRef) -> tuple[S, int]:
    history = await store.load(ref)
    return decider.fold(e.event for e in history.events), history.last_position


async def handle(
    store: EventStore,
    decider: Decider[C, S],
    ref: AggregateRef,
    command: C,
    *,
    context: EventContext = EventContext.DEFAULT,
    event_ids: Sequence[str] | None = None,
    attempts: int = 5,
) -> Handled[S]:
    """Run `command` against aggregate `ref`. Raises the decider's `DomainError` to refuse, or
    `ConcurrencyConflict` if the aggregate kept moving for `attempts` tries."""
    if ref.kind != decider.kind:
        raise ValueError(f"{decider.kind} decider cannot handle a {ref.kind}")
    for attempt in range(attempts):
        state, position = await load(store, decider, ref)
        events = list(decider.decide(command, state))
        if not events:
            return Handled((), (), state, position)
        try:
            result = await store.append(
                ref, events, expect=Expect.at(position), context=context, event_ids=event_ids
            )
        except ConcurrencyConflict:
            if attempt == attempts - 1:
                raise
            continue
        for event in events:
            state = decider.evolve(state, event)
        return Handled(tuple(events), result.positions, state, result.last_position)
    raise AssertionError("unreachable")
