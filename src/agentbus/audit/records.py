"""The notary's records in Postgres (tables of migration 0003): the chain's head per stream,
one link per chained event, and the signed checkpoints. Plain asyncpg on hot paths.

These are evidence, not read models: written once, never rebuilt from the stream, stream-wide
(no workspace, no row-level security, no grant to the reader role).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from agentbus.audit.chain import Checkpoint, genesis


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """What the notary recorded for one event: its link and the digest of its stored bytes."""

    position: int
    link: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class Head:
    """The notary's last chained position on a stream (0: none) and that position's link."""

    position: int
    link: bytes


class FencedOut(Exception):
    """Another notary instance moved the head since this one read it: stop writing."""


async def ensure_head(connection: asyncpg.Connection, stream: str) -> Head:
    """The chain's head on `stream`, created at the genesis link if the notary never ran."""
    await connection.execute(
        "INSERT INTO audit_chain (stream, position, link) VALUES ($1, 0, $2) "
        "ON CONFLICT (stream) DO NOTHING",
        stream,
        genesis(stream),
    )
    row = await connection.fetchrow(
        "SELECT position, link FROM audit_chain WHERE stream = $1", stream
    )
    assert row is not None
    return Head(row["position"], bytes(row["link"]))


async def head(connection: asyncpg.Connection, stream: str) -> Head | None:
    """The chain's head on `stream`, None if the notary never ran on it."""
    row = await connection.fetchrow(
        "SELECT position, link FROM audit_chain WHERE stream = $1", stream
    )
    return None if row is None else Head(row["position"], bytes(row["link"]))


async def append(
    connection: asyncpg.Connection,
    stream: str,
    old: Head,
    records: Sequence[ChainRecord],
    checkpoints: Sequence[Checkpoint],
) -> Head:
    """Store `records` (which follow `old`) and `checkpoints`, and move the head, in the
    caller's transaction. Fenced on `old.position`: `FencedOut` if another instance moved it."""
    new = Head(records[-1].position, records[-1].link) if records else old
    moved = await connection.fetchval(
        "UPDATE audit_chain SET position = $3, link = $4, updated_at = now() "
        "WHERE stream = $1 AND position = $2 RETURNING position",
        stream,
        old.position,
        new.position,
        new.link,
    )
    if moved is None:
        raise FencedOut(f"the chain head of {stream} moved past {old.position}")
    if records:
        await connection.execute(
            "INSERT INTO audit_links (stream, position, link, digest) "
            "SELECT $1, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[])",
            stream,
            [r.position for r in records],
            [r.link for r in records],
            [r.digest for r in records],
        )
    if checkpoints:
        await connection.executemany(
            "INSERT INTO audit_checkpoints (stream, position, link, time, key_id, signature) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            [(c.stream, c.position, c.link, c.time, c.key_id, c.signature) for c in checkpoints],
        )
    return new


async def records_between(
    connection: asyncpg.Connection, stream: str, first: int, last: int
) -> list[ChainRecord]:
    """The records of positions `first`..`last` (inclusive), in order."""
    rows = await connection.fetch(
        "SELECT position, link, digest FROM audit_links "
        "WHERE stream = $1 AND position BETWEEN $2 AND $3 ORDER BY position",
        stream,
        first,
        last,
    )
    return [ChainRecord(row[0], bytes(row[1]), bytes(row[2])) for row in rows]


async def link_before(connection: asyncpg.Connection, stream: str, position: int) -> bytes:
    """The link a verification starting at `position` continues from: the recorded link of the
    last chained event before it, or the genesis link."""
    value = await connection.fetchval(
        "SELECT link FROM audit_links WHERE stream = $1 AND position < $2 "
        "ORDER BY position DESC LIMIT 1",
        stream,
        position,
    )
    return genesis(stream) if value is None else bytes(value)


async def last_checkpoint(connection: asyncpg.Connection, stream: str) -> Checkpoint | None:
    found = await checkpoints(connection, stream, latest=True)
    return found[0] if found else None


async def checkpoints(
    connection: asyncpg.Connection,
    stream: str | None = None,
    *,
    first: int = 1,
    last: int | None = None,
    latest: bool = False,
) -> list[Checkpoint]:
    """Signed checkpoints (of one stream, or all), by position; `latest`: only the newest."""
    rows = await connection.fetch(
        "SELECT stream, position, link, time, key_id, signature FROM audit_checkpoints "
        "WHERE ($1::text IS NULL OR stream = $1) AND position >= $2 "
        "AND ($3::bigint IS NULL OR position <= $3) "
        f"ORDER BY stream, position {'DESC LIMIT 1' if latest else ''}",
        stream,
        first,
        last,
    )
    return [Checkpoint(r[0], r[1], bytes(r[2]), r[3], r[4], bytes(r[5])) for r in rows]
