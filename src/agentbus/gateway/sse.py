"""The SSE bridge: a client follows events over HTTP (`text/event-stream`) and resumes from a
signed cursor, on any gateway replica, with no gap and no duplicate.

Read top to bottom: the options, what an endpoint streams (`Feed`, made of `Source`s: one
subject filter on one stream each), the per-process `StreamStates` (epochs and retention, shared
by connections), the `Connection` (readers, a bounded buffer, the writer), the ASGI response,
and `Bridge`, which the routes call.

How a connection reads a source, and why (docs/sse.md has the measurements):

- **Catch-up by pull.** From the cursor's position, pages of batched direct gets
  (`EventStore.read_page`), each asked for only when the buffer has room. An ordered consumer
  pushes the backlog into the process whatever the reader does (measured: 30-50 MB of a
  100,000-event backlog within a second), which no per-connection bound survives.
- **Then follow the hub.** One ordered consumer per stream per process (`Hub`) fans events out
  to the connections by subject. A caught-up source subscribes (the hub delivers everything
  after its position h), pages on up to h and releases what the hub delivered meanwhile:
  gap-free and duplicate-free by position. A thousand followers cost one JetStream consumer,
  not a thousand (and nats-server 2.15 caps a stream at 1,000 consumers by default).
- **Bounded.** A client that cannot keep up with what the hub delivers lets its buffer pass the
  bound and is disconnected; it resumes from its cursor (a catch-up by pages again).
- **Cursor = what the client received.** Each SSE event's `id:` is the cursor after it, so
  `Last-Event-ID` continues at the next position of every source.
- **Reset, never silent loss.** A source position > 0 whose stream was re-created (its epoch
  changed) or whose next position fell out of retention (`position + 1 < first_seq`) makes the
  connection send `event: reset` (with a fresh cursor as its id) and end. The retention check
  runs on stream state fetched *after* the first page was read, so a page that silently started
  past expired events is caught; epochs are checked again every ping interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
import structlog
from nats.aio.client import Client as NATS
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from agentbus.domain.run import RunNotFound
from agentbus.domain.session import SessionNotFound
from agentbus.errors import AgentbusError, StoreUnavailable
from agentbus.events.registry import EventKind, EventRegistry
from agentbus.events.run import RunCancelled, RunFailed, RunSucceeded, RunTimedOut
from agentbus.events.session import RunAssigned, RunReleased
from agentbus.events.subjects import EVENTS_PREFIX, LIVE_PREFIX, LIVE_STREAM, validate_token
from agentbus.gateway.cursors import BadStreamCursor, Cursor, CursorCodec, epoch_of
from agentbus.runtime.secrets import shared_secret
from agentbus.settings import Settings
from agentbus.store.eventstore import EventStore, RawEvent

CURSOR_SECRET: Final = "sse_cursor"
LIVE_TYPES: Final = {"delta": "agentbus.run.delta.v1", "progress": "agentbus.run.progress.v1"}
"""CloudEvents types of a run's live output (LIVE stream; not durable, not in the registry)."""

_FLUSH_BYTES = 32 * 1024  # the writer sends when this much is ready (or nothing more is)
_ITEMS_PER_ROUND = 512
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
_ASSIGNED = RunAssigned.kind.type
_FINAL = frozenset(e.kind.type for e in (RunSucceeded, RunFailed, RunCancelled, RunTimedOut))
_RELEASED = RunReleased.kind.type

log = structlog.get_logger("agentbus.sse")


class BadStreamFilter(AgentbusError):
    """A stream filter that names no known event type (400)."""


@dataclass(frozen=True, slots=True)
class SseOptions:
    """Connection hygiene knobs (from `Settings`)."""

    ping_interval: float = 15.0
    """Every this many seconds: a `: ping` comment if nothing else is being written, and a
    check of the stream epochs."""
    retry_ms: int = 3000
    """The `retry:` sent on connect: how long a browser waits before it reconnects."""
    buffer_events: int = 1000
    """A connection holds at most this many events not yet written to its socket..."""
    buffer_bytes: int = 1024 * 1024
    """... and at most this many bytes of them; past either bound the client is too slow."""
    page_size: int = 256
    """Events per catch-up page (capped at half the buffer)."""

    @classmethod
    def of(cls, settings: Settings) -> SseOptions:
        return cls(
            ping_interval=settings.sse_ping_interval,
            retry_ms=settings.sse_retry_ms,
            buffer_events=settings.sse_buffer_events,
            buffer_bytes=settings.sse_buffer_bytes,
        )


# ---------------------------------------------------------------------------- what is streamed


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One subject filter on one stream. `key` names it in cursors."""

    key: str
    live: bool
    """On the LIVE stream (else EVENTS)."""
    subject: str
    """The filter caught up from (direct get takes one filter, wildcards allowed)."""
    follow: tuple[str, ...]
    """The filters followed (may be narrower than `subject`: server-side type filtering)."""


@dataclass(frozen=True, slots=True)
class Feed:
    """What one SSE endpoint streams, and the scope its cursors are signed for."""

    workspace: str
    scope: str
    sources: tuple[SourceSpec, ...]
    types: frozenset[str] | None = None
    """Only events of these CloudEvents types (None: every type)."""
    session_runs: bool = False
    """Also stream the runs the session assigns: a run's events and live output from its
    `run_assigned` to its `run_released` (which is sent after all of them)."""
    missing: Callable[[], AgentbusError] | None = None
    """The error (404) when the first source has no event at all."""


def session_feed(workspace: str, session_id: str, *, runs: bool = False) -> Feed:
    subject = f"{EVENTS_PREFIX}.{workspace}.session.{session_id}.*"
    return Feed(
        workspace,
        f"{workspace}/session/{session_id}" + ("?include=runs" if runs else ""),
        (SourceSpec("s", False, subject, (subject,)),),
        session_runs=runs,
        missing=lambda: SessionNotFound(f"session {session_id} not found"),
    )


def run_feed(workspace: str, run_id: str) -> Feed:
    events, live = _run_sources(workspace, run_id, "e", "l")
    return Feed(
        workspace,
        f"{workspace}/run/{run_id}",
        (events, live),
        missing=lambda: RunNotFound(f"run {run_id} not found"),
    )


def workspace_feed(workspace: str, types: frozenset[str] | None, registry: EventRegistry) -> Feed:
    """The workspace's whole flow of durable events, optionally only some CloudEvents types
    (each checked against the registry: an unknown one is a `BadStreamFilter`)."""
    every = f"{EVENTS_PREFIX}.{workspace}.>"
    if not types:
        return Feed(workspace, f"{workspace}/events", (SourceSpec("e", False, every, (every,)),))
    subjects: list[str] = []
    for name in sorted(types):
        kind = _known_kind(name, registry)
        subject = f"{EVENTS_PREFIX}.{workspace}.{kind.aggregate}.*.{kind.name}"
        if subject not in subjects:
            subjects.append(subject)
    catch_up = subjects[0] if len(subjects) == 1 else every
    return Feed(
        workspace,
        f"{workspace}/events?types={','.join(sorted(types))}",
        (SourceSpec("e", False, catch_up, tuple(subjects)),),
        types=types,
    )


def _known_kind(name: str, registry: EventRegistry) -> EventKind:
    try:
        kind = EventKind.parse(name)
        model = registry.model_for(name)
    except AgentbusError as exc:
        raise BadStreamFilter(f"unknown event type {name!r}: {exc}") from None
    if kind.version > model.kind.version:
        raise BadStreamFilter(f"unknown event type {name!r}: newest is {model.kind.type}")
    return kind


def _run_sources(
    workspace: str, run_id: str, events_key: str, live_key: str
) -> tuple[SourceSpec, SourceSpec]:
    events = f"{EVENTS_PREFIX}.{workspace}.run.{run_id}.*"
    live = f"{LIVE_PREFIX}.{workspace}.run.{run_id}.*"
    return (
        SourceSpec(events_key, False, events, (events,)),
        SourceSpec(live_key, True, live, (live,)),
    )


# ---------------------------------------------------------------------------- stream states


@dataclass(frozen=True, slots=True)
class StreamState:
    epoch: str
    first: int
    """The oldest position still retained (`first_seq`)."""
    last: int
    """The newest position (`last_seq`)."""
    asked: float
    """When it was asked for (monotonic): the state is at least that fresh."""


class StreamStates:
    """Stream epochs and retention, per process, shared by every connection: a connection
    asks for a state fetched no earlier than a moment it names, and connections asking at
    once share one `STREAM.INFO` request."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._stores: dict[str, EventStore] = {}
        self._known: dict[str, StreamState] = {}
        self._asking: dict[str, tuple[float, asyncio.Task[StreamState]]] = {}

    async def get(self, stream: str, *, not_before: float) -> StreamState:
        known = self._known.get(stream)
        if known is not None and known.asked >= not_before:
            return known
        asking = self._asking.get(stream)
        if asking is None or asking[0] < not_before:
            asked = time.monotonic()
            task = asyncio.create_task(self._ask(stream, asked))
            asking = (asked, task)
            self._asking[stream] = asking
            task.add_done_callback(lambda _: self._forget(stream, task))
        return await asyncio.shield(asking[1])

    def _forget(self, stream: str, task: asyncio.Task[StreamState]) -> None:
        if self._asking.get(stream, (0.0, None))[1] is task:
            del self._asking[stream]

    async def _ask(self, stream: str, asked: float) -> StreamState:
        store = self._stores.get(stream)
        if store is None:
            store = self._stores[stream] = self._store.on_stream(stream)
        info = await store.stream_info()
        numbers = info["state"]
        state = StreamState(
            epoch_of(info["created"]), int(numbers["first_seq"]), int(numbers["last_seq"]), asked
        )
        known = self._known.get(stream)
        if known is None or known.asked <= asked:
            self._known[stream] = state
        return state


# ---------------------------------------------------------------------------- the hub


@dataclass(eq=False, slots=True)
class Subscription:
    """A connection's interest in some subjects of a hub's stream."""

    filters: tuple[tuple[str, ...], ...]
    deliver: Callable[[RawEvent], None]
    stopped: Callable[[], None]
    """Called if the hub stops (its reader failed): the connection must end."""

    def matches(self, tokens: list[str]) -> bool:
        return any(_matches(f, tokens) for f in self.filters)


def _matches(pattern: tuple[str, ...], tokens: list[str]) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more at the end."""
    for index, part in enumerate(pattern):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens) or (part != "*" and part != tokens[index]):
            return False
    return len(tokens) == len(pattern)


class Hub:
    """One ordered consumer per stream per gateway process, fanning its events out to the
    connections that follow them: a thousand followers cost one consumer, not a thousand
    (nats-server 2.15 also caps a stream at 1,000 consumers by default).

    Started on first use at the stream's end; `position` is the last event dispatched. A
    subscriber gets every matching event after the `position` returned by `subscribe`, and
    catches up to it by pages itself (`Connection._read`)."""

    def __init__(self, store: EventStore, prefix: str, states: StreamStates) -> None:
        self._store = store
        self._prefix = prefix
        self._states = states
        self.position = 0
        self._epoch: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._by_aggregate: dict[str, set[Subscription]] = {}
        self._by_workspace: dict[str, set[Subscription]] = {}
        self._others: set[Subscription] = set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def subscriptions(self) -> int:
        return (
            sum(map(len, self._by_aggregate.values()))
            + sum(map(len, self._by_workspace.values()))
            + len(self._others)
        )

    async def subscribe(
        self,
        subjects: tuple[str, ...],
        deliver: Callable[[RawEvent], None],
        stopped: Callable[[], None],
    ) -> tuple[Subscription, int]:
        """Deliver every event on `subjects` after the returned position, in order."""
        await self._running()
        subscription = Subscription(tuple(tuple(s.split(".")) for s in subjects), deliver, stopped)
        for index in self._indexes(subscription):
            index.add(subscription)
        return subscription, self.position

    def unsubscribe(self, subscription: Subscription) -> None:
        for index in self._indexes(subscription):
            index.discard(subscription)

    def _indexes(self, subscription: Subscription) -> list[set[Subscription]]:
        indexes = []
        for pattern in subscription.filters:
            if len(pattern) >= 5 and "*" not in pattern[:4] and ">" not in pattern[:4]:
                indexes.append(self._by_aggregate.setdefault(".".join(pattern[:4]), set()))
            elif len(pattern) >= 3 and "*" not in pattern[:2] and ">" not in pattern[:2]:
                indexes.append(self._by_workspace.setdefault(".".join(pattern[:2]), set()))
            else:
                indexes.append(self._others)
        return indexes

    async def _running(self) -> None:
        async with self._starting:
            state = await self._states.get(self._store.stream, not_before=time.monotonic() - 1.0)
            if self._task is not None and not self._task.done() and state.epoch == self._epoch:
                return
            if self._task is not None:  # re-created stream, or a failed reader: start over
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            state = await self._states.get(self._store.stream, not_before=time.monotonic())
            self._epoch = state.epoch
            self.position = state.last
            self._task = asyncio.create_task(
                self._run(state.last + 1), name=f"sse-hub-{self._prefix}"
            )

    async def _run(self, start: int) -> None:
        try:
            async for raw in self._store.read_raw(
                from_position=start, subjects=[f"{self._prefix}.>"], follow=True
            ):
                if raw.position <= self.position:
                    continue
                self.position = raw.position
                self._dispatch(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sse hub stopped", stream=self._store.stream, error=repr(exc))
            everyone = set(self._others).union(*self._by_aggregate.values())
            for subscription in everyone.union(*self._by_workspace.values()):
                subscription.stopped()

    def _dispatch(self, raw: RawEvent) -> None:
        tokens = raw.subject.split(".")
        for index in (
            self._by_aggregate.get(".".join(tokens[:4])),
            self._by_workspace.get(".".join(tokens[:2])),
            self._others,
        ):
            if index:
                for subscription in list(index):
                    if subscription.matches(tokens):
                        subscription.deliver(raw)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# ---------------------------------------------------------------------------- a connection


@dataclass(eq=False, slots=True)
class Source:
    spec: SourceSpec
    store: EventStore
    position: int
    """The last position delivered to the client (what its cursor says)."""
    read: int
    """The last position taken from the stream (buffered, maybe not delivered yet)."""
    covered: int = 0
    """Every matching event up to here has been read (`read` or beyond: a page that reached
    the end of the stream covers what the hub had dispatched before it was asked for)."""
    caught_up: bool = False
    gated: bool = False
    """Starts reading once the session is followed live (a run of a session stream)."""
    verified: bool = False
    """Its epoch and retention were checked after its first page (or it had no position)."""
    task: asyncio.Task[None] | None = None
    """Its catch-up (pages, then the hand-over to the hub)."""
    subscription: Subscription | None = None
    held: list[RawEvent] | None = None
    """What the hub delivered during the hand-over, before the pages reached it."""
    live: bool = False
    """Following the hub (the hand-over is done)."""
    closed: bool = False

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass(frozen=True, slots=True)
class Reset:
    reason: Literal["stream_recreated", "behind_retention"]
    stream: str

    @property
    def detail(self) -> str:
        if self.reason == "stream_recreated":
            return f"stream {self.stream} was re-created since this cursor: reload"
        return f"this cursor is older than what stream {self.stream} retains: reload"


class Connection:
    """One client's stream: source readers fill a bounded buffer, one writer empties it."""

    def __init__(self, bridge: Bridge, feed: Feed, cursor: Cursor | None) -> None:
        self._bridge = bridge
        self._feed = feed
        self._options = bridge.options
        self._cursor = cursor
        self._sources: dict[str, Source] = {}
        self._epochs: dict[str, str] = {}
        self._items: deque[tuple[Source, RawEvent]] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._following = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.interrupt: Callable[[], object] | None = None
        """Stops the writer at once (set by the response while it writes)."""
        self.interrupted = False
        self._out = bytearray()
        self._send: Callable[[bytes], Awaitable[None]] | None = None
        self._reset: Reset | None = None
        low_events = max(1, self._options.buffer_events // 2)
        self._page = min(self._options.page_size, low_events)
        self._page_bytes = max(1024, self._options.buffer_bytes // 2)
        positions = dict(cursor.positions) if cursor is not None else {}
        for spec in feed.sources:
            position = positions.pop(spec.key, 0)
            self._add(spec, position)
        if feed.session_runs:
            for key in [k for k in positions if k.startswith("e:")]:
                run_id = key[2:]
                events, live = _run_sources(feed.workspace, run_id, key, f"l:{run_id}")
                if live.key in positions:
                    self._add(events, positions.pop(key), gated=True)
                    self._add(live, positions.pop(live.key), gated=True)
        if positions:
            raise BadStreamCursor("malformed cursor: sources this stream does not have")

    @property
    def scope(self) -> str:
        return self._feed.scope

    def _add(self, spec: SourceSpec, position: int, *, gated: bool = False) -> Source:
        store = self._bridge.live if spec.live else self._bridge.events
        source = Source(
            spec, store, position, position, covered=position, gated=gated, verified=not position
        )
        self._sources[spec.key] = source
        return source

    # -- before the response: the first page of each source, epochs and retention

    async def prepare(self) -> None:
        """Read the first page of every source, then check epochs and retention. Raises the
        feed's `missing` error when it has no event at all (a fresh connection)."""
        started = time.monotonic()
        first = True
        for source in list(self._sources.values()):
            if source.gated:
                continue
            page = await self._fetch(source)
            if first and self._feed.missing is not None and source.position == 0 and not page:
                raise self._feed.missing()
            first = False
            source.verified = True
        checked = time.monotonic()
        streams = {s.store.stream for s in self._sources.values()}
        if self._feed.session_runs:  # runs opened later need the LIVE epoch in their cursors
            streams.add(self._bridge.live.stream)
        for stream in sorted(streams):
            resumed = [s for s in self._sources.values() if s.store.stream == stream and s.position]
            # A resumed source needs a state asked for after its first page was read.
            state = await self._bridge.states.get(
                stream, not_before=checked if resumed else started - 1.0
            )
            self._epochs[stream] = state.epoch
            if not resumed or self._reset is not None:
                continue
            previous = self._cursor.epochs.get(stream) if self._cursor else None
            if previous != state.epoch:
                self._reset = Reset("stream_recreated", stream)
            elif min(s.position for s in resumed) + 1 < state.first:
                self._reset = Reset("behind_retention", stream)

    async def _fetch(self, source: Source) -> list[RawEvent]:
        # Whatever the hub has dispatched before this page is asked for is in the stream by
        # the time the page is read: a page that reaches the end covers that far too.
        hub = self._bridge.hubs.get(source.store.stream)
        dispatched = hub.position if hub is not None and hub.running else 0
        page = await source.store.read_page(
            after=source.read,
            subject=source.spec.subject,
            limit=self._page,
            max_bytes=self._page_bytes,
        )
        for raw in page:
            self._push(source, raw)
        if page:
            source.read = page[-1].position
        source.caught_up = not page or page[-1].pending == 0
        source.covered = max(source.read, dispatched) if source.caught_up else source.read
        return page

    # -- readers

    def _start(self, source: Source) -> None:
        source.task = asyncio.create_task(self._read(source), name=f"sse-{source.key}")

    async def _read(self, source: Source) -> None:
        """Catch `source` up by pages, then hand it over to the hub with no gap and no
        duplicate: subscribe (the hub delivers everything after position h), page on until
        h, then release what the hub delivered meanwhile, after the last page's position."""
        try:
            if source.gated:
                await self._following.wait()
            while not source.caught_up:
                await self._wait_for_room()
                await self._fetch(source)
                if not source.verified:
                    await self._verify(source)
                    if self._reset is not None:
                        return
            hub = self._bridge.hub(source.store)
            source.held = []
            source.subscription, handed = await hub.subscribe(
                source.spec.follow,
                lambda raw: self._on_hub(source, raw),
                lambda: self._end("store_error"),
            )
            while source.covered < handed:
                await self._wait_for_room()
                await self._fetch(source)
                if source.caught_up and source.covered < handed:
                    return  # the hub stopped meanwhile: this connection is ending
            held, source.held = source.held, None
            source.live = True
            for raw in held:
                self._on_hub(source, raw)
            if source.key == "s":
                self._following.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sse reader stopped", scope=self._feed.scope, error=repr(exc))
            self._end("store_error")

    def _on_hub(self, source: Source, raw: RawEvent) -> None:
        if source.closed:
            return
        if not source.live:
            if source.held is not None:
                source.held.append(raw)
                if len(source.held) > self._options.buffer_events:
                    self.abort("too_slow")
            return
        if raw.position <= source.read:
            return
        source.read = raw.position
        self._push(source, raw)
        if (
            len(self._items) > self._options.buffer_events
            or self._bytes > self._options.buffer_bytes
        ):
            self.abort("too_slow")

    async def _verify(self, source: Source) -> None:
        """The retention check of `prepare`, for a source whose first page came later."""
        stream = source.store.stream
        state = await self._bridge.states.get(stream, not_before=time.monotonic())
        source.verified = True
        if state.epoch != self._epochs.get(stream, state.epoch):
            self._reset = Reset("stream_recreated", stream)
        elif source.position + 1 < state.first:
            self._reset = Reset("behind_retention", stream)
        if self._reset is not None:
            self._end("reset")

    def _push(self, source: Source, raw: RawEvent) -> None:
        self._items.append((source, raw))
        self._bytes += len(raw.data)
        self._wake.set()

    async def _wait_for_room(self) -> None:
        while (
            len(self._items) >= self._options.buffer_events // 2
            or self._bytes >= self._options.buffer_bytes // 2
        ):
            self._room.clear()
            await self._room.wait()

    def _end(self, reason: str) -> None:
        """End the stream after what the writer is doing (a reset, a failed reader)."""
        if self.end_reason is None:
            self.end_reason = reason
        self.ended.set()
        self._wake.set()

    def abort(self, reason: Literal["gone", "too_slow", "shutdown"]) -> None:
        """End the stream now, even if the writer waits for the client's socket."""
        self._end(reason)
        interrupt, self.interrupt = self.interrupt, None
        if interrupt is not None:
            self.interrupted = True
            interrupt()

    async def close(self) -> None:
        """Stop every reader and leave the hubs: nothing of the connection stays behind."""
        for source in self._sources.values():
            self._stop(source)
        tasks = [s.task for s in self._sources.values() if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop(self, source: Source) -> None:
        source.closed = True
        if source.task is not None:
            source.task.cancel()
        if source.subscription is not None:
            self._bridge.hub(source.store).unsubscribe(source.subscription)
            source.subscription = None

    # -- the writer

    async def write(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Write the stream until it ends (a reset, or `ended`); the caller stops it when the
        client goes away."""
        self._send = send
        options = self._options
        self._out += b"retry: %d\n\n" % options.retry_ms
        if self._reset is not None:
            await self._write_reset(self._reset)
            return
        for source in self._sources.values():
            self._start(source)
        next_check = time.monotonic() + options.ping_interval
        while not self.ended.is_set():
            if not self._items:
                await self._flush()
                self._wake.clear()
                try:
                    async with asyncio.timeout(max(0.0, next_check - time.monotonic())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if time.monotonic() >= next_check:
                reset = await self._recheck()
                if reset is not None:
                    await self._write_reset(reset)
                    return
                if not self._items:
                    self._out += b": ping\n\n"
                next_check = time.monotonic() + options.ping_interval
            if self._reset is not None:  # found by a reader
                await self._flush()
                await self._write_reset(self._reset)
                return
            for _ in range(min(len(self._items), _ITEMS_PER_ROUND)):
                source, raw = self._items.popleft()
                self._bytes -= len(raw.data)
                await self._deliver(source, raw)
                if len(self._out) >= _FLUSH_BYTES:
                    await self._flush()
            if (
                len(self._items) < options.buffer_events // 2
                and self._bytes < options.buffer_bytes // 2
            ):
                self._room.set()
        await self._flush()

    async def _flush(self) -> None:
        if self._out and self._send is not None:
            data, self._out = bytes(self._out), bytearray()
            await self._send(data)

    async def _recheck(self) -> Reset | None:
        """Has a stream this connection reads been re-created meanwhile?"""
        not_before = time.monotonic() - self._options.ping_interval / 2
        for stream, epoch in self._epochs.items():
            try:
                state = await self._bridge.states.get(stream, not_before=not_before)
            except StoreUnavailable:  # (gone for a moment, e.g. being re-created): next time
                continue
            if state.epoch != epoch:
                return Reset("stream_recreated", stream)
        return None

    async def _write_reset(self, reset: Reset) -> None:
        fresh: dict[str, int] = {spec.key: 0 for spec in self._feed.sources}
        cursor = self._bridge.codec.encode(self._feed.scope, self._epochs, fresh)
        body = orjson.dumps(
            {"reason": reset.reason, "stream": reset.stream, "detail": reset.detail}
        )
        self._out += b"id: %s\nevent: reset\ndata: %s\n\n" % (cursor.encode(), body)
        await self._flush()
        log.info("sse reset", scope=self._feed.scope, reason=reset.reason, stream=reset.stream)

    async def _deliver(self, source: Source, raw: RawEvent) -> None:
        """Write one event read from `source` (nothing if already delivered or filtered)."""
        if source.closed or raw.position <= source.position:
            return
        if source.spec.live:
            source.position = raw.position
            rendered = _live_event(self._feed.workspace, raw)
            if rendered is not None:
                self._frame(*rendered)
            return
        try:
            envelope = orjson.loads(raw.data)
            kind = envelope["type"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            kind = None
        if not isinstance(kind, str):
            log.warning("sse skipped an unreadable event", position=raw.position)
            source.position = raw.position
            return
        if self._feed.types is not None and kind not in self._feed.types:
            source.position = raw.position
            return
        if kind in _FINAL and source.key[0] == "e":
            # A run's final transition comes after all of its live output.
            output = self._sources.get("l" + source.key[1:])
            if output is not None:
                await self._drain(output)
        if self._feed.session_runs and source.key == "s" and kind in (_ASSIGNED, _RELEASED):
            run_id = (envelope.get("data") or {}).get("run_id")
            if isinstance(run_id, str):
                # Before the session's own position moves: a client cut off while the run's
                # last events are delivered resumes with the run still open.
                if kind == _ASSIGNED:
                    self._open_run(run_id, raw.position)
                else:
                    await self._close_run(run_id)
        source.position = raw.position
        data = raw.data
        try:  # sealed personal fields go out opened (docs/erasure.md)
            if await source.store.open_sealed(envelope, raw.data):
                data = orjson.dumps(envelope)
        except AgentbusError as exc:
            log.warning("sse sent an event sealed", position=raw.position, error=str(exc))
        if b"\n" in data or b"\r" in data:  # (orjson never writes raw newlines; be sure)
            data = orjson.dumps(envelope)
        self._frame(kind, data)

    def _frame(self, kind: str, data: bytes) -> None:
        positions = {key: source.position for key, source in self._sources.items()}
        cursor = self._bridge.codec.encode(self._feed.scope, self._epochs, positions)
        self._out += b"id: %s\nevent: %s\ndata: %s\n\n" % (cursor.encode(), kind.encode(), data)

    # -- runs of a session (include=runs)

    def _open_run(self, run_id: str, position: int) -> None:
        events_key = f"e:{run_id}"
        if events_key in self._sources:
            return
        try:
            validate_token(run_id, "run id")
        except AgentbusError:
            return
        events, live = _run_sources(self._feed.workspace, run_id, events_key, f"l:{run_id}")
        # The run's events all come after its assignment; its live output from its start.
        for source in (self._add(events, position, gated=True), self._add(live, 0, gated=True)):
            self._start(source)

    async def _close_run(self, run_id: str) -> None:
        """Deliver what is left of the run (it ended before the session released it), then
        drop its sources: the cursor after `run_released` no longer names the run."""
        for key in (f"e:{run_id}", f"l:{run_id}"):
            source = self._sources.get(key)
            if source is None:
                continue
            self._stop(source)
            source.closed = False  # (still delivering: its rest comes by pages)
            if source.task is not None:
                await asyncio.gather(source.task, return_exceptions=True)
            await self._drain(source)
        for key in (f"e:{run_id}", f"l:{run_id}"):
            source = self._sources.pop(key, None)
            if source is not None:
                source.closed = True

    async def _drain(self, source: Source) -> None:
        """Deliver everything of `source` up to the stream's present end, now (pages, not
        its reader: what the reader buffered meanwhile is skipped as already delivered)."""
        last = await source.store.last_positions([source.spec.subject])
        target = max(last.values(), default=0)
        while source.position < target:
            page = await source.store.read_page(
                after=source.position,
                subject=source.spec.subject,
                limit=self._page,
                max_bytes=self._page_bytes,
            )
            if not page:
                break
            for raw in page:
                await self._deliver(source, raw)
            await self._flush()


def _live_event(workspace: str, raw: RawEvent) -> tuple[str, bytes] | None:
    """A LIVE message (`live.<ws>.run.<id>.<kind>`, JSON) as a CloudEvent."""
    parts = raw.subject.split(".")
    kind = LIVE_TYPES.get(parts[-1]) if len(parts) == 5 else None
    if kind is None:
        return None
    try:
        body = orjson.loads(raw.data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    run_id = parts[3]
    envelope = {
        "specversion": "1.0",
        "id": f"{run_id}:{body.get('attempt')}:{body.get('seq')}",
        "source": "agentbus/live",
        "type": kind,
        "subject": f"run/{run_id}",
        "time": raw.time,
        "datacontenttype": "application/json",
        "data": body,
        "workspace": workspace,
    }
    return kind, orjson.dumps(envelope)


# ---------------------------------------------------------------------------- the response


class EventStreamResponse(Response):
    """`text/event-stream` for one `Connection`. Ends when the stream ends, when the client
    goes (its readers are stopped at once), or when the client is too slow (the connection is
    dropped: it resumes from its last id)."""

    media_type = "text/event-stream"

    def __init__(self, bridge: Bridge, connection: Connection) -> None:
        # Not Response.__init__: it would add `content-length: 0`.
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.raw_headers = list(_HEADERS)
        self._bridge = bridge
        self._connection = connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        connection = self._connection
        self._bridge.connections.add(connection)
        # The writer runs in this task; a gone or too slow client interrupts it (it may be
        # waiting for a socket that drains no more). One extra task per connection: memory.
        task = asyncio.current_task()
        assert task is not None
        connection.interrupt = task.cancel
        watcher = asyncio.create_task(_watch(receive, connection), name="sse-disconnect")
        try:
            await connection.write(body)
        except asyncio.CancelledError:
            if task.uncancel() > 0 and connection.interrupted:
                raise
            if not connection.interrupted:
                # The server is stopping and cancels what still runs after its graceful
                # timeout (`end_streams` was not called): end the stream cleanly below rather
                # than crash every open stream into the log.
                connection.end_reason = connection.end_reason or "shutdown"
        except Exception as exc:
            log.error("sse writer failed", scope=connection.scope, error=repr(exc))
        finally:
            connection.interrupt = None
            watcher.cancel()
            await connection.close()
            self._bridge.connections.discard(connection)
        if connection.end_reason == "gone":
            return  # nothing to finish: the client is not there
        if connection.end_reason == "too_slow":
            log.info("sse client too slow: disconnected", scope=connection.scope)
        # End the response; a client that reads nothing gets its connection closed instead.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch(receive: Receive, connection: Connection) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    connection.abort("gone")


# ---------------------------------------------------------------------------- the bridge


@dataclass
class Bridge:
    """What every SSE connection of one gateway process shares."""

    events: EventStore
    live: EventStore
    codec: CursorCodec
    states: StreamStates
    options: SseOptions = field(default_factory=SseOptions)
    hubs: dict[str, Hub] = field(default_factory=dict)
    connections: set[Connection] = field(default_factory=set)
    """The streams being written."""

    def hub(self, store: EventStore) -> Hub:
        """The hub of `store`'s stream (made on first use; started by its first subscriber)."""
        hub = self.hubs.get(store.stream)
        if hub is None:
            prefix = LIVE_PREFIX if store is self.live else EVENTS_PREFIX
            hub = self.hubs[store.stream] = Hub(store, prefix, self.states)
        return hub

    @classmethod
    async def start(
        cls, nc: NATS, events: EventStore, settings: Settings, *, live_stream: str = LIVE_STREAM
    ) -> Bridge:
        codec = CursorCodec(await shared_secret(nc, CURSOR_SECRET))
        live = EventStore(nc, events.registry, stream=live_stream, timeout=settings.store_timeout)
        states = StreamStates(live)
        return cls(events, live, codec, states, SseOptions.of(settings))

    def end_streams(self) -> None:
        """End every open stream cleanly (a gateway about to stop: its clients reconnect to
        another replica at once, and the server need not cancel them after its graceful
        timeout)."""
        for connection in list(self.connections):
            connection.abort("shutdown")

    async def close(self) -> None:
        """Stop the hubs (at shutdown)."""
        for hub in self.hubs.values():
            await hub.stop()

    async def open(self, feed: Feed, last_event_id: str | None) -> EventStreamResponse:
        """The response streaming `feed` after `last_event_id` (None: from the start).
        Raises `BadStreamCursor` (400) for a cursor not signed for this feed's scope, and the
        feed's `missing` error (404) when there is nothing to stream."""
        cursor = self.codec.decode(feed.scope, last_event_id) if last_event_id else None
        connection = Connection(self, feed, cursor)
        await connection.prepare()
        return EventStreamResponse(self, connection)


def end_streams(app: Any) -> None:
    """End the open SSE streams of `app` (a gateway about to stop), if it has any."""
    bridge: Bridge | None = getattr(app.state, "sse_bridge", None)
    if bridge is not None:
        bridge.end_streams()
