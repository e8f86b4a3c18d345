"""What a projection is: a small class that says how events become rows. Nothing else.

A projection declares

- `name` and `version` (bump the version when its tables or handlers change: the runtime rebuilds
  it blue-green into new tables and swaps once caught up);
- `tables` it owns and their `schema` (DDL with `{table}` placeholders: the runtime creates them
  per generation as `<table>_g<n>` and points the stable view `<table>` at the live generation);
- `statements`, the SQL its handlers feed, **in the order the runtime runs them**;
- `handlers()`, one function per event type it handles, returning `Write`s (a statement and its
  parameters).

The runtime applies a batch of events statement by statement: every `Write` of the first
statement (in event order, one `executemany`, or one `COPY` for a `Statement.copy`), then the
second, and so on. That is what makes catch-up fast; the price is a rule for handlers: the
effect of a batch must not depend on how it is cut. Write statements whose rows commute
across statements (inserts before the updates that need them; counters as increments;
last-writer-wins columns guarded by position). Every projection is checked for this by
`tests/test_projections.py` (batch size 1 vs large batches give identical tables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from agentbus.events.registry import DomainEvent
from agentbus.store.eventstore import RecordedEvent


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement of a projection, with `{table}` placeholders for its tables.

    `merge_on` (parameter indexes) and `merge` let the runtime fold the rows of one batch that
    share those parameters into one row before executing: e.g. one counter update per session
    per batch instead of one per message. `merge` must be associative and commutative (sums,
    maxima), so the result does not depend on where batches are cut."""

    name: str
    sql: str
    merge_on: tuple[int, ...] = ()
    merge: Callable[[tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...]] | None = None
    columns: tuple[str, ...] = ()
    """Set by `Statement.copy`: `sql` is then a table, and the rows are these columns."""

    @classmethod
    def copy(cls, name: str, table: str, columns: Sequence[str]) -> Statement:
        """Rows appended to `table` (a `{table}` placeholder) with `COPY`, the cheapest way
        to insert: per row about half the Postgres time and half the Python time of an
        `executemany` INSERT (docs/benchmarks.md, scenario `projection`).

        Only for rows that are new by construction: a key that includes the event's stream
        position (the runtime applies a batch once: its checkpoint update is fenced). There is
        no `ON CONFLICT`: a row that exists already fails the batch, and the runtime's
        isolation makes its event a dead letter, where an `ON CONFLICT DO NOTHING` would have
        skipped it silently."""
        if not columns:
            raise ValueError(f"statement {name}: COPY needs its columns")
        return cls(name, table, columns=tuple(columns))

    def row(self, *args: Any) -> Write:
        return Write(self, args)

    def render(self, tables: Mapping[str, str]) -> str:
        return self.sql.format_map(tables)


@dataclass(frozen=True, slots=True)
class Write:
    """Parameters for one execution of `statement`."""

    statement: Statement
    args: tuple[Any, ...]


Handler = Callable[[RecordedEvent], Iterable[Write]]
PoisonPolicy = Literal["continue", "halt"]


class Projection:
    """Base class of read models. Subclasses set the class attributes and `handlers()`."""

    name: ClassVar[str]
    version: ClassVar[int]
    tables: ClassVar[tuple[str, ...]]
    schema: ClassVar[tuple[str, ...]]
    statements: ClassVar[tuple[Statement, ...]]
    on_poison: ClassVar[PoisonPolicy] = "continue"
    """What to do with an event a handler cannot apply: record it in dead_letters and go on
    (`continue`), or record it and stop before it until someone retries (`halt`)."""

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        raise NotImplementedError

    def physical_tables(self, generation: int) -> dict[str, str]:
        """Logical table name -> the physical table of `generation`."""
        return {table: f"{table}_g{generation}" for table in self.tables}
