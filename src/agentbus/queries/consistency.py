"""Read-your-writes: wait until a projection has applied a given stream position."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.errors import AgentbusError, ProjectionTimeout
from agentbus.store.eventstore import EventStore


class PositionNotWritten(AgentbusError):
    """A position the event history has not reached: no write can have answered it, so
    waiting for a read model to apply it could only time out."""


async def ensure_written(store: EventStore, position: int) -> None:
    """Refuse (`PositionNotWritten`) a position beyond the end of the event history. Every
    position a command answered is in the stream by the time it was answered."""
    last = await store.last_position()
    if position > last:
        raise PositionNotWritten(
            f"position {position} is beyond the end of the event history ({last})"
        )


async def wait_for_position(
    engine: AsyncEngine,
    projection: str,
    min_position: int,
    *,
    timeout: float = 5.0,
    poll: float = 0.01,
) -> int:
    """Return the live generation's checkpoint once it is >= `min_position`.

    Raises `ProjectionTimeout` (naming how far it got) when that takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    reached = 0
    delay = poll
    while True:
        async with engine.connect() as connection:
            reached = int(
                await connection.scalar(
                    text(
                        "SELECT position FROM projection_generations "
                        "WHERE projection = :p AND status = 'live'"
                    ),
                    {"p": projection},
                )
                or 0
            )
        if reached >= min_position:
            return reached
        if time.monotonic() + delay > deadline:
            raise ProjectionTimeout(projection, min_position, reached, timeout)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
