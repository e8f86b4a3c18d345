"""How each projection is doing: checkpoint, lag, state, dead letters — for
`agentbus projections status` and the Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.projections.generations import Generation, list_generations
from agentbus.store.eventstore import EventStore

State = Literal["running", "catching up", "stalled", "failed", "rebuilding"]

STALL_AFTER = 30.0
"""Seconds an unprocessed event may wait, with the checkpoint not moving, before the
projection is reported stalled."""


@dataclass(frozen=True, slots=True)
class ProjectionHealth:
    projection: str
    generation: int
    version: int
    status: str
    position: int
    stream_position: int
    lag_events: int
    lag_seconds: float
    state: State
    dead_letters: int
    halted: str | None


def classify(
    generation: Generation,
    *,
    lag_events: int,
    lag_seconds: float,
    now: datetime,
    stall_after: float = STALL_AFTER,
) -> State:
    """The state of one generation (pure)."""
    if generation.halted:
        return "failed"
    if lag_events > 0:
        idle = (now - generation.updated_at).total_seconds()
        if lag_seconds > stall_after and idle > stall_after:
            return "stalled"
        if generation.status == "building":
            return "rebuilding"
        return "catching up"
    return "running"


async def projection_health(
    engine: AsyncEngine, store: EventStore, *, stall_after: float = STALL_AFTER
) -> list[ProjectionHealth]:
    """Health of every live and building generation."""
    async with engine.connect() as connection:
        generations = await list_generations(connection)
        counts = {
            (row.projection, row.generation): row.n
            for row in await connection.execute(
                text(
                    "SELECT projection, generation, count(*) AS n FROM dead_letters "
                    "WHERE resolved_at IS NULL GROUP BY projection, generation"
                )
            )
        }
    stream_position = await store.last_position()
    now = datetime.now(UTC)
    result = []
    for generation in generations:
        lag_events = max(0, stream_position - generation.position)
        lag_seconds = 0.0
        if lag_events:
            # The first event not yet applied: how long has it been waiting?
            waiting = await store.get(generation.position + 1)
            if waiting is not None:
                lag_seconds = max(0.0, (now - waiting.time).total_seconds())
        result.append(
            ProjectionHealth(
                projection=generation.projection,
                generation=generation.generation,
                version=generation.version,
                status=generation.status,
                position=generation.position,
                stream_position=stream_position,
                lag_events=lag_events,
                lag_seconds=lag_seconds,
                state=classify(
                    generation,
                    lag_events=lag_events,
                    lag_seconds=lag_seconds,
                    now=now,
                    stall_after=stall_after,
                ),
                dead_letters=counts.get((generation.projection, generation.generation), 0),
                halted=generation.halted,
            )
        )
    return result


_STATES: tuple[State, ...] = ("running", "catching up", "stalled", "failed", "rebuilding")


def prometheus_text(health: list[ProjectionHealth]) -> str:
    """The same figures as Prometheus text exposition (format 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def labels(h: ProjectionHealth) -> str:
        return f'projection="{h.projection}",generation="{h.generation}",status="{h.status}"'

    family("agentbus_projection_position", "gauge", "Last stream position applied.")
    lines += [f"agentbus_projection_position{{{labels(h)}}} {h.position}" for h in health]
    family("agentbus_stream_position", "gauge", "Last position of the EVENTS stream.")
    if health:
        lines.append(f"agentbus_stream_position {health[0].stream_position}")
    family("agentbus_projection_lag_events", "gauge", "Events not yet applied.")
    lines += [f"agentbus_projection_lag_events{{{labels(h)}}} {h.lag_events}" for h in health]
    family("agentbus_projection_lag_seconds", "gauge", "Age of the oldest unapplied event.")
    lines += [f"agentbus_projection_lag_seconds{{{labels(h)}}} {h.lag_seconds:.3f}" for h in health]
    family("agentbus_projection_dead_letters", "gauge", "Unresolved dead letters.")
    lines += [f"agentbus_projection_dead_letters{{{labels(h)}}} {h.dead_letters}" for h in health]
    family("agentbus_projection_state", "gauge", "1 for the current state of the projection.")
    for h in health:
        for state in _STATES:
            value = 1 if h.state == state else 0
            lines.append(f'agentbus_projection_state{{{labels(h)},state="{state}"}} {value}')
    return "\n".join(lines) + "\n"
