"""One active instance among several processes: a Postgres advisory lock, held on a connection
of its own for as long as the instance works. If the process dies, the connection drops, the
lock goes with it and another instance takes it within `poll` seconds. Projections and the
notary are run this way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@dataclass(frozen=True, slots=True)
class Leadership:
    """Held while the `leadership` block runs."""

    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the lock's connection dropped: the lock is gone, stop writing (writes must be
    fenced anyway: another instance may already have taken over)."""


@contextlib.asynccontextmanager
async def leadership(
    engine: AsyncEngine, key: str, stop: asyncio.Event, poll: float
) -> AsyncIterator[Leadership | None]:
    """Wait until this process holds the advisory lock `key` (trying every `poll` seconds),
    then hold it for the duration; None if `stop` came first."""
    async with engine.connect() as connection:
        while not stop.is_set():
            got = await connection.scalar(
                text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key}
            )
            await connection.commit()
            if got:
                break
            await sleep_or_stop(stop, poll)
        else:
            yield None
            return
        held = Leadership()
        watchdog = asyncio.create_task(_watch(connection, held.lost, poll))
        try:
            yield held
        finally:
            watchdog.cancel()
            with contextlib.suppress(Exception):
                await connection.execute(
                    text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key}
                )
                await connection.commit()


async def _watch(connection: AsyncConnection, lost: asyncio.Event, poll: float) -> None:
    """Notice a dropped lock connection (the lock is then gone too)."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(poll)
            try:
                await connection.execute(text("SELECT 1"))
                await connection.commit()
            except Exception:
                lost.set()
                return


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile. (`asyncio.timeout`, not
    `asyncio.wait_for`: on Python 3.11 the latter drops a cancellation that arrives as the
    event is set.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
