"""Connecting to NATS with bounded waits and logged (not printed) connection events."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client as NATS

from agentbus.errors import StoreUnavailable

log = structlog.get_logger("agentbus.nats")


async def connect_nats(url: str, *, timeout: float = 5.0, name: str = "agentbus") -> NATS:
    """Connect to `url` within `timeout` seconds, else raise `StoreUnavailable`.

    Once connected the client reconnects forever; operations made while it is down fail with
    `StoreUnavailable` after their own timeout, never hang."""
    client = NATS()
    outage = True  # until connected: failed first attempts are reported by the exception

    async def on_error(exc: Exception) -> None:
        # One line per outage, not one per reconnect attempt.
        if not outage:
            log.warning("nats error", error=str(exc) or type(exc).__name__)
        else:
            log.debug("nats error", error=str(exc) or type(exc).__name__)

    async def on_disconnected() -> None:
        nonlocal outage
        if not client.is_closed and not outage:
            outage = True
            log.warning("nats disconnected; reconnecting", url=url)

    async def on_reconnected() -> None:
        nonlocal outage
        outage = False
        log.info("nats reconnected", url=url)

    try:
        async with asyncio.timeout(timeout):
            await client.connect(
                url,
                name=name,
                connect_timeout=max(1, int(min(timeout, 2.0))),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                # nats-py annotates int, but honours fractions: reconnect within 250 ms.
                reconnect_time_wait=0.25,  # type: ignore[arg-type]
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
    except Exception as exc:  # nats-py raises several unrelated types here
        with contextlib.suppress(Exception):
            await client.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        raise StoreUnavailable(f"cannot connect to NATS at {url}: {reason}") from exc
    outage = False
    return client
