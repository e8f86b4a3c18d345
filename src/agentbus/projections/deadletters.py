"""Dead letters: events a projection could not apply. Listed and retried by operators
(`agentbus projections dlq list|retry`); never skipped silently."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.db.engine import driver_connection
from agentbus.projections.generations import list_generations
from agentbus.projections.projection import Projection
from agentbus.projections.runtime import execute_writes
from agentbus.store.eventstore import EventStore, RawEvent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    projection: str
    generation: int
    position: int
    subject: str
    event_type: str
    error: str
    failed_at: datetime


async def list_dead_letters(engine: AsyncEngine, projection: str | None = None) -> list[DeadLetter]:
    """Unresolved dead letters, oldest position first."""
    query = (
        "SELECT id, projection, generation, position, subject, event_type, error, failed_at "
        "FROM dead_letters WHERE resolved_at IS NULL"
    )
    params = {}
    if projection is not None:
        query += " AND projection = :p"
        params["p"] = projection
    async with engine.connect() as connection:
        rows = await connection.execute(text(query + " ORDER BY projection, position"), params)
        return [DeadLetter(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class RetryResult:
    resolved: list[int]
    failed: dict[int, str]
    unhalted: bool


async def retry_dead_letters(
    engine: AsyncEngine, store: EventStore, projection: Projection
) -> RetryResult:
    """Apply every unresolved dead letter of `projection`'s live generation again.

    A halted projection (policy `halt`) is released instead: its worker retries the event in
    order, and halts again if it still fails. For `continue`, each event is re-applied now, in
    position order, each in its own transaction; a success marks the dead letter resolved."""
    async with engine.begin() as connection:
        generations = await list_generations(connection, projection.name)
        live = next((g for g in generations if g.status == "live"), None)
        if live is None:
            return RetryResult([], {}, False)
        if live.halted:
            await connection.execute(
                text(
                    "UPDATE projection_generations SET halted = NULL, updated_at = now() "
                    "WHERE projection = :p AND generation = :g"
                ),
                {"p": projection.name, "g": live.generation},
            )
            await connection.execute(
                text(
                    "UPDATE dead_letters SET resolved_at = now() "
                    "WHERE projection = :p AND generation = :g AND resolved_at IS NULL "
                    "AND position > :pos"
                ),
                {"p": projection.name, "g": live.generation, "pos": live.position},
            )
            return RetryResult([], {}, True)
        rows = (
            await connection.execute(
                text(
                    "SELECT id, position, subject, payload FROM dead_letters "
                    "WHERE projection = :p AND generation = :g AND resolved_at IS NULL "
                    "ORDER BY position"
                ),
                {"p": projection.name, "g": live.generation},
            )
        ).all()
    handlers = dict(projection.handlers())
    sql = {
        s.name: s.render(projection.physical_tables(live.generation)) for s in projection.statements
    }
    resolved: list[int] = []
    failed: dict[int, str] = {}
    for row in rows:
        raw_event = RawEvent(row.position, row.subject, bytes(row.payload), None, 0)
        try:
            await store.prepare(raw_event)  # the keys of sealed fields (docs/erasure.md)
            recorded = store.decode(raw_event)
            handler = handlers.get(type(recorded.event))
            writes = list(handler(recorded)) if handler is not None else []
            async with engine.connect() as connection:
                raw = await driver_connection(connection)
                async with raw.transaction():
                    await execute_writes(raw, projection, sql, writes)
                    await raw.execute(
                        "UPDATE dead_letters SET resolved_at = now() WHERE id = $1", row.id
                    )
            resolved.append(row.id)
        except Exception as exc:
            failed[row.id] = f"{type(exc).__name__}: {exc}"
    return RetryResult(resolved, failed, False)
