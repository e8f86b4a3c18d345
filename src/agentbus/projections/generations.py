"""Generations of projections in Postgres: which tables serve, where each checkpoint stands,
creating generations, and the atomic blue-green swap.

A generation is one build of a projection into its own physical tables (`<table>_g<n>`). The
stable view `<table>` always points at the `live` generation; a `building` generation catches up
in the background; `retired` ones have been swapped out (their tables are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agentbus.projections.projection import Projection

Status = Literal["live", "building", "retired"]

_ADMIN_LOCK = "agentbus:projections:admin"


@dataclass(frozen=True, slots=True)
class Generation:
    projection: str
    generation: int
    version: int
    status: Status
    position: int
    last_event_time: datetime | None
    halted: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Generation:
        return cls(
            projection=row.projection,
            generation=row.generation,
            version=row.version,
            status=row.status,
            position=row.position,
            last_event_time=row.last_event_time,
            halted=row.halted,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


_COLUMNS = (
    "projection, generation, version, status, position, last_event_time, halted, created_at, "
    "updated_at"
)


async def list_generations(
    connection: AsyncConnection, projection: str | None = None, *, include_retired: bool = False
) -> list[Generation]:
    clauses = [] if include_retired else ["status <> 'retired'"]
    params: dict[str, Any] = {}
    if projection is not None:
        clauses.append("projection = :projection")
        params["projection"] = projection
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await connection.execute(
        text(
            f"SELECT {_COLUMNS} FROM projection_generations {where} ORDER BY projection, generation"
        ),
        params,
    )
    return [Generation.from_row(row) for row in rows]


async def _admin_lock(connection: AsyncConnection) -> None:
    """Serialise generation changes across processes (held until the transaction ends)."""
    await connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": _ADMIN_LOCK}
    )


async def ensure_generations(engine: AsyncEngine, projections: list[Projection]) -> None:
    """Give every projection a live generation; start a rebuild where the code's version moved.

    Idempotent and safe to run from several processes at once."""
    async with engine.begin() as connection:
        await _admin_lock(connection)
        for projection in projections:
            current = await list_generations(connection, projection.name)
            live = [g for g in current if g.status == "live"]
            if not live:
                await _create(connection, projection, status="live")
                continue
            if live[0].version != projection.version and not any(
                g.status == "building" and g.version == projection.version for g in current
            ):
                await _create(connection, projection, status="building")


async def start_rebuild(engine: AsyncEngine, projection: Projection) -> Generation:
    """Create a building generation of `projection` (or return the one already building)."""
    async with engine.begin() as connection:
        await _admin_lock(connection)
        current = await list_generations(connection, projection.name)
        for generation in current:
            if generation.status == "building" and generation.version == projection.version:
                return generation
        status: Status = "building" if any(g.status == "live" for g in current) else "live"
        return await _create(connection, projection, status=status)


async def _create(
    connection: AsyncConnection, projection: Projection, *, status: Status
) -> Generation:
    number = await connection.scalar(
        text(
            "SELECT coalesce(max(generation), 0) + 1 FROM projection_generations "
            "WHERE projection = :p"
        ),
        {"p": projection.name},
    )
    assert isinstance(number, int)
    tables = projection.physical_tables(number)
    for ddl in projection.schema:
        await connection.execute(text(ddl.format_map(tables)))
    for physical in tables.values():
        await _isolate_workspaces(connection, physical)
    row = (
        await connection.execute(
            text(
                "INSERT INTO projection_generations (projection, generation, version, status) "
                f"VALUES (:p, :g, :v, :s) RETURNING {_COLUMNS}"
            ),
            {"p": projection.name, "g": number, "v": projection.version, "s": status},
        )
    ).one()
    if status == "live":
        await _point_views(connection, projection, number)
    return Generation.from_row(row)


READER_ROLE = "agentbus_reader"


async def _isolate_workspaces(connection: AsyncConnection, physical: str) -> None:
    """Row-level security: the reader role sees only the rows of the workspace set for the
    transaction (`SET LOCAL agentbus.workspace`); with none set it sees nothing."""
    await connection.execute(text(f'ALTER TABLE "{physical}" ENABLE ROW LEVEL SECURITY'))
    await connection.execute(
        text(
            f'CREATE POLICY workspace_isolation ON "{physical}" FOR SELECT TO {READER_ROLE} '
            "USING (workspace = current_setting('agentbus.workspace', true))"
        )
    )
    await connection.execute(text(f'GRANT SELECT ON "{physical}" TO {READER_ROLE}'))


async def _point_views(connection: AsyncConnection, projection: Projection, number: int) -> None:
    # security_invoker: row-level security of the tables applies to whoever queries the view.
    for table, physical in projection.physical_tables(number).items():
        await connection.execute(text(f'DROP VIEW IF EXISTS "{table}"'))
        await connection.execute(
            text(
                f'CREATE VIEW "{table}" WITH (security_invoker = true) '
                f'AS SELECT * FROM "{physical}"'
            )
        )
        await connection.execute(text(f'GRANT SELECT ON "{table}" TO {READER_ROLE}'))


async def try_swap(
    engine: AsyncEngine, projection: Projection, building: int, *, caught_up: bool
) -> bool:
    """Make generation `building` live if it has caught up with the stream and is not behind the
    live generation. One transaction: the views switch atomically; then the old tables go."""
    if not caught_up:
        return False
    retired: int | None = None
    async with engine.begin() as connection:
        rows = await connection.execute(
            text(
                f"SELECT {_COLUMNS} FROM projection_generations "
                "WHERE projection = :p AND status IN ('live', 'building') FOR UPDATE"
            ),
            {"p": projection.name},
        )
        current = {g.generation: g for g in map(Generation.from_row, rows)}
        candidate = current.get(building)
        if candidate is None or candidate.status != "building":
            return False
        live = next((g for g in current.values() if g.status == "live"), None)
        if live is not None and live.position > candidate.position:
            return False
        if live is not None:
            retired = live.generation
            await connection.execute(
                text(
                    "UPDATE projection_generations SET status = 'retired', updated_at = now() "
                    "WHERE projection = :p AND generation = :g"
                ),
                {"p": projection.name, "g": live.generation},
            )
        await connection.execute(
            text(
                "UPDATE projection_generations SET status = 'live', swapped_at = now(), "
                "updated_at = now() WHERE projection = :p AND generation = :g"
            ),
            {"p": projection.name, "g": building},
        )
        await _point_views(connection, projection, building)
    if retired is not None:
        await drop_generation_tables(engine, projection, retired)
    return True


async def drop_generation_tables(
    engine: AsyncEngine, projection: Projection, generation: int
) -> None:
    """Drop a retired generation's tables (separately from the swap, so a writer that still
    holds them cannot deadlock with it)."""
    async with engine.begin() as connection:
        for physical in projection.physical_tables(generation).values():
            await connection.execute(text(f'DROP TABLE IF EXISTS "{physical}"'))
