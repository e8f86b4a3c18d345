"""Wiring a decider to the event store: load, decide, append with the expectation, and on a
concurrency conflict reload and decide again (a bounded number of times).

`Loaded` keeps an aggregate in hand between commands (a worker running a run): it decides on the
state it already has and appends with its known position, so a sequence of commands costs one
load, not one per command; it reloads only when the aggregate moved underneath it.
"""

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


class Loaded(Generic[C, S]):
    """An aggregate held by one process: its state and last position as of the last command."""

    def __init__(
        self,
        store: EventStore,
        decider: Decider[C, S],
        ref: AggregateRef,
        state: S,
        position: int,
    ) -> None:
        if ref.kind != decider.kind:
            raise ValueError(f"{decider.kind} decider cannot handle a {ref.kind}")
        self.store = store
        self.decider = decider
        self.ref = ref
        self.state = state
        self.position = position

    @classmethod
    async def load(
        cls, store: EventStore, decider: Decider[C, S], ref: AggregateRef
    ) -> Loaded[C, S]:
        state, position = await load(store, decider, ref)
        return cls(store, decider, ref, state, position)

    async def handle(
        self,
        command: C,
        *,
        context: EventContext = EventContext.DEFAULT,
        event_ids: Sequence[str] | None = None,
        attempts: int = 5,
    ) -> Handled[S]:
        """Decide `command` on the state in hand; on a conflict reload and decide again.

        Raises the decider's `DomainError` to refuse, or `ConcurrencyConflict` if the aggregate
        kept moving for `attempts` tries."""
        for attempt in range(attempts):
            if attempt:
                self.state, self.position = await load(self.store, self.decider, self.ref)
            events = list(self.decider.decide(command, self.state))
            if not events:
                return Handled((), (), self.state, self.position)
            try:
                result = await self.store.append(
                    self.ref,
                    events,
                    expect=Expect.at(self.position),
                    context=context,
                    event_ids=event_ids,
                )
            except ConcurrencyConflict:
                if attempt == attempts - 1:
                    raise
                continue
            for event in events:
                self.state = self.decider.evolve(self.state, event)
            self.position = result.last_position
            return Handled(tuple(events), result.positions, self.state, self.position)
        raise AssertionError("unreachable")


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
    """Load aggregate `ref` and run `command` against it (see `Loaded.handle`)."""
    loaded = await Loaded.load(store, decider, ref)
    return await loaded.handle(command, context=context, event_ids=event_ids, attempts=attempts)
