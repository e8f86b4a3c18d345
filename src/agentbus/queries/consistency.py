"""Read-your-writes: wait until a projection has applied a given stream position."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.errors import ProjectionTimeout


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
