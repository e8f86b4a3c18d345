"""`agentbus audit verify`: re-read a stream, recompute its hash chain, and report OK or the
first position where it was tampered with.

The shell around `tampering.ChainWalk`: an ordered read of the stream's raw bytes
(`EventStore.read_raw`: nothing is decoded, so ciphertext is hashed as stored), the notary's
records paged in from Postgres ahead of the reader, and the checkpoints (the notary's, or a
witness's exported copy) whose signatures are checked first against the trusted public key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit import records
from agentbus.audit.chain import Checkpoint, key_id, payload_digest, signature_problem
from agentbus.audit.records import ChainRecord
from agentbus.audit.tampering import ChainWalk, Finding, classify
from agentbus.db.engine import driver_connection
from agentbus.errors import AuditError
from agentbus.events.subjects import EVENTS_PREFIX
from agentbus.store.eventstore import EventStore

PAGE: Final = 20_000
"""Positions of notary records fetched per query (one page is fetched ahead of the reader)."""
WINDOW: Final = 20_000
"""Positions after the first finding searched for a moved event."""
_PROGRESS_EVERY: Final = 2048


@dataclass(frozen=True, slots=True)
class Report:
    """What a verification covered and found (`finding` None: OK)."""

    stream: str
    first: int
    last: int
    walked: int
    """Events of the range recomputed and compared."""
    unchained: int
    """Events after the notary's head (not chained yet: compared with nothing)."""
    checkpoints: int
    """Signed checkpoints of the range whose signature and link both matched."""
    key_id: str
    finding: Finding | None

    @property
    def ok(self) -> bool:
        return self.finding is None


async def verify(
    store: EventStore,
    engine: AsyncEngine,
    public_key: Ed25519PublicKey,
    *,
    subjects: Sequence[str] = (f"{EVENTS_PREFIX}.>",),
    first: int = 1,
    last: int | None = None,
    witness: Sequence[Checkpoint] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Verify positions `first`..`last` (default: through the stream's end or the notary's
    head, whichever is further) of `store`'s stream.

    Checkpoints come from the notary's table, or from `witness` (an exported copy, which the
    notary's database cannot rewrite); their signatures must verify with `public_key`.
    `on_progress(position, last)` is called every few thousand events. Raises `AuditError`
    when there is nothing to verify against (the notary never ran on this stream)."""
    if first < 1:
        raise AuditError(f"positions start at 1, got --from {first}")
    stream = store.stream
    if witness is not None and not any(c.stream == stream for c in witness):
        raise AuditError(f"the witness's checkpoints hold none of stream {stream}")
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        head = await records.head(raw, stream)
        if head is None:
            raise AuditError(
                f"the notary has never chained stream {stream}: run the projector role "
                "(agentbus up, or agentbus serve --role projector) first"
            )
        end = last if last is not None else max(head.position, await store.last_position())
        if end < first:
            raise AuditError(f"empty range: --from {first} is after --to {end}")
        previous = await records.link_before(raw, stream, first)
        signed = (
            [c for c in witness if c.stream == stream and first <= c.position <= end]
            if witness is not None
            else await records.checkpoints(raw, stream, first=first, last=end)
        )
    bad_signature = _first_bad_signature(signed, public_key)
    walk_end = end if bad_signature is None else bad_signature.position
    # Checkpoints before a badly signed one are trusted; the bad one and later ones are not.
    trusted = {c.position: c.link for c in signed if bad_signature is None or c.position < walk_end}
    walk = ChainWalk(previous, head.position, trusted)
    finding = await _walk(store, engine, walk, stream, subjects, first, walk_end, on_progress)
    if finding is not None and finding.kind in ("modified", "removed", "inserted"):
        finding = classify(finding, *await _window(store, engine, stream, subjects, finding))
    # The data's own finding first; a bad signature only when nothing earlier went wrong.
    if finding is None:
        finding = bad_signature
    return Report(
        stream,
        first,
        end,
        walk.walked,
        walk.unchained,
        walk.checkpoints_matched,
        key_id(public_key),
        finding,
    )


def _first_bad_signature(
    signed: Sequence[Checkpoint], public_key: Ed25519PublicKey
) -> Finding | None:
    for checkpoint in sorted(signed, key=lambda c: c.position):
        problem = signature_problem(checkpoint, public_key)
        if problem == "unknown-key":
            return Finding(
                problem,
                checkpoint.position,
                f"the checkpoint at {checkpoint.position} was signed by key "
                f"{checkpoint.key_id}, not by the trusted key {key_id(public_key)}",
            )
        if problem == "bad-signature":
            return Finding(
                problem,
                checkpoint.position,
                f"the signature of the checkpoint at {checkpoint.position} does not verify",
            )
    return None


async def _walk(
    store: EventStore,
    engine: AsyncEngine,
    walk: ChainWalk,
    stream: str,
    subjects: Sequence[str],
    first: int,
    end: int,
    on_progress: Callable[[int, int], None] | None,
) -> Finding | None:
    async with engine.connect() as connection:
        raw = await driver_connection(connection)

        async def page(start: int) -> tuple[list[ChainRecord], int]:
            through = min(end, start + PAGE - 1)
            return await records.records_between(raw, stream, start, through), through

        ahead = asyncio.create_task(page(first))
        count = 0
        try:
            async for event in store.read_raw(
                from_position=first, subjects=subjects, to_position=end
            ):
                position = event.position
                if position > end:
                    break
                while position > walk.loaded_through:
                    loaded, through = await ahead
                    walk.add_records(loaded, through)
                    ahead = asyncio.create_task(page(through + 1))
                if walk.event(position, event.subject, event.data) is not None:
                    return walk.finding
                count += 1
                if on_progress is not None and count % _PROGRESS_EVERY == 0:
                    on_progress(position, end)
            while walk.loaded_through < end:
                loaded, through = await ahead
                walk.add_records(loaded, through)
                ahead = asyncio.create_task(page(through + 1))
        finally:
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ahead
    if on_progress is not None:
        on_progress(end, end)
    return walk.end()


async def _window(
    store: EventStore,
    engine: AsyncEngine,
    stream: str,
    subjects: Sequence[str],
    finding: Finding,
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Payload digests on the stream and in the records from the finding on (`WINDOW`)."""
    start, stop = finding.position, finding.position + WINDOW
    on_stream = {
        event.position: payload_digest(event.data)
        async for event in store.read_raw(from_position=start, subjects=subjects, to_position=stop)
        if event.position <= stop
    }
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        recorded = {
            r.position: r.digest for r in await records.records_between(raw, stream, start, stop)
        }
    return on_stream, recorded
