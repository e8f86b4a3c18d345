"""Reading a stream in order, in bounded batches: what a consumer that writes per batch (the
projection runtime, the notary) needs from the event store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import TracebackType

from agentbus.errors import AgentbusError
from agentbus.events.subjects import EVENTS_PREFIX
from agentbus.store.eventstore import EventStore, RawEvent


class ReaderEnded(AgentbusError):
    """The stream reader behind `Batches` stopped (the connection or the consumer went away):
    start again from the last position written."""


class Batches:
    """The events of `subjects` from position `start` on, read ahead by an ordered consumer
    into a bounded queue (`size` * 4) and handed out in batches, in stream order.

    Use as `async with Batches(...) as batches: batch = await batches.next()`."""

    def __init__(
        self,
        store: EventStore,
        start: int,
        *,
        size: int,
        linger: float,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        idle: float = 0.5,
    ) -> None:
        self._store = store
        self._start = start
        self._size = size
        self._linger = linger
        self._subjects = tuple(subjects)
        self._idle = idle
        self._queue: asyncio.Queue[RawEvent] = asyncio.Queue(maxsize=size * 4)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Batches:
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
        return self._queue.empty()

    async def next(self) -> list[RawEvent]:
        """Up to `size` events: waits up to `idle` seconds for the first (then returns an empty
        batch, so the caller can check for stop), then at most `linger` for more. Raises why
        the reader failed, or `ReaderEnded`."""
        queue, reader = self._queue, self._reader
        assert reader is not None, "use Batches in `async with`"
        try:
            first = await asyncio.wait_for(queue.get(), self._idle)
        except TimeoutError:
            if reader.done():
                reader.result()  # re-raise why the reader ended
                raise ReaderEnded("the event reader ended") from None
            return []
        batch = [first]
        deadline = time.monotonic() + self._linger
        while len(batch) < self._size:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _read(self) -> None:
        async for raw in self._store.read_raw(
            from_position=self._start, subjects=self._subjects, follow=True
        ):
            await self._queue.put(raw)
