"""Running roles (gateway, projector, worker) in one process until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Generator
from typing import Final, Literal, get_args

import structlog
import uvicorn

from agentbus.audit.notary import Notary, notary_key
from agentbus.gateway.app import create_app
from agentbus.gateway.sse import end_streams
from agentbus.projections.catalog import all_projections
from agentbus.projections.runtime import Projector
from agentbus.runtime.platform import Platform
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.expiry import ApprovalExpiry
from agentbus.workers.runs import RunWorker

Role = Literal["gateway", "projector", "worker"]
ROLES: tuple[Role, ...] = get_args(Role)

log = structlog.get_logger("agentbus.roles")


HTTP_PARSER: Final = "httptools"
"""uvicorn's HTTP implementation for the gateway: httptools (C) rather than h11 (pure Python),
~1.4x the posts per second on the same CPU (docs/benchmarks.md, http_ingest)."""


COLLECTOR_THRESHOLDS: Final = (50_000, 20, 100)
"""The cyclic garbage collector's thresholds in server processes (CPython's defaults: 700, 10,
10). Every event read and every request allocate many short-lived objects; with the defaults a
young-generation collection ran every few events, each one walking everything allocated since.
Measured: a projection catch-up ~1.3x faster (docs/benchmarks.md, projection, 5.)."""


def tune_collector() -> None:
    """Set up the garbage collector for a long-running server process (`agentbus up` and
    `agentbus serve` call it once, before they start their roles): what exists at start
    (modules, settings, compiled patterns) moves to the permanent generation, and young
    collections run every `COLLECTOR_THRESHOLDS[0]` allocations instead of every 700.
    Reference counting frees almost everything at once anyway; this governs only how often
    cycles are looked for."""
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process-wide stop event governs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def run_roles(
    platform: Platform,
    roles: set[Role],
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run `roles` until `stop` is set, then shut them down gracefully."""
    server: _HttpServer | None = None
    tasks: list[asyncio.Task[None]] = []
    if "gateway" in roles:
        config = uvicorn.Config(
            create_app(platform),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=HTTP_PARSER,
            timeout_graceful_shutdown=5,
        )
        server = _HttpServer(config)
        tasks.append(asyncio.create_task(server.serve(), name="gateway"))
    if "projector" in roles:
        projector = Projector(all_projections(), platform.store, platform.engine)
        tasks.append(asyncio.create_task(projector.run(stop), name="projector"))
        # The notary keeps the hash chain over EVENTS beside the read models (docs/audit.md).
        notary = Notary(platform.store, platform.engine, await notary_key(platform.nc))
        tasks.append(asyncio.create_task(notary.run(stop), name="notary"))
    if "worker" in roles:
        settings = platform.settings
        worker = RunWorker(
            platform.store,
            platform.nc,
            settings.agents,
            concurrency=settings.worker_concurrency,
            lease=settings.run_lease,
        )
        reactor = AutoReply(platform.store, platform.nc, settings.agents)
        tasks.append(asyncio.create_task(worker.run(stop), name="worker"))
        tasks.append(asyncio.create_task(reactor.run(stop), name="auto-reply"))
        expiry = ApprovalExpiry(platform.store, platform.nc)
        tasks.append(asyncio.create_task(expiry.run(stop), name="approval-expiry"))

    if server is not None:
        while not server.started:
            if tasks[0].done():
                await tasks[0]  # re-raises a failed start (e.g. busy port)
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.02)
    # (The projector works in the background; it is ready when its first scan has run.)
    if on_ready is not None:
        on_ready()

    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if server is not None:
        end_streams(server.config.app)  # SSE clients reconnect elsewhere at once
        server.should_exit = True
    stopper.cancel()
    for task in tasks:
        await task
