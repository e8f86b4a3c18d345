"""The decider pattern: an aggregate is three pure functions.

- `initial_state`: the state before any event;
- `evolve(state, event) -> state`: how one event changes it (a fold);
- `decide(command, state) -> list[event]`: what a command produces, or a `DomainError`.

`handle` in `agentbus.domain.handling` wires a decider to the event store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agentbus.errors import AgentbusError
from agentbus.events.registry import DomainEvent

C = TypeVar("C")
S = TypeVar("S")


class DomainError(AgentbusError):
    """A command the aggregate refuses in its current state. The message says why."""


@dataclass(frozen=True, slots=True)
class Decider(Generic[C, S]):
    kind: str
    """The aggregate kind: the third token of its subjects (`evt.<ws>.<kind>.<id>.<event>`)."""
    initial_state: S
    evolve: Callable[[S, DomainEvent], S]
    decide: Callable[[C, S], Sequence[DomainEvent]]
    snapshot: str | None = None
    """The name of an event that carries the aggregate's whole state (`evolve` ignores the state
    before it), or None. Loads start at the aggregate's last such event."""

    def fold(self, events: Iterable[DomainEvent]) -> S:
        state = self.initial_state
        for event in events:
            state = self.evolve(state, event)
        return state
