"""Reading a stream in order, in bounded batches: what a consumer that writes per batch (the
projection runtime, the notary) needs from the event store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar, overload

from agentbus.errors import AgentbusError
from agentbus.events.subjects import EVENTS_PREFIX
from agentbus.store.eventstore import EventStore, RawEvent
from agentbus.store.ordered import wait_for_next

T = TypeVar("T")
_CHUNK = 128
"""Events prepared at a time before the reader lets other tasks run."""


class ReaderEnded(AgentbusError):
    """The stream reader behind `Batches` stopped (the connection or the consumer went away):
    start again from the last position written."""


class Batches(Generic[T]):
    """The events of `subjects` from position `start` on, read ahead by an ordered consumer
    into a bounded buffer (`size` * 2) and handed out in batches, in stream order.

    With `prepare`, each event is handed out as `prepare(event)`, computed by the reader as
    events arrive: while the caller awaits its database with one batch, the next one is being
    prepared (decoded, turned into rows), so the two overlap instead of taking turns.

    Use as `async with Batches(...) as batches: batch = await batches.next()`."""

    @overload
    def __init__(
        self: Batches[RawEvent],
        store: EventStore,
        start: int,
        *,
        size: int,
        linger: float,
        subjects: Sequence[str] = ...,
        idle: float = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Batches[T],
        store: EventStore,
        start: int,
        *,
        size: int,
        linger: float,
        prepare: Callable[[RawEvent], T],
        subjects: Sequence[str] = ...,
        idle: float = ...,
    ) -> None: ...

    def __init__(
        self,
        store: EventStore,
        start: int,
        *,
        size: int,
        linger: float,
        prepare: Callable[[RawEvent], T] | None = None,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        idle: float = 0.5,
    ) -> None:
        self._store = store
        self._start = start
        self._size = size
        self._linger = linger
        self._prepare = prepare
        self._subjects = tuple(subjects)
        self._idle = idle
        self._limit = size * 2
        self._buffer: deque[T] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Batches[T]:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        reader = self._reader
        if reader is None:
            return
        # Cancelled again every second until it ends: a cancellation can be swallowed on its
        # way (Python 3.11's `asyncio.wait_for`, inside nats-py), and a reader that missed it
        # would hold its projection (and the process's shutdown) forever.
        while not reader.done():
            reader.cancel()
            await asyncio.wait((reader,), timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            reader.result()

    @property
    def drained(self) -> bool:
        """Nothing read ahead is waiting (with a batch's last `pending` 0: caught up)."""
        return not self._buffer

    async def next(self) -> list[T]:
        """Up to `size` events: waits up to `idle` seconds for the first (then returns an empty
        batch, so the caller can check for stop), then at most `linger` for more. Raises why
        the reader failed, or `ReaderEnded`."""
        reader = self._reader
        assert reader is not None, "use Batches in `async with`"
        if not self._buffer:
            if not reader.done():
                await self._wait_for_events(self._idle)
            if not self._buffer:
                if reader.done():
                    reader.result()  # re-raise why the reader ended
                    raise ReaderEnded("the event reader ended")
                return []
        deadline = time.monotonic() + self._linger
        while len(self._buffer) < self._size and not reader.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait_for_events(remaining):
                break
        buffer, size = self._buffer, self._size
        batch = [buffer.popleft() for _ in range(min(size, len(buffer)))]
        self._room.set()
        return batch

    async def _wait_for_events(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the reader to add events; False on timeout."""
        return await wait_for_next(self._arrived, timeout)

    async def _read(self) -> None:
        prepare, buffer = self._prepare, self._buffer
        try:
            async for chunk in self._store.read_raw_chunks(
                from_position=self._start,
                subjects=self._subjects,
                follow=True,
                chunk=_CHUNK,
            ):
                if prepare is None:
                    buffer.extend(chunk)  # type: ignore[arg-type]  # T is RawEvent
                else:
                    buffer.extend(map(prepare, chunk))
                self._arrived.set()
                if len(buffer) >= self._limit:
                    while len(buffer) >= self._limit:
                        self._room.clear()
                        await self._room.wait()
                else:
                    # Let the caller's database replies in between: preparing many chunks in a
                    # row would delay each of its round trips by all of them.
                    await asyncio.sleep(0)
        finally:
            self._arrived.set()  # a waiting `next` sees the reader ended at once
