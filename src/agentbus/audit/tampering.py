"""Finding tampering: the stream as it is now, walked in order against the notary's records and
the signed checkpoints. Pure: the caller reads the stream and the records and feeds them in.

A walk recomputes every link from the stored bytes. At each position it can meet:

- a record and an event whose links agree: fine;
- a record and an event whose links differ: the event at that position changed (`modified`);
- a record and no event (the stream skipped past it): `removed`;
- an event and no record, at or before the notary's head: `inserted`;
- an event past the notary's head: not chained yet (the notary lags), counted, not a finding;
- a signed checkpoint whose link differs from the recomputed one, although the records agreed:
  the records were rewritten along with the stream (`checkpoint-mismatch`).

`classify` then looks around the first finding (payload digests on both sides) to tell a
moved event (`reordered`), a removal or insertion that shifted the events after it, and a plain
modification apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from agentbus.audit.chain import link_of_digest
from agentbus.audit.records import ChainRecord

Kind = Literal[
    "modified",
    "removed",
    "inserted",
    "reordered",
    "checkpoint-mismatch",
    "bad-signature",
    "unknown-key",
]
_sha256 = hashlib.sha256


@dataclass(frozen=True, slots=True)
class Finding:
    """The first sign of tampering: what, where, and a sentence for a person."""

    kind: Kind
    position: int
    detail: str


class ChainWalk:
    """Walks a stream's events in order against the notary's records.

    Feed records with `add_records` (in position order, each batch ending at `through`) before
    feeding the events they cover with `event`; call `end` after the last event. The walk
    stops at its first finding (`finding`)."""

    def __init__(
        self, previous: bytes, head: int, checkpoints: Mapping[int, bytes] | None = None
    ) -> None:
        self.previous = previous
        """The link of the last event walked (at first: the link before the range)."""
        self.head = head
        """The notary's head: events after it are not chained yet."""
        self.finding: Finding | None = None
        self.walked = 0
        self.unchained = 0
        self.checkpoints_matched = 0
        self.loaded_through = 0
        self._records: list[ChainRecord] = []
        self._next = 0
        self._checkpoints = dict(checkpoints or {})
        self._checkpoint_positions = sorted(self._checkpoints)
        self._next_checkpoint = 0

    def add_records(self, records: Sequence[ChainRecord], through: int) -> None:
        """The notary's records of the positions up to `through` not given before."""
        if self._next > 4096:  # keep the list short: drop what was walked
            del self._records[: self._next]
            self._next = 0
        self._records.extend(records)
        self.loaded_through = through

    def event(self, position: int, subject: str, payload: bytes) -> Finding | None:
        """Walk the event at `position` (after every earlier one). Returns the first finding."""
        if position > self.loaded_through:
            raise ValueError(f"records through {position} must be added first")
        records = self._records
        index = self._next
        digest = _sha256(payload).digest()
        link = link_of_digest(self.previous, position, subject, digest)
        if index < len(records) and records[index].position < position:
            missing = records[index].position
            return self._found("removed", missing, f"position {missing} is gone from the stream")
        if self._next_checkpoint < len(self._checkpoint_positions):
            pending = self._checkpoint_positions[self._next_checkpoint]
            if pending < position:
                return self._found(
                    "checkpoint-mismatch",
                    pending,
                    f"a signed checkpoint names position {pending}, which is not on the stream",
                )
        if index < len(records) and records[index].position == position:
            self._next = index + 1
            if records[index].link != link:
                what = (
                    "its subject changed (same bytes)"
                    if records[index].digest == digest
                    else "its bytes differ from what the notary chained"
                )
                return self._found("modified", position, f"the event at {position}: {what}")
        elif position <= self.head:
            return self._found(
                "inserted", position, f"position {position} was never chained by the notary"
            )
        else:
            self.unchained += 1
        if self._checkpoints and position in self._checkpoints:
            self._next_checkpoint += 1
            if self._checkpoints[position] != link:
                return self._found(
                    "checkpoint-mismatch",
                    position,
                    f"the signed checkpoint at {position} does not match the stream: the "
                    "history before it was rewritten along with the notary's records",
                )
            self.checkpoints_matched += 1
        self.previous = link
        self.walked += 1
        return None

    def end(self) -> Finding | None:
        """After the last event: records (and checkpoints) up to `loaded_through` that the
        stream no longer has."""
        if self.finding is not None:
            return self.finding
        if self._next < len(self._records):
            missing = self._records[self._next].position
            return self._found("removed", missing, f"position {missing} is gone from the stream")
        if self._next_checkpoint < len(self._checkpoint_positions):
            pending = self._checkpoint_positions[self._next_checkpoint]
            if pending <= self.loaded_through:
                return self._found(
                    "checkpoint-mismatch",
                    pending,
                    f"a signed checkpoint names position {pending}, which is not on the stream",
                )
        return None

    def _found(self, kind: Kind, position: int, detail: str) -> Finding:
        self.finding = Finding(kind, position, detail)
        return self.finding


def classify(
    finding: Finding, stream: Mapping[int, bytes], recorded: Mapping[int, bytes]
) -> Finding:
    """Refine a walk's first finding with the payload digests around it: `stream` (position
    -> digest of the bytes on the stream now) and `recorded` (position -> digest the notary
    chained), both from the finding's position on. Events are unique (ids, times), so equal
    digests at two positions mean one event that moved."""
    p = finding.position
    if finding.kind not in ("modified", "removed", "inserted"):
        return finding
    now, then = stream.get(p), recorded.get(p)
    on_stream = {digest: position for position, digest in stream.items() if position != p}
    in_records = {digest: position for position, digest in recorded.items() if position != p}
    moved_to = on_stream.get(then) if then is not None else None  # the chained event, now
    came_from = in_records.get(now) if now is not None else None  # the event now at p, then
    if finding.kind == "removed":
        if moved_to is not None:
            return _as(finding, "reordered", f"the event chained at {p} is now at {moved_to}")
        return finding
    if finding.kind == "inserted":
        if came_from is not None:
            return _as(finding, "reordered", f"the event chained at {came_from} is now at {p}")
        return finding
    if now == then:
        return finding
    if came_from is None and moved_to is not None and moved_to > p:
        return _as(
            finding,
            "inserted",
            f"a new event at {p}; the event chained at {p} is now at {moved_to}",
        )
    if came_from is not None and came_from > p and moved_to is None:
        return _as(
            finding,
            "removed",
            f"the event chained at {p} is gone; the one chained at {came_from} moved up to it",
        )
    if came_from is not None:
        return _as(finding, "reordered", f"the event chained at {came_from} is now at {p}")
    return finding


def _as(finding: Finding, kind: Kind, detail: str) -> Finding:
    return replace(finding, kind=kind, detail=detail)
