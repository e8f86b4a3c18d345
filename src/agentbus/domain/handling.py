"""Wiring a decider to the event store: load, decide, append with the expectation, and on a
concurrency conflict reload and decide again (a bounded number of times).

`Loaded` keeps an aggregate in hand between commands (a worker running a run): it decides on the
state it already has and appends with its known position, so a sequence of commands costs one
load, not one per command; it reloads only when the aggregate moved underneath it.

`StateCache` does the same across commands and aggregates of one process (the budget of a busy
workspace): a load on a cached aggregate reads only the events appended since.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

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


class StateCache:
    """The last known state and position of recently used aggregates, so that a load reads
    only the events appended since (one batched direct get) instead of the whole history.

    Bounded: beyond `size` aggregates the least recently used is forgotten. Safe when stale
    (another process appended meanwhile): the load reads what it missed, and an append
    decided on an old state fails its expectation and is decided again. States must be
    immutable; one cache serves any number of deciders (an aggregate's kind names its decider).
    """

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self._size = size
        self._entries: OrderedDict[AggregateRef, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ref: AggregateRef) -> tuple[object, int] | None:
        entry = self._entries.get(ref)
        if entry is not None:
            self._entries.move_to_end(ref)
        return entry

    def put(self, ref: AggregateRef, state: object, position: int) -> None:
        """Remember `state` as of `position`, unless a newer one is known already."""
        known = self._entries.get(ref)
        if known is not None and known[1] > position:
            return
        self._entries[ref] = (state, position)
        self._entries.move_to_end(ref)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


async def load(
    store: EventStore, decider: Decider[C, S], ref: AggregateRef, cache: StateCache | None = None
) -> tuple[S, int]:
    """The aggregate's state and last position. With a `cache`, only the events after the
    cached position are read; otherwise the history is read from the start, or from the last
    snapshot event when the decider names one (`Decider.snapshot`)."""
    cached = cache.get(ref) if cache is not None else None
    if cached is not None:
        state, position = await catch_up(store, decider, ref, cast(S, cached[0]), cached[1])
    else:
        after = 0
        if decider.snapshot is not None:
            snapshot = ref.subject(decider.snapshot)
            after = max(0, (await store.last_positions([snapshot])).get(snapshot, 0) - 1)
        state, position = await catch_up(store, decider, ref, decider.initial_state, after)
    if cache is not None:
        cache.put(ref, state, position)
    return state, position


async def catch_up(
    store: EventStore, decider: Decider[C, S], ref: AggregateRef, state: S, position: int
) -> tuple[S, int]:
    """`state` (as of `position`) moved on by the events appended after `position`."""
    history = await store.load(ref, after=position)
    for recorded in history.events:
        state = decider.evolve(state, recorded.event)
    return state, history.last_position


class Loaded(Generic[C, S]):
    """An aggregate held by one process: its state and last position as of the last command."""

    def __init__(
        self,
        store: EventStore,
        decider: Decider[C, S],
        ref: AggregateRef,
        state: S,
        position: int,
        cache: StateCache | None = None,
    ) -> None:
        if ref.kind != decider.kind:
            raise ValueError(f"{decider.kind} decider cannot handle a {ref.kind}")
        self.store = store
        self.decider = decider
        self.ref = ref
        self.state = state
        self.position = position
        self.cache = cache

    @classmethod
    async def load(
        cls,
        store: EventStore,
        decider: Decider[C, S],
        ref: AggregateRef,
        cache: StateCache | None = None,
    ) -> Loaded[C, S]:
        state, position = await load(store, decider, ref, cache)
        return cls(store, decider, ref, state, position, cache)

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
            if attempt:  # the aggregate moved: read only what was appended since
                self.state, self.position = await catch_up(
                    self.store, self.decider, self.ref, self.state, self.position
                )
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
            if self.cache is not None:
                self.cache.put(self.ref, self.state, self.position)
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
    cache: StateCache | None = None,
) -> Handled[S]:
    """Load aggregate `ref` and run `command` against it (see `Loaded.handle`). With a
    `cache`, loads are incremental (see `StateCache`)."""
    loaded = await Loaded.load(store, decider, ref, cache)
    return await loaded.handle(command, context=context, event_ids=event_ids, attempts=attempts)
