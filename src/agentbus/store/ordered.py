"""Reading a stream in order: an ephemeral push consumer from a position on, re-created from
the next position whenever a delivery goes missing, with each delivery handed over as the
bytes nats-py's protocol parser has already cut.

Why not nats-py's own ordered consumer: it turns every delivery into a `Msg` (its headers
parsed into a dict, its reply subject parsed twice) and passes it through the subscription's
queue to a task that calls back: ~18 µs of CPU per event on this project's machines, where
taking the same deliveries from the parser costs ~4.5 (docs/benchmarks.md, scenario
`projection`). Every reader of the store goes through here: projections, the notary, the SSE
bridge, replay and verify.

The protocol is the ordered consumer's, as nats-py and the other clients implement it:

- the consumer is ephemeral, in memory, with one replica, no acks, flow control and idle
  heartbeats, and it goes away on its own `inactive` seconds after its reader stops;
- each delivery's reply subject carries its stream and consumer sequences; a consumer
  sequence out of step (a delivery lost), a heartbeat reporting deliveries this reader never
  saw, or two heartbeat intervals of silence (the consumer or the connection went away)
  re-create the consumer from the position after the last delivery taken in;
- a flow-control request is answered while the reader's buffer has room, else once the
  caller has taken enough: while it waits, the server sends nothing more, so memory stays
  bounded by the buffer plus the server's flow-control window.

The one thing outside nats-py's public API: deliveries are taken from `Client._process_msg`
(where the parser hands each message over, with its subscription id: `Subscription._id`) for
this reader's subscriptions only; every other message goes on to nats-py as before. The
hook's signature is checked once per connection, so a nats-py release that changed it fails
loudly instead of reading nothing. The same hook (`tap`) hands the store its PubAcks
(`EventStore`'s `_Replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata

import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = structlog.get_logger("agentbus.store")

Delivery = tuple[int, bytes, bytes, int, int]
"""One event as delivered: stream position, subject, payload, the time JetStream stored it
(ns since the epoch) and how many matching events followed it when it was sent."""

_STATUS = b"NATS/1.0 "
"""How a status message's headers begin (a heartbeat, a flow-control request). A delivery's
headers, when it has any, begin `NATS/1.0\\r\\n`."""
_CONTROL = b"100"
_LAST_CONSUMER = b"Nats-Last-Consumer"
_STALLED = b"Nats-Consumer-Stalled"
_MISSED_HEARTBEATS = 2
"""Heartbeat intervals without a delivery or a heartbeat before the consumer is re-created."""

_Process = Callable[..., Awaitable[None]]
"""`Client._process_msg(sid, subject, reply, data, headers)`."""


Take = Callable[[bytes, bytes, bytes | None], bool]
"""Takes one message of a subscription (subject, payload, raw headers) straight from the
parser; False hands it on to nats-py as usual."""


class Tap:
    """Sits in front of one connection's `Client._process_msg` and hands the deliveries of
    registered subscriptions to their readers, and the messages of registered reply
    subscriptions to whoever `takes` them."""

    def __init__(self, nc: NATS, original: _Process) -> None:
        self._nc = nc
        self._original = original
        self.readers: dict[int, OrderedReader] = {}
        self.takes: dict[int, Take] = {}

    async def process(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        reader = self.readers.get(sid)
        if reader is not None:
            answer = reader.receive(subject, reply, data, headers)
            if answer is not None:
                await reader.answer(answer)
            return
        take = self.takes.get(sid)
        if take is None or not take(subject, data, headers):
            await self._original(sid, subject, reply, data, headers)


_TAPS: weakref.WeakKeyDictionary[NATS, Tap] = weakref.WeakKeyDictionary()
_HOOK_PARAMETERS = ["sid", "subject", "reply", "data", "headers"]


def tap(nc: NATS) -> Tap:
    """The connection's tap, put in front of its `_process_msg` on first use."""
    existing = _TAPS.get(nc)
    if existing is not None:
        return existing
    original: _Process = nc._process_msg
    parameters = list(inspect.signature(original).parameters)
    if parameters != _HOOK_PARAMETERS:
        raise RuntimeError(
            f"nats-py {metadata.version('nats-py')} changed Client._process_msg"
            f"{tuple(parameters)} (expected {tuple(_HOOK_PARAMETERS)}): agentbus's "
            "ordered reader and PubAck replies (agentbus/store/ordered.py) must be updated "
            "for it"
        )
    created = Tap(nc, original)
    setattr(nc, "_process_msg", created.process)  # noqa: B010  # an instance attribute
    _TAPS[nc] = created
    return created


class OrderedReader:
    """The events of `stream` on `subjects` from position `start` on, in order, gap-free.

    `await start()` creates the consumer (and returns how many matching events it has to
    deliver at that moment); `take` hands over what has arrived; `wait` waits for more;
    `close` ends the read. The caller bounds how long it waits: a reader whose server is
    gone keeps trying to re-create its consumer (`problem` says what failed last)."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        subjects: Sequence[str],
        start: int,
        *,
        limit: int,
        heartbeat: float,
        inactive: float,
        timeout: float,
    ) -> None:
        if start < 1:
            raise ValueError(f"positions start at 1, got {start}")
        if not subjects:
            raise ValueError("an ordered read needs at least one subject filter")
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._stream = stream
        self._subjects = list(subjects)
        self._next = start
        """The position to (re)start from: after the last delivery taken in."""
        self._limit = limit
        self._heartbeat = heartbeat
        self._inactive = inactive
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._tap = tap(nc)
        self._subscription: Subscription | None = None
        self._expected = 1
        """The consumer sequence of the next delivery."""
        self._withheld: str | None = None
        """A flow-control reply held back while the buffer is full."""
        self._answering: set[asyncio.Task[None]] = set()
        self._active = False
        self._trouble = asyncio.Event()
        self._reason = ""
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0
        """How many times the consumer was re-created (a gap, silence, a lost server)."""
        self.problem: str | None = None
        """Why the last attempt to re-create the consumer failed (None: it did not)."""

    async def start(self) -> int:
        """Create the consumer; the number of matching events it has to deliver."""
        pending = await self._begin()
        self._watchdog = asyncio.create_task(self._watch(), name="ordered reader watchdog")
        return pending

    async def close(self) -> None:
        self._closed = True
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            # Cancelled again every second until it ends: a cancellation can be swallowed on
            # its way (Python 3.11's `asyncio.wait_for`, inside nats-py's requests, when the
            # reply arrives with it); `_closed` stops the loop then.
            while not watchdog.done():
                watchdog.cancel()
                await asyncio.wait((watchdog,), timeout=1.0)
        await self._end()

    def take(self, most: int) -> list[Delivery]:
        """Up to `most` deliveries that have arrived, oldest first (none: nothing yet)."""
        buffer = self._buffer
        if len(buffer) <= most:
            taken = list(buffer)
            buffer.clear()
        else:
            taken = [buffer.popleft() for _ in range(most)]
        if self._withheld is not None and len(buffer) < self._limit:
            reply, self._withheld = self._withheld, None
            answering = asyncio.get_running_loop().create_task(self.answer(reply))
            self._answering.add(answering)  # held until done (the loop keeps weak references)
            answering.add_done_callback(self._answering.discard)
        return taken

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a delivery; False if none came."""
        return bool(self._buffer) or await wait_for_next(self._arrived, timeout)

    def receive(
        self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> str | None:
        """One message for this reader's subscription; a subject to answer on, if any."""
        if self._trouble.is_set():
            return None  # the rest of a consumer being re-created
        self._active = True
        if headers is not None and headers.startswith(_STATUS):
            return self._status(reply, headers)
        tokens = reply.split(b".")
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
            _, _, _, _, _, position, sequence, stamp, pending = tokens
        elif len(tokens) >= 11:  # with a domain and an account hash first
            position, sequence, stamp, pending = tokens[7:11]
        else:
            self._restart_soon(f"unexpected reply subject {reply!r}")
            return None
        if int(sequence) != self._expected:
            self._restart_soon(f"delivery {int(sequence)} arrived, {self._expected} expected")
            return None
        self._expected += 1
        at = int(position)
        self._next = at + 1
        self._buffer.append((at, subject, data, int(stamp), int(pending)))
        self._arrived.set()
        return None

    async def answer(self, subject: str) -> None:
        with contextlib.suppress(Exception):  # a lost answer shows as silence: re-created
            await self._nc.publish(subject)

    def _status(self, reply: bytes, headers: bytes) -> str | None:
        if headers[9:12] != _CONTROL:
            line = headers[9:].split(b"\r\n", 1)[0].decode(errors="replace")
            self._restart_soon(f"the server said {line!r}")
            return None
        if reply:  # a flow-control request
            return self._flow_control(reply.decode())
        fields = _fields(headers)
        last = fields.get(_LAST_CONSUMER)
        if last is not None and int(last) != self._expected - 1:
            self._restart_soon(
                f"a heartbeat reports delivery {int(last)}, last seen {self._expected - 1}"
            )
            return None
        stalled = fields.get(_STALLED)
        return None if stalled is None else self._flow_control(stalled.decode())

    def _flow_control(self, reply: str) -> str | None:
        if len(self._buffer) < self._limit:
            return reply
        self._withheld = reply
        return None

    def _restart_soon(self, reason: str) -> None:
        if not self._trouble.is_set():
            self._reason = reason
            self._trouble.set()

    async def _watch(self) -> None:
        period = self._heartbeat * _MISSED_HEARTBEATS
        while not self._closed:
            try:
                async with asyncio.timeout(period):
                    await self._trouble.wait()
            except TimeoutError:
                if self._active:
                    self._active = False
                    continue
                self._reason = f"no heartbeat for {period:g}s"
            # Logged once per trouble: while the server stays away, each retry at debug level.
            report = log.info if self.problem is None else log.debug
            report("re-creating an ordered consumer", stream=self._stream, reason=self._reason)
            await self._end()
            try:
                await self._begin()
            except Exception as exc:  # any failure: try again later
                self.problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self._reason = f"the last attempt failed ({self.problem})"
                self._trouble.set()
                await asyncio.sleep(self._heartbeat)
            else:
                self.restarts += 1
                self.problem = None

    async def _begin(self) -> int:
        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox)
        self._subscription = subscription
        self._tap.readers[subscription._id] = self
        self._expected, self._withheld, self._active = 1, None, True
        self._trouble.clear()
        config = ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=self._heartbeat,
            inactive_threshold=self._inactive,
            mem_storage=True,
            num_replicas=1,
            filter_subject=self._subjects[0] if len(self._subjects) == 1 else None,
            filter_subjects=self._subjects if len(self._subjects) > 1 else None,
        )
        info = await self._js.add_consumer(self._stream, config)
        return info.num_pending or 0

    async def _end(self) -> None:
        """Stop the current consumer's deliveries (it expires on its own)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            self._tap.readers.pop(subscription._id, None)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()


async def wait_for_next(signal: asyncio.Event, timeout: float) -> bool:
    """Clear `signal`, then wait up to `timeout` seconds for it to be set again; False if it
    was not."""
    signal.clear()
    try:
        async with asyncio.timeout(timeout):
            await signal.wait()
    except TimeoutError:
        return False
    return True


def _fields(headers: bytes) -> dict[bytes, bytes]:
    """A status message's header fields (after its status line)."""
    fields: dict[bytes, bytes] = {}
    for line in headers.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip()] = value.strip()
    return fields
