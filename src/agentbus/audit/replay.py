"""Replay and export: an auditor's read of the event history, filtered, resumable.

The pure core: a validated `ReplayFilter` (workspace, aggregate kind and id, event types,
position range, time range), the narrowest JetStream subject filters for it, the position range
a replay covers, and the export line format (one structured CloudEvent per line, with the
stream position as the extension attribute `position`). The shell: `Replay`, which turns the
times into positions through the store, reads the range with the store's ordered consumer
(decoded through the store, so upcasting checks and erasure apply) and keeps the cursor to
continue from. See docs/replay.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson

from agentbus.errors import AgentbusError, InvalidEvent
from agentbus.events.registry import EventKind, EventRegistry
from agentbus.events.subjects import EVENTS_PREFIX, validate_name, validate_token
from agentbus.store.eventstore import EventStore, RecordedEvent

MAX_TYPES: Final = 64
"""Event types one filter may name (each becomes a subject filter of the reader)."""
POSITION: Final = "position"
"""The CloudEvents extension attribute an export line carries its stream position in."""


class InvalidReplayFilter(AgentbusError, ValueError):
    """A replay filter that cannot be read; `field` names the offending one."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NotAnExport(AgentbusError, ValueError):
    """A file to resume whose last line is not an export line (no readable `position`)."""


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which events a replay yields. Every field is optional; all given ones must hold.

    - `workspace`: one workspace (None: every workspace, for operators);
    - `aggregate`: an aggregate kind (`run`, `session`, ...); `id`: one aggregate (needs
      `aggregate`);
    - `types`: CloudEvents types as stored (`agentbus.run.started.v1`), any of them;
    - `from_position` / `to_position`: stream positions, both inclusive;
    - `since` (inclusive) / `until` (exclusive): the time JetStream stored the event; naive
      datetimes are read as UTC.

    Invalid values or combinations raise `InvalidReplayFilter` naming the field. Pass a
    `registry` to `create` to also refuse aggregate kinds and types this build does not know.
    """

    workspace: str | None = None
    aggregate: str | None = None
    id: str | None = None
    types: tuple[str, ...] = ()
    from_position: int = 1
    to_position: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        _checked(self.workspace, "workspace", validate_token)
        _checked(self.aggregate, "aggregate", validate_name)
        _checked(self.id, "id", validate_token)
        if self.id is not None and self.aggregate is None:
            raise InvalidReplayFilter("id", "needs the aggregate kind too (aggregate)")
        if len(self.types) > MAX_TYPES:
            raise InvalidReplayFilter("types", f"{len(self.types)} given; at most {MAX_TYPES}")
        for type_string in self.types:
            kind = _kind(type_string)
            if self.aggregate is not None and kind.aggregate != self.aggregate:
                raise InvalidReplayFilter(
                    "types",
                    f"{type_string} is a {kind.aggregate} event, not a {self.aggregate} "
                    "event as the aggregate filter asks",
                )
        if len(set(self.types)) != len(self.types):
            object.__setattr__(self, "types", tuple(dict.fromkeys(self.types)))
        if self.from_position < 1:
            raise InvalidReplayFilter(
                "from_position", f"positions start at 1, got {self.from_position}"
            )
        if self.to_position is not None and self.to_position < self.from_position:
            raise InvalidReplayFilter(
                "to_position",
                f"{self.to_position} is before the from position {self.from_position}",
            )
        since = _aware(self.since)
        until = _aware(self.until)
        object.__setattr__(self, "since", since)
        object.__setattr__(self, "until", until)
        if since is not None and until is not None and until <= since:
            raise InvalidReplayFilter(
                "until", f"{until.isoformat()} is not after since ({since.isoformat()})"
            )

    @classmethod
    def create(
        cls,
        *,
        registry: EventRegistry | None = None,
        workspace: str | None = None,
        aggregate: str | None = None,
        id: str | None = None,
        types: Iterable[str] = (),
        from_position: int | None = None,
        to_position: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> ReplayFilter:
        """A filter from optional inputs (as a CLI or a query string gives them), checked
        against `registry` when given: unknown aggregate kinds and types are refused rather
        than silently matching nothing."""
        wanted = tuple(t.strip() for t in types if t.strip())
        replay_filter = cls(
            workspace=workspace,
            aggregate=aggregate,
            id=id,
            types=wanted,
            from_position=1 if from_position is None else from_position,
            to_position=to_position,
            since=since,
            until=until,
        )
        if registry is not None:
            replay_filter.check_known(registry)
        return replay_filter

    def check_known(self, registry: EventRegistry) -> None:
        """Refuse aggregate kinds and types `registry` cannot read (a typo matches nothing)."""
        kinds = sorted({model.kind.aggregate for model in registry.models})
        if self.aggregate is not None and self.aggregate not in kinds:
            raise InvalidReplayFilter(
                "aggregate", f"unknown kind {self.aggregate!r}; known: {', '.join(kinds)}"
            )
        for type_string in self.types:
            try:
                model = registry.model_for(type_string)
            except InvalidEvent as exc:
                raise InvalidReplayFilter("types", str(exc)) from None
            if EventKind.parse(type_string).version > model.kind.version:
                raise InvalidReplayFilter(
                    "types", f"{type_string!r} is newer than this build knows ({model.kind.type})"
                )

    def subjects(self) -> list[str]:
        """The narrowest JetStream subject filters covering the filter (never overlapping:
        a consumer refuses overlapping filters). Types become subject suffixes (the event
        name is the last token; the version is checked on each event by `matches`)."""
        workspace = self.workspace or "*"
        if self.types:
            aggregate_id = self.id or "*"
            names = dict.fromkeys(_kind(t) for t in self.types)
            pairs = dict.fromkeys((kind.aggregate, kind.name) for kind in names)
            return [
                f"{EVENTS_PREFIX}.{workspace}.{aggregate}.{aggregate_id}.{name}"
                for aggregate, name in pairs
            ]
        if self.aggregate is None:
            return [f"{EVENTS_PREFIX}.{workspace}.>"]
        if self.id is None:
            return [f"{EVENTS_PREFIX}.{workspace}.{self.aggregate}.>"]
        return [f"{EVENTS_PREFIX}.{workspace}.{self.aggregate}.{self.id}.*"]

    def matches(self, event_type: str) -> bool:
        """Whether an event of `event_type`, read through `subjects()`, is wanted."""
        return not self.types or event_type in self.types


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """The positions a replay reads: `first` to `last`, both inclusive (empty when
    `last < first`). `bounded`: `last` comes from `to_position` or `until`, so reaching it
    completes the export; otherwise it is the stream's end when the replay started."""

    first: int
    last: int
    bounded: bool

    @property
    def empty(self) -> bool:
        return self.last < self.first


def replay_range(
    replay_filter: ReplayFilter,
    *,
    after: int,
    stream_last: int,
    since_position: int | None,
    until_position: int | None,
) -> ReplayRange:
    """The range to read (pure). `after`: the cursor to continue after (0: from the start);
    `since_position` / `until_position`: the first positions stored at or after `since` /
    `until` (None: none stored yet)."""
    if after < 0:
        raise InvalidReplayFilter("after", f"a cursor is a position >= 0, got {after}")
    first = max(replay_filter.from_position, after + 1)
    if replay_filter.since is not None:
        first = max(first, stream_last + 1 if since_position is None else since_position)
    last = stream_last
    bounded = False
    if replay_filter.to_position is not None and replay_filter.to_position <= last:
        last, bounded = replay_filter.to_position, True
    # until: stop before the first event stored at or after it (none yet: the stream's end)
    if (
        replay_filter.until is not None
        and until_position is not None
        and until_position <= last + 1
    ):
        last, bounded = until_position - 1, True
    return ReplayRange(first, last, bounded)


def export_line(recorded: RecordedEvent) -> bytes:
    """One export line: the structured CloudEvent as read through the store, plus its stream
    position as the extension attribute `position`, and a newline.

    Serialised as the store writes envelopes (orjson, attributes in the same order, absent
    extensions left out), so the line without `position` is the stored JSON, byte for byte,
    unless the store's decoding changed the event (an erased payload)."""
    envelope = recorded.envelope.model_dump(exclude_none=True)
    envelope[POSITION] = recorded.position
    return orjson.dumps(envelope) + b"\n"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where an export file continues: after `position` (0: the file holds no event), with
    the file cut to `length` bytes first (a torn last line, from a crash mid-write, goes)."""

    position: int
    length: int


def resume_point(tail: bytes, offset: int) -> ResumePoint | None:
    """The resume point of an export file from its last bytes (pure): `tail` is the file
    from byte `offset` to its end. None when `tail` does not hold a whole line and starts
    past the beginning of the file (read a longer tail)."""
    end = tail.rfind(b"\n")
    if end < 0:
        return ResumePoint(0, 0) if offset == 0 else None
    start = tail.rfind(b"\n", 0, end) + 1
    if start == 0 and offset > 0:
        return None
    line = tail[start:end]
    try:
        value = orjson.loads(line).get(POSITION)
    except (orjson.JSONDecodeError, AttributeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NotAnExport(
            f"the last line (byte {offset + start}) has no `{POSITION}`: not an agentbus "
            "replay export"
        )
    return ResumePoint(value, offset + end + 1)


@dataclass
class Replay:
    """One pass over the history for a filter, after a cursor; at most `limit` events.

    `await Replay.start(...)` fixes the range (times become positions; the end is the
    stream's last position at start unless the filter bounds it), then `events()` yields the
    matching events in order. `next_after` is the cursor to continue from: the position of
    the last event the consumer took, or the end of the range once it was read through (so
    events skipped by the filter are not scanned again). Continuing from it with the same
    filter gives no gap and no duplicate.
    """

    store: EventStore
    filter: ReplayFilter
    range: ReplayRange
    after: int
    limit: int | None = None
    delivered: int = 0
    next_after: int = 0
    finished: bool = False
    """The range was read through (not stopped by `limit` or the consumer)."""
    reached: int = 0
    """The position of the last event read (matching or not), for progress."""

    @classmethod
    async def start(
        cls,
        store: EventStore,
        replay_filter: ReplayFilter,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> Replay:
        if limit is not None and limit < 1:
            raise InvalidReplayFilter("limit", f"must be at least 1, got {limit}")
        if after < 0:
            raise InvalidReplayFilter("after", f"a cursor is a position >= 0, got {after}")
        stream_last = await store.last_position()
        since = until = None
        if replay_filter.since is not None:
            since = await store.position_at(replay_filter.since)
        if replay_filter.until is not None:
            until = await store.position_at(replay_filter.until)
        span = replay_range(
            replay_filter,
            after=after,
            stream_last=stream_last,
            since_position=since,
            until_position=until,
        )
        return cls(store, replay_filter, span, after, limit, next_after=after, reached=after)

    @property
    def complete(self) -> bool:
        """Everything the filter asks for has been read: a bounded range read through."""
        return self.finished and self.range.bounded

    async def events(self) -> AsyncIterator[RecordedEvent]:
        """The matching events of the range, oldest first. Iterate to the end (the replay
        stops itself at `limit`): the cursor moves past an event when the next is asked for."""
        span = self.range
        if span.empty:
            self._finish()
            return
        async for recorded in self.store.read(
            from_position=span.first, subjects=self.filter.subjects(), to_position=span.last
        ):
            if recorded.position > span.last:
                break  # a filtered reader may deliver the next match beyond the range
            self.reached = recorded.position
            if not self.filter.matches(recorded.type):
                continue
            yield recorded
            self.next_after = recorded.position
            self.delivered += 1
            if self.limit is not None and self.delivered >= self.limit:
                return
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.reached = max(self.reached, self.range.last)
        self.next_after = max(self.next_after, self.range.last)


def _checked(value: str | None, name: str, validate: Callable[[str, str], str]) -> None:
    if value is None:
        return
    try:
        validate(value, "")  # its message then reads "'a.b' may only contain ..."
    except InvalidEvent as exc:
        raise InvalidReplayFilter(name, str(exc).strip()) from None


def _kind(type_string: str) -> EventKind:
    try:
        return EventKind.parse(type_string)
    except InvalidEvent as exc:
        raise InvalidReplayFilter("types", str(exc)) from None


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
