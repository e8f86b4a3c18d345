"""The event store: the only way anything appends events to, or reads them from, JetStream.

Positions are EVENTS stream sequence numbers. An aggregate's last position is the sequence of
its newest event (0: none yet). Appends carry:

- `Nats-Msg-Id` = the event id, so a retried append is recognised as a duplicate;
- `Nats-Expected-Last-Subject-Sequence` (+ `...-Subject` = the aggregate's wildcard) when the
  caller states an expectation, so concurrent writers of one aggregate serialise;
- JetStream atomic batch headers when one decision yields several events: all or nothing.

nats-server checks the expectation *before* the de-duplication window, so a retry of an append
that had landed comes back as "wrong last sequence". The store then looks the event ids up in
the aggregate: if they are all there, the append is reported as a duplicate with the original
positions (this works beyond the 2-minute duplicate window too).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from agentbus.audit.sealing import SEALED_MARK, SubjectKey, seal_data
from agentbus.errors import (
    ConcurrencyConflict,
    InvalidEvent,
    StoreUnavailable,
    StreamNotFound,
    SubjectKeyUnavailable,
)
from agentbus.events.envelope import CloudEvent, EventContext, utcnow, uuid7
from agentbus.events.privacy import Personal
from agentbus.events.registry import DomainEvent, EventRegistry
from agentbus.events.subjects import EVENTS_PREFIX, AggregateRef
from agentbus.store.ordered import Delivery, OrderedReader, tap
from agentbus.values import value

if TYPE_CHECKING:
    from agentbus.audit.erasure import Sealer

EVENTS_STREAM: Final = "EVENTS"
MAX_BATCH: Final = 1000  # JetStream's limit for one atomic batch
MAX_ID_LENGTH: Final = 128
_READ_AHEAD: Final = 1024  # deliveries a reader holds before it holds back flow control
_CLOSED_CHECK: Final = 1.0  # seconds between a waiting reader's looks at the connection
_INACTIVE_THRESHOLD: Final = 1.0  # seconds a stopped reader's consumer outlives it
_HEARTBEAT: Final = 2.0  # seconds between a reader's consumer's heartbeats when idle
_SWEEP: Final = 0.1
"""Seconds between the sweeps that fail requests past their deadline: a request waits at most
its timeout plus this."""

_WRONG_LAST_SEQUENCE = 10071
_BATCH_DUPLICATE_ID = 10201
_LAST_SEQ = re.compile(r"wrong last sequence: (\d+)")
_NO_RESPONDERS = "503"
_TRANSPORT_ERRORS = (NatsTimeout, asyncio.TimeoutError, NoRespondersError, ConnectionClosedError)
_STREAM_NOT_FOUND: Final = 10059
"""JetStream's error code for "stream not found"."""


@value
class Expect:
    """What the caller believes the aggregate's last position is. `Expect.ANY` checks nothing."""

    position: int | None

    @classmethod
    def at(cls, position: int) -> Expect:
        if position < 0:
            raise ValueError(f"expected position must be >= 0, got {position}")
        return cls(position)


ANY: Final = Expect(None)
"""No expectation: append whatever the aggregate holds."""
NO_EVENTS: Final = Expect(0)
"""The aggregate must have no events yet (it is being created)."""


@value
class AppendResult:
    """Where the appended events are. `duplicate`: they had been appended before (a retry)."""

    positions: tuple[int, ...]
    event_ids: tuple[str, ...]
    duplicate: bool = False

    @property
    def last_position(self) -> int:
        return self.positions[-1]


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: its position, subject, envelope and decoded (upcast) payload."""

    position: int
    subject: str
    envelope: CloudEvent
    event: DomainEvent

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def time(self) -> datetime:
        return self.envelope.time

    @property
    def ref(self) -> AggregateRef:
        return AggregateRef.from_subject(self.subject)


@dataclass(frozen=True, slots=True)
class RawEvent:
    """An event as read, not yet decoded: what projections consume, so that one undecodable
    payload becomes a dead letter instead of stopping the reader."""

    position: int
    subject: str
    data: bytes
    time: datetime | None
    """When JetStream stored it (None when unknown)."""
    pending: int
    """Matching events after this one when it was delivered (0: caught up)."""

    def event_type(self) -> str:
        """The CloudEvents type, if the payload is readable enough to tell."""
        try:
            value = orjson.loads(self.data).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            return "unreadable"
        return value if isinstance(value, str) else "unreadable"


@dataclass(frozen=True, slots=True)
class AggregateHistory:
    """Everything one aggregate has recorded, oldest first; `last_position` 0 when empty."""

    events: tuple[RecordedEvent, ...]
    last_position: int


class EventStore:
    """Appends to and reads from the EVENTS stream. Every wait is bounded by `timeout`."""

    def __init__(
        self,
        nc: NATS,
        registry: EventRegistry,
        *,
        stream: str = EVENTS_STREAM,
        timeout: float = 5.0,
        sealer: Sealer | None = None,
    ) -> None:
        self._nc = nc
        self._registry = registry
        self._stream = stream
        self._timeout = timeout
        self._replies = _Replies(nc)
        self._sealer = sealer
        """Seals personal fields at append and opens them at every read (docs/erasure.md);
        None: events are written and read as they are."""

    @property
    def registry(self) -> EventRegistry:
        return self._registry

    @property
    def sealer(self) -> Sealer | None:
        return self._sealer

    @property
    def stream(self) -> str:
        """The JetStream stream this store reads and appends to."""
        return self._stream

    def on_stream(self, stream: str, *, timeout: float | None = None) -> EventStore:
        """A store of another stream on the same connection, with the same registry and
        timeout (unless given), and no sealer (e.g. LIVE, whose messages are not events)."""
        return EventStore(self._nc, self._registry, stream=stream, timeout=timeout or self._timeout)

    # ------------------------------------------------------------------ append

    async def append(
        self,
        ref: AggregateRef,
        events: Sequence[DomainEvent],
        *,
        expect: Expect = ANY,
        context: EventContext = EventContext.DEFAULT,
        event_ids: Sequence[str] | None = None,
    ) -> AppendResult:
        """Append `events` to aggregate `ref`, all or nothing.

        `event_ids` (default: fresh UUIDv7s) are the idempotency keys: append the same events
        with the same ids again and the result says `duplicate=True` with the original
        positions. Raises `ConcurrencyConflict` when `expect` does not hold, `InvalidEvent`
        for malformed input (nothing is published), `StoreUnavailable` when JetStream does not
        answer within the timeout (outcome unknown: retry with the same ids).
        """
        ids = _checked_ids(ref, events, event_ids)
        seals = None
        if self._sealer is not None:
            try:
                seals = self._sealer.cached_seals(ref, events)
            except KeyError:  # a key to load (or create) first
                seals = await self._sealer.seals_for(ref, events)
        headers = {"Nats-Msg-Id": ids[0]}
        if expect.position is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expect.position)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = ref.filter
        try:
            if len(events) == 1:
                event = events[0]
                reply = await self._replies.request(
                    ref.subject(event.kind.name),
                    encode_event(ref, event, ids[0], context, seals[0] if seals else None),
                    headers,
                    self._timeout,
                )
            else:
                messages = [
                    (
                        ref.subject(event.kind.name),
                        encode_event(ref, event, event_id, context, seals[i] if seals else None),
                    )
                    for i, (event, event_id) in enumerate(zip(events, ids, strict=True))
                ]
                reply = await self._publish_batch(messages, ids, headers)
        except MaxPayloadError as exc:
            raise InvalidEvent(f"event too large for {ref.path}: {exc}") from exc
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable(
                f"JetStream did not acknowledge the append to {ref.path} within "
                f"{self._timeout:g}s ({type(exc).__name__}); retry with the same event ids"
            ) from exc
        ack = orjson.loads(reply)
        if "error" not in ack and "count" not in ack:
            # The common case, one event stored: no second coroutine, no range to build.
            return AppendResult(
                (int(ack["seq"]),), tuple(ids), duplicate=bool(ack.get("duplicate", False))
            )
        return await self._settle(ref, ids, expect, ack)

    async def _publish_batch(
        self, messages: list[tuple[str, bytes]], ids: list[str], first_headers: dict[str, str]
    ) -> bytes:
        batch_id = uuid.uuid4().hex
        last = len(messages)
        for index, ((subject, payload), event_id) in enumerate(
            zip(messages[:-1], ids[:-1], strict=True), start=1
        ):
            headers = first_headers if index == 1 else {"Nats-Msg-Id": event_id}
            await self._nc.publish(
                subject,
                payload,
                headers={**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(index)},
            )
        subject, payload = messages[-1]
        return await self._replies.request(
            subject,
            payload,
            {
                "Nats-Msg-Id": ids[-1],
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": str(last),
                "Nats-Batch-Commit": "1",
            },
            self._timeout,
        )

    async def _settle(
        self, ref: AggregateRef, ids: list[str], expect: Expect, ack: Mapping[str, Any]
    ) -> AppendResult:
        error = ack.get("error")
        if error is None:
            last = int(ack["seq"])
            count = int(ack.get("count", 1))
            return AppendResult(
                positions=tuple(range(last - count + 1, last + 1)),
                event_ids=tuple(ids),
                duplicate=bool(ack.get("duplicate", False)),
            )
        code = error.get("err_code")
        description = str(error.get("description", error))
        if code in (_WRONG_LAST_SEQUENCE, _BATCH_DUPLICATE_ID):
            after = expect.position or 0
            found = await self._positions_of(ref, ids, after=after)
            if len(found) == len(ids):
                return AppendResult(
                    positions=tuple(found[i] for i in ids), event_ids=tuple(ids), duplicate=True
                )
            if found:
                raise InvalidEvent(
                    f"event ids {sorted(found)} are already used by other events of {ref.path}"
                )
            if code == _BATCH_DUPLICATE_ID:
                raise InvalidEvent(
                    f"event ids of this append were already used elsewhere in the stream: "
                    f"{description}"
                )
            match = _LAST_SEQ.search(description)
            raise ConcurrencyConflict(ref.filter, expect.position, int(match[1]) if match else None)
        if error.get("code") == 503:
            raise StoreUnavailable(f"JetStream refused the append to {ref.path}: {description}")
        raise InvalidEvent(f"JetStream refused the append to {ref.path}: {description}")

    async def _positions_of(
        self, ref: AggregateRef, ids: list[str], *, after: int
    ) -> dict[str, int]:
        wanted = set(ids)
        found: dict[str, int] = {}
        async for msg in self._direct_get(ref.filter, after + 1):
            msg_id = (msg.headers or {}).get("Nats-Msg-Id")
            if msg_id in wanted:
                found[msg_id] = int((msg.headers or {})["Nats-Sequence"])
        return found

    # ------------------------------------------------------------------ read

    async def load(self, ref: AggregateRef, *, after: int = 0) -> AggregateHistory:
        """Every event of one aggregate, oldest first, with its last position.

        `after`: only the events after this position (an incremental load on top of a state
        the caller already folded up to it). When none follow, `last_position` is `after`:
        pass a position the aggregate has reached, not an arbitrary one.
        """
        if after < 0:
            raise ValueError(f"positions start at 1, got after={after}")
        events = []
        async for msg in self._direct_get(ref.filter, after + 1):
            await self._load_keys(msg.data)
            headers = msg.headers or {}
            events.append(
                self._decode(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data)
            )
        return AggregateHistory(tuple(events), events[-1].position if events else after)

    async def last_positions(self, subject_filters: Sequence[str]) -> dict[str, int]:
        """The position of the newest event on each subject matching `subject_filters`
        (wildcards allowed), by subject; empty when none matches. One multi-last direct get
        (server 2.11+); at most 1000 subjects may match."""
        if not subject_filters:
            raise ValueError("last_positions needs at least one subject filter")
        found: dict[str, int] = {}
        request = {"multi_last": list(subject_filters), "batch": MAX_BATCH}
        async for msg in self._direct_batch(request, f"last events on {subject_filters}"):
            headers = msg.headers or {}
            if "Status" in headers:  # the end of the batch
                if int(headers.get("Nats-Num-Pending", "0")):
                    raise ValueError(f"more than {MAX_BATCH} subjects match {subject_filters}")
                break
            found[headers["Nats-Subject"]] = int(headers["Nats-Sequence"])
        return found

    async def get(self, position: int) -> RecordedEvent | None:
        """The event at `position`, or None if there is none (never written, or beyond)."""
        if position < 1:
            raise ValueError(f"positions start at 1, got {position}")
        reply = await self._direct_get_one({"seq": position}, f"position {position}")
        if reply is None:
            return None
        headers = reply.headers or {}
        await self._load_keys(reply.data)
        return self._decode(int(headers["Nats-Sequence"]), headers["Nats-Subject"], reply.data)

    async def position_at(self, time: datetime) -> int | None:
        """The position of the first event JetStream stored at or after `time` (aware), or
        None when there is none yet. One direct get by start time: stored times follow
        positions, so this turns a time into a position (replays from a time)."""
        stamp = time.astimezone(UTC).isoformat().replace("+00:00", "Z")
        reply = await self._direct_get_one({"start_time": stamp}, f"time {stamp}")
        return None if reply is None else int((reply.headers or {})["Nats-Sequence"])

    async def _direct_get_one(self, request: dict[str, Any], what: str) -> Msg | None:
        """One message by direct get (`request`: its `seq` or `start_time`); None: no such
        message."""
        try:
            reply = await self._nc.request(
                f"$JS.API.DIRECT.GET.{self._stream}", orjson.dumps(request), timeout=self._timeout
            )
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable(f"direct get of {what} timed out") from exc
        headers = reply.headers or {}
        if "Status" in headers:
            if headers["Status"] == "404":
                return None
            raise StoreUnavailable(f"direct get of {what} failed: {headers}")
        return reply

    async def last_position(self) -> int:
        """The stream's last position (0 when empty)."""
        return int((await self.stream_info())["state"]["last_seq"])

    async def stream_info(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """The stream as JetStream describes it (`$JS.API.STREAM.INFO`, decoded: its `config`,
        `state`...; `request`, e.g. a `subjects_filter`, asks for more). Raises
        `StreamNotFound` when there is no such stream, `StoreUnavailable` when JetStream does
        not answer within the timeout or answers with another error."""
        return await self._api("STREAM.INFO", request, "stream info")

    async def subjects(self, subject_filter: str) -> dict[str, int]:
        """The stream's subjects matching `subject_filter` that hold messages, with how many
        each (every page of JetStream's answer)."""
        found: dict[str, int] = {}
        while True:
            request = {"subjects_filter": subject_filter, "offset": len(found)}
            info = await self.stream_info(request)
            page: dict[str, int] = info["state"].get("subjects") or {}
            found.update(page)
            if not page or len(found) >= int(info.get("total", 0)):
                return found

    async def purge(self, subject_filter: str) -> int:
        """Remove every message of the stream on `subject_filter`; how many were removed."""
        reply = await self._api("STREAM.PURGE", {"filter": subject_filter}, "purge")
        return int(reply.get("purged", 0))

    async def last_on(self, subject: str) -> bytes | None:
        """The payload of the stream's last message on `subject` (None: there is none)."""
        reply = await self._direct_get_one({"last_by_subj": subject}, subject)
        return None if reply is None else reply.data

    async def _api(self, call: str, request: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """One request to the JetStream API about this stream, its answer decoded."""
        body = b"" if request is None else orjson.dumps(request)
        try:
            reply = await self._nc.request(
                f"$JS.API.{call}.{self._stream}", body, timeout=self._timeout
            )
        except (TimeoutError, nats.errors.Error) as exc:  # any failure to get an answer
            raise StoreUnavailable(
                f"{what} of {self._stream} got no answer ({type(exc).__name__})"
            ) from exc
        answer: dict[str, Any] = orjson.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            message = f"{what} of stream {self._stream}: {error.get('description')}"
            if error.get("err_code") == _STREAM_NOT_FOUND:
                raise StreamNotFound(message)
            raise StoreUnavailable(message)
        return answer

    async def read(
        self,
        *,
        from_position: int = 1,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        to_position: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event at `from_position` or later on `subjects`, in order, gap-free, decoded.

        Without `follow`, stops at `to_position` (default: the stream's last position when the
        read starts). With `follow`, keeps waiting for new events until cancelled. An event
        that cannot be decoded raises `InvalidEvent` (use `read_raw` to handle it yourself).
        """
        async for raw in self.read_raw(
            from_position=from_position, subjects=subjects, to_position=to_position, follow=follow
        ):
            try:
                recorded = self.decode(raw)
            except SubjectKeyUnavailable:  # its key left the key cache since the read loaded it
                await self.prepare(raw)
                recorded = self.decode(raw)
            yield recorded

    async def read_raw(
        self,
        *,
        from_position: int = 1,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        to_position: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[RawEvent]:
        """Like `read`, without decoding (an ordered consumer: ephemeral, no acks, re-created
        by the client on a gap)."""
        async for chunk in self.read_raw_chunks(
            from_position=from_position, subjects=subjects, to_position=to_position, follow=follow
        ):
            for raw in chunk:
                yield raw

    async def read_raw_chunks(
        self,
        *,
        from_position: int = 1,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        to_position: int | None = None,
        follow: bool = False,
        chunk: int = _READ_AHEAD,
    ) -> AsyncIterator[list[RawEvent]]:
        """`read_raw`, handing over what has arrived so far as one list (at most `chunk`
        events, never empty): for readers that process many events at a time (the projection
        runtime, the notary), one hand-over per list instead of one per event."""
        if from_position < 1:
            raise ValueError(f"positions start at 1, got {from_position}")
        if not subjects:
            raise ValueError("read needs at least one subject filter")
        until = to_position
        if not follow and until is None:
            until = await self.last_position()
        if until is not None and until < from_position:
            return
        reader = OrderedReader(
            self._nc,
            self._stream,
            subjects,
            from_position,
            limit=_READ_AHEAD,
            heartbeat=_HEARTBEAT,
            # Gone a second after its reader stops (server default: 5 s); while reading it is
            # never inactive. An SSE client that leaves frees it at once.
            inactive=_INACTIVE_THRESHOLD,
            timeout=self._timeout,
        )
        try:
            pending = await reader.start()
        except nats.js.errors.NotFoundError as exc:
            await reader.close()
            raise StreamNotFound(f"stream {self._stream} not found") from exc
        except (*_TRANSPORT_ERRORS, nats.errors.Error) as exc:
            await reader.close()
            raise StoreUnavailable(f"cannot start a reader on {self._stream}") from exc
        sealer = self._sealer
        try:
            if not follow and not pending:
                return  # no event matches at all
            while True:
                deliveries = await self._wait_for_deliveries(reader, follow, chunk)
                events: list[RawEvent] = []
                for position, subject, data, stamp, left in deliveries:
                    if until is not None and position > until:
                        # Filtered: the event at `until` may not match, the next one does.
                        if events:
                            yield events
                        return
                    if sealer is not None and SEALED_MARK in data and not sealer.ready(data):
                        await sealer.prepare(data)  # so that `decode` has the keys
                    events.append(
                        RawEvent(
                            position,
                            subject.decode(),
                            data,
                            datetime.fromtimestamp(stamp / 1e9, UTC),
                            left,
                        )
                    )
                    if (until is not None and position >= until) or (not follow and not left):
                        yield events
                        return
                yield events
        finally:
            await reader.close()

    async def read_page(
        self, *, after: int, subject: str, limit: int = 256, max_bytes: int = 256 * 1024
    ) -> list[RawEvent]:
        """At most `limit` events (about `max_bytes` at most) on `subject` (one filter,
        wildcards allowed) after position `after`, oldest first, by one batched direct get.

        A pull: unlike an ordered consumer, which pushes everything it can, a reader takes
        only what it has room for (the SSE bridge catches clients up this way). Each event's
        `pending` counts the matching events after it: 0 on the last one means the page
        reached the end of the stream."""
        if after < 0:
            raise ValueError(f"positions start at 1, got after={after}")
        page: list[RawEvent] = []
        request = {
            "seq": after + 1,
            "next_by_subj": subject,
            "batch": limit,
            "max_bytes": max_bytes,
        }
        async for msg in self._direct_batch(request, subject):
            headers = msg.headers or {}
            if "Status" in headers:  # the end of the batch
                break
            stamp = headers.get("Nats-Time-Stamp")
            await self._load_keys(msg.data)
            page.append(
                RawEvent(
                    int(headers["Nats-Sequence"]),
                    headers["Nats-Subject"],
                    msg.data,
                    datetime.fromisoformat(stamp) if stamp else None,
                    int(headers.get("Nats-Num-Pending", "0")),
                )
            )
        return page

    async def _wait_for_deliveries(
        self, reader: OrderedReader, follow: bool, most: int
    ) -> list[Delivery]:
        """Up to `most` deliveries, waiting for the first. Raises `ConnectionClosedError` if
        the connection is closed, or (unless following) `StoreUnavailable` after the
        timeout."""
        deliveries = reader.take(most)
        if deliveries:
            return deliveries
        waited = 0.0
        task = asyncio.current_task()
        while True:
            if self._nc.is_closed:
                raise ConnectionClosedError
            if task is not None and task.cancelling():
                # A cancellation that something swallowed: Python 3.11's `asyncio.wait_for`
                # (inside nats-py's requests) returns a result that arrived together with the
                # cancellation and drops the cancellation. A following reader would then wait
                # here forever.
                raise asyncio.CancelledError
            step = _CLOSED_CHECK if follow else min(_CLOSED_CHECK, self._timeout - waited)
            if await reader.wait(step):
                deliveries = reader.take(most)
                if deliveries:
                    return deliveries
                continue
            waited += step
            if not follow and waited >= self._timeout:
                why = f" ({reader.problem})" if reader.problem else ""
                raise StoreUnavailable(
                    f"reading {self._stream} stalled for {self._timeout:g}s{why}"
                )

    async def _load_keys(self, data: bytes) -> None:
        """Load the subject keys a sealed payload needs, before it is decoded (nothing to do
        for a payload without sealed fields, or without a sealer)."""
        if self._sealer is not None and SEALED_MARK in data and not self._sealer.ready(data):
            await self._sealer.prepare(data)

    def decode(self, raw: RawEvent) -> RecordedEvent:
        """Decode (and upcast) a raw event; `InvalidEvent` / `UnknownEventType` if it can't be.

        Sealed personal fields are opened (`[erased]` when their key was destroyed). Raw events
        from this store's reads have their keys loaded already; for one received elsewhere (a
        consumer of its own), an unloaded key raises `SubjectKeyUnavailable` (retryable; the
        key is being loaded) unless `await prepare(raw)` came first."""
        return self._decode(raw.position, raw.subject, raw.data)

    async def prepare(self, raw: RawEvent) -> None:
        """Load the keys `decode(raw)` will need (nothing to do without sealed fields)."""
        await self._load_keys(raw.data)

    async def open_sealed(self, envelope: dict[str, Any], payload: bytes) -> bool:
        """Open the sealed personal fields of a CloudEvent parsed as plain JSON from `payload`,
        in place (for code that forwards raw events, as the SSE bridge does). True when it
        changed."""
        sealer = self._sealer
        if sealer is None or envelope.get("type") not in sealer.personal:
            return False
        event = CloudEvent.model_validate(envelope)
        try:
            sealer.open_envelope(event)
        except SubjectKeyUnavailable:  # not loaded, or its key left the key cache since
            await sealer.prepare(payload)
            sealer.open_envelope(event)
        envelope["data"] = event.data
        return True

    async def _direct_get(self, subject_filter: str, from_position: int) -> AsyncIterator[Msg]:
        """Every message on `subject_filter` from a position: batched direct gets of 1000 (no
        consumer to create or clean up)."""
        position = from_position
        while True:
            pending = 0
            request = {"seq": position, "next_by_subj": subject_filter, "batch": 1000}
            async for msg in self._direct_batch(request, subject_filter):
                headers = msg.headers or {}
                if "Status" in headers:  # the end of this batch
                    break
                pending = int(headers.get("Nats-Num-Pending", "0"))
                position = int(headers["Nats-Sequence"]) + 1
                yield msg
            if pending == 0:
                return

    async def _direct_batch(self, request: dict[str, Any], what: str) -> AsyncIterator[Msg]:
        """One batched direct get (server 2.11+): its messages, then the end-of-batch marker
        (`Status: 204`, carrying `Nats-Num-Pending`) when the server sends one; nothing when
        no message matches. The replies come over the store's one reply subscription (no
        inbox subscribed per request); every wait is bounded by the store's timeout."""
        inbox, replies = await self._replies.stream()
        try:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{self._stream}", orjson.dumps(request), reply=inbox
            )
            while True:
                try:
                    async with asyncio.timeout(self._timeout):
                        msg = await replies.get()
                except TimeoutError as exc:
                    raise StoreUnavailable(
                        f"reading {what} did not answer within {self._timeout:g}s"
                    ) from exc
                status = (msg.headers or {}).get("Status")
                if status == "404":
                    return
                if status not in (None, "204"):
                    raise StoreUnavailable(
                        f"direct get on {what} failed: {status} "
                        f"{(msg.headers or {}).get('Description', '')}"
                    )
                yield msg
                if status == "204":
                    return
        except ConnectionClosedError as exc:
            raise StoreUnavailable(f"NATS connection closed while reading {what}") from exc
        finally:
            self._replies.forget(inbox)

    def _decode(self, position: int, subject: str, payload: bytes) -> RecordedEvent:
        try:
            envelope = CloudEvent.model_validate_json(payload)
        except ValidationError as exc:
            raise InvalidEvent(
                f"position {position} ({subject}) is not a CloudEvent: {exc}"
            ) from exc
        if self._sealer is not None and envelope.type in self._sealer.personal:
            self._sealer.open_envelope(envelope)
        return RecordedEvent(
            position=position,
            subject=subject,
            envelope=envelope,
            event=self._registry.decode(envelope.type, envelope.data),
        )


class _Replies:
    """Request/reply (appends) and request/stream (batched direct gets) over one wildcard reply
    subscription of this store.

    The same protocol as `nc.request` (publish with a reply subject, wait for the reply, give
    up after the timeout), minus its per-call costs: a NUID plus random token, bytes/str
    conversions, a done-callback and `asyncio.wait_for`. Those were 10-20 µs of CPU per append
    with hundreds in flight (docs/benchmarks.md). A PubAck (a reply without headers) is taken
    straight from nats-py's parser through the connection's `tap` (store/ordered.py): no `Msg`,
    no queue, no callback task. A status reply (no responders) and the replies of a stream
    (headers to read) go through nats-py's subscription as usual; nats-py re-subscribes after a
    reconnect, with the same subscription id, as it does for its own reply subscription.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future[bytes], float]] = {}
        """Inbox -> the request's future and its deadline (the loop's clock)."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._streams: dict[str, asyncio.Queue[Msg]] = {}
        self._subscribed = False
        self._subscribing = asyncio.Lock()

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        """The reply's payload to `payload` published on `subject`. Raises what `nc.request`
        raises: `NoRespondersError`, a timeout, `ConnectionClosedError`, `MaxPayloadError`..."""
        if not self._subscribed:
            await self._subscribe()
        inbox = f"{self._prefix}{next(self._tokens)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        # No timer per request (`asyncio.timeout` cost 5.8 µs, a timer of its own 2.6): one
        # sweep every `_SWEEP` seconds fails the requests past their deadline.
        self._waiting[inbox] = (future, loop.time() + timeout)
        if self._sweeper is None:
            self._sweeper = loop.call_later(_SWEEP, self._sweep, loop)
        try:
            await self._nc.publish(subject, payload, reply=inbox, headers=headers)
            return await future
        finally:
            del self._waiting[inbox]

    async def stream(self) -> tuple[str, asyncio.Queue[Msg]]:
        """A reply subject whose messages arrive in the returned queue, until `forget`."""
        if not self._subscribed:
            await self._subscribe()
        inbox = f"{self._prefix}{next(self._tokens)}"
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._streams[inbox] = queue
        return inbox, queue

    def forget(self, inbox: str) -> None:
        self._streams.pop(inbox, None)

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if not self._subscribed:
                subscription = await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)
                tap(self._nc).takes[subscription._id] = self._take
                self._subscribed = True

    def _take(self, subject: bytes, data: bytes, headers: bytes | None) -> bool:
        """A reply from the parser: a PubAck for a waiting request is taken here."""
        if headers is not None:
            return False
        waiting = self._waiting.get(subject.decode())
        if waiting is None:
            return False
        future = waiting[0]
        if not future.done():
            future.set_result(data)
        return True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests past their deadline; again in `_SWEEP` seconds while any wait."""
        now = loop.time()
        for future, deadline in self._waiting.values():
            if deadline <= now and not future.done():
                future.set_exception(TimeoutError("no reply within the timeout"))
        self._sweeper = loop.call_later(_SWEEP, self._sweep, loop) if self._waiting else None

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.get(msg.subject)
        if waiting is not None:
            future = waiting[0]
            if not future.done():
                if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
                    future.set_exception(NoRespondersError())
                else:
                    future.set_result(msg.data)
            return
        queue = self._streams.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)


def encode_event(
    ref: AggregateRef,
    event: DomainEvent,
    event_id: str,
    context: EventContext,
    seal: tuple[Personal, SubjectKey] | None = None,
) -> bytes:
    """The structured-mode CloudEvent JSON of `event` (pure; orjson for speed), its personal
    fields sealed with `seal`'s key when given."""
    # = model_dump(mode="json") without its keyword plumbing: ~0.5 µs less per event.
    data = event.__pydantic_serializer__.to_python(event, mode="json")
    if seal is not None:
        seal_data(seal[0], seal[1], event_id, data)
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": context.source,
        "type": event.kind.type,
        "subject": ref.path,
        "time": utcnow(),
        "datacontenttype": "application/json",
        "data": data,
        "workspace": ref.workspace,
    }
    if context.traceparent is not None:
        envelope["traceparent"] = context.traceparent
    if context.causationid is not None:
        envelope["causationid"] = context.causationid
    if context.correlationid is not None:
        envelope["correlationid"] = context.correlationid
    if context.actor is not None:
        envelope["actor"] = context.actor
    return orjson.dumps(envelope)


def _checked_ids(
    ref: AggregateRef, events: Sequence[DomainEvent], event_ids: Sequence[str] | None
) -> list[str]:
    """Validate an append's events and ids (pure); returns the ids to use."""
    if len(events) == 1 and event_ids is not None and len(event_ids) == 1:
        # One event with its id, the common case (every post): the checks below, without
        # their loops and set.
        (event,), (event_id,) = events, event_ids
        if (
            isinstance(event, DomainEvent)
            and event.kind.aggregate == ref.kind
            and 0 < len(event_id) <= MAX_ID_LENGTH
            and event_id.isprintable()
            and " " not in event_id
        ):
            return [event_id]
    if not events:
        raise InvalidEvent("append needs at least one event")
    if len(events) > MAX_BATCH:
        raise InvalidEvent(f"{len(events)} events in one append; at most {MAX_BATCH}")
    for event in events:
        if not isinstance(event, DomainEvent):
            raise InvalidEvent(f"{type(event).__name__} is not a DomainEvent")
        if event.kind.aggregate != ref.kind:
            raise InvalidEvent(f"{event.kind.type} cannot be appended to a {ref.kind}")
    if event_ids is None:
        return [uuid7() for _ in events]
    ids = list(event_ids)
    if len(ids) != len(events):
        raise InvalidEvent(f"{len(ids)} event ids for {len(events)} events")
    for event_id in ids:
        if (
            not event_id
            or len(event_id) > MAX_ID_LENGTH
            or not event_id.isprintable()
            or (" " in event_id)
        ):
            raise InvalidEvent(
                f"event id {event_id!r} must be 1-{MAX_ID_LENGTH} printable characters "
                "without spaces"
            )
    if len(set(ids)) != len(ids):
        raise InvalidEvent("event ids within one append must be distinct")
    return ids
