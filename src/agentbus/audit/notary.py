"""The notary: a consumer of EVENTS that extends the hash chain and signs checkpoints of it.

It runs in the `projector` role beside the projections, but not *as* a projection: the
projection runtime rebuilds read models from the stream (blue-green generations, version bumps,
`projections rebuild`), and a chain rebuilt from the stream would re-hash whatever the stream
holds now, laundering the very tampering it exists to reveal. It also hashes every message
as stored, including ones no decoder can read (a projection would dead-letter those), and its
state (the previous link) carries from one batch to the next. What it shares with the runtime:
one active instance per stream (a Postgres advisory lock on its own connection), an ordered
read from the checkpoint (`EventStore.read_raw`), bounded batches in stream order, and the
links, the signed checkpoint and the new head written in one transaction fenced on the old head.

Checkpoints are signed every `checkpoint_every` events, and after `checkpoint_interval`
seconds when the head has moved since the last one (also while idle), with the notary's
Ed25519 key: a 32-byte seed kept with the other shared secrets (`runtime/secrets.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

import structlog
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit import records
from agentbus.audit.chain import Checkpoint, NotaryKey, link_of_digest, payload_digest
from agentbus.audit.records import ChainRecord, FencedOut, Head
from agentbus.db.engine import driver_connection
from agentbus.db.leadership import Leadership, leadership, sleep_or_stop
from agentbus.errors import AuditError
from agentbus.events.subjects import EVENTS_PREFIX
from agentbus.runtime.secrets import shared_secret
from agentbus.store.batches import Batches, ReaderEnded
from agentbus.store.eventstore import EventStore, RawEvent

log = structlog.get_logger("agentbus.audit")

KEY_SECRET: Final = "audit-notary-ed25519"
"""The name of the notary key's seed among the shared secrets."""


async def notary_key(nc: NATS) -> NotaryKey:
    """The notary's signing key (created once, shared by every replica, kept across restarts)."""
    return NotaryKey.from_seed(await shared_secret(nc, KEY_SECRET, 32))


@dataclass(frozen=True, slots=True)
class NotaryOptions:
    batch_size: int = 1000
    """Most events chained in one transaction."""
    linger: float = 0.02
    """Seconds to wait for more events once a batch has its first one."""
    checkpoint_every: int = 1000
    """Sign a checkpoint once this many events were chained since the last one."""
    checkpoint_interval: float = 10.0
    """... or once this many seconds passed, if the head moved since the last one."""
    lock_poll: float = 1.0
    """Seconds between attempts to become the active instance (bounds takeover)."""


class Notary:
    """Chains the events of one stream (EVENTS unless `store` reads another) until stopped."""

    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        key: NotaryKey,
        *,
        subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
        options: NotaryOptions = NotaryOptions(),
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        self._key = key
        self._subjects = tuple(subjects)
        self._options = options
        self._on_progress = on_progress
        self.stream = store.stream
        self.position = 0
        """The head this instance last committed (0 before it has read it)."""
        self._moved = asyncio.Event()
        self._log = log.bind(stream=self.stream)

    async def run(self, stop: asyncio.Event) -> None:
        """Become the active instance, then chain events until `stop`. Failures are logged and
        retried: the notary must outlive a database restart."""
        key = f"agentbus:notary:{self.stream}"
        while not stop.is_set():
            try:
                async with leadership(self._engine, key, stop, self._options.lock_poll) as held:
                    if held is None:
                        return
                    self._log.info("notary active")
                    await self._chain(stop, held)
            except (FencedOut, ReaderEnded) as exc:
                self._log.info("lost leadership", reason=str(exc))
            except Exception as exc:  # keep the chain going after any outage
                self._log.warning("notary interrupted", error=f"{type(exc).__name__}: {exc}")
            await sleep_or_stop(stop, self._options.lock_poll)

    async def wait_for(self, position: int, timeout: float) -> None:
        """Wait until this instance's head reaches `position` (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            while self.position < position:
                self._moved.clear()
                await self._moved.wait()

    async def _chain(self, stop: asyncio.Event, held: Leadership) -> None:
        options = self._options
        async with self._engine.connect() as connection:
            raw = await driver_connection(connection)
            current = await records.ensure_head(raw, self.stream)
            last = await records.last_checkpoint(raw, self.stream)
            checkpointed = last.position if last is not None else 0
            checkpointed_at = time.monotonic()
            self._advance(current)
            async with Batches(
                self._store,
                current.position + 1,
                size=options.batch_size,
                linger=options.linger,
                subjects=self._subjects,
            ) as batches:
                while not stop.is_set():
                    batch = await batches.next()
                    if held.lost.is_set():
                        raise FencedOut("the lock connection dropped")
                    chained = self._links(current, batch)
                    # Every `checkpoint_every` positions exactly (wherever batches are cut), so
                    # a witness knows where to expect them; else at the end after the interval.
                    signing: list[ChainRecord | Head] = []
                    for record in chained:
                        if record.position - checkpointed >= self._options.checkpoint_every:
                            signing.append(record)
                            checkpointed = record.position
                    end = chained[-1] if chained else current
                    if (
                        not signing
                        and end.position > checkpointed
                        and time.monotonic() - checkpointed_at >= self._options.checkpoint_interval
                    ):
                        signing.append(end)
                    if not chained and not signing:
                        continue
                    checkpoints = [self._sign(at) for at in signing]
                    async with raw.transaction():
                        current = await records.append(
                            raw, self.stream, current, chained, checkpoints
                        )
                    if checkpoints:
                        checkpointed, checkpointed_at = checkpoints[-1].position, time.monotonic()
                    self._advance(current)

    def _links(self, head: Head, batch: Sequence[RawEvent]) -> list[ChainRecord]:
        """Extend the chain over `batch` in stream order (pure but for a log line on gaps)."""
        chained: list[ChainRecord] = []
        previous, position = head.link, head.position
        for event in batch:
            if event.position <= position:  # a redelivery after a reader restart
                continue
            if event.position != position + 1 and position:
                self._log.warning("gap in the stream", after=position, next=event.position)
            digest = payload_digest(event.data)
            previous = link_of_digest(previous, event.position, event.subject, digest)
            position = event.position
            chained.append(ChainRecord(position, previous, digest))
        return chained

    def _sign(self, at: ChainRecord | Head) -> Checkpoint:
        return self._key.sign(self.stream, at.position, at.link, datetime.now(UTC))

    def _advance(self, head: Head) -> None:
        self.position = head.position
        self._moved.set()
        if self._on_progress is not None:
            self._on_progress(head.position)


async def stream_subjects(store: EventStore) -> tuple[str, ...]:
    """The subjects the store's stream captures (what the notary and verify read: the whole
    stream). `StoreUnavailable` when JetStream does not answer, or has no such stream."""
    return tuple((await store.stream_info())["config"]["subjects"])


async def notarize(
    nc: NATS,
    store: EventStore,
    engine: AsyncEngine,
    options: NotaryOptions = NotaryOptions(),
    *,
    timeout: float = 600.0,
) -> int:
    """Chain everything on `store`'s stream now and sign a checkpoint at its end; returns that
    position. Whichever notary instance holds the stream (this one, or a running projector
    role) does the work: this waits for the checkpoint to appear in the database."""
    target = await store.last_position()
    notary = Notary(
        store,
        engine,
        await notary_key(nc),
        subjects=await stream_subjects(store),
        options=replace(options, checkpoint_interval=0.0),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(notary.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while True:
                async with engine.connect() as connection:
                    raw = await driver_connection(connection)
                    last = await records.last_checkpoint(raw, store.stream)
                if last is not None and last.position >= target:
                    return last.position
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AuditError(
            f"no checkpoint of {store.stream} reached position {target} in {timeout:g}s"
        ) from None
    finally:
        stop.set()
        await task
