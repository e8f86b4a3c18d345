"""The gateway's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from agentbus import __version__
from agentbus.errors import StoreUnavailable, StreamNotFound
from agentbus.gateway.auth import Identities
from agentbus.gateway.ingest import FastIngest, Serving
from agentbus.gateway.limits import BodyLimit, RateLimiter
from agentbus.gateway.posting import SessionPosts
from agentbus.gateway.problems import PROBLEM_JSON, install_problem_handlers
from agentbus.gateway.routes import (
    admin,
    approvals,
    budget,
    conversations,
    erasure,
    history,
    streams,
    webchat,
)
from agentbus.projections.catalog import all_projections
from agentbus.projections.generations import ensure_generations
from agentbus.projections.health import projection_health, prometheus_text
from agentbus.runtime.platform import Platform
from agentbus.runtime.secrets import shared_secret

REQUIRED_STREAMS = ("EVENTS", "LIVE")


MAX_BODY = 256 * 1024


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, with its hot path first: `ingest` (when set) sees every
    request before Starlette's middleware stack and answers posts of messages itself
    (gateway/ingest.py), handing everything else to FastAPI's own handling."""

    ingest: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.ingest is None:
            await super().__call__(scope, receive, send)
        else:
            await self.ingest(scope, receive, send)


def create_app(
    platform: Platform, *, rate: float = 50.0, burst: float = 100.0, fast_ingest: bool = True
) -> GatewayApp:
    """The gateway app over already-open connections (the caller owns their lifetime).
    `fast_ingest=False` leaves posting messages to the FastAPI route alone (gateway/ingest.py;
    the tests compare the two)."""
    fast: FastIngest | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The read models' views exist before the first query, even before a projector ran.
        await ensure_generations(platform.engine, all_projections())
        secret = await shared_secret(platform.nc, "session_cookie")
        identities = Identities(platform.store, platform.nc, secret)
        await identities.start()
        app.state.identities = identities
        app.state.session_posts = posts = SessionPosts(platform.store)
        if fast is not None:
            limiter = app.state.rate_limiter
            fast.serving = Serving(identities, limiter, posts, platform.settings.redactor)
        try:
            yield
        finally:
            if fast is not None:
                fast.serving = None
            await identities.stop()

    app = GatewayApp(
        title="agentbus",
        version=__version__,
        summary="Event-sourced message bus for AI-agent gateways",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks: agentbus configures no OpenTelemetry provider, and
        # the check for one on every request cost ~6% of a post (docs/benchmarks.md).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.platform = platform
    app.state.rate_limiter = RateLimiter(rate=rate, burst=burst)
    if fast_ingest:
        app.ingest = fast = FastIngest(super(GatewayApp, app).__call__, MAX_BODY)
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    install_problem_handlers(app)
    app.include_router(erasure.router)  # before admin's `/users/{user_id}/{action}`
    app.include_router(admin.router)
    app.include_router(conversations.router)
    app.include_router(budget.router)
    app.include_router(approvals.router)
    app.include_router(streams.router)
    app.include_router(history.router)
    webchat.install(app)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: NATS and Postgres reachable, streams present",
        responses={503: {"content": {PROBLEM_JSON: {}}, "description": "not ready"}},
    )
    async def readyz() -> JSONResponse:
        checks = await readiness(platform)
        ready = all(value == "ok" for value in checks.values())
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        failing = ", ".join(f"{name}: {value}" for name, value in checks.items() if value != "ok")
        return JSONResponse(
            {
                "type": "https://agentbus.dev/problems/not-ready",
                "title": "Not ready",
                "status": 503,
                "detail": failing,
                "checks": checks,
            },
            status_code=503,
            media_type=PROBLEM_JSON,
        )

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics: projection checkpoints, lag, state, dead letters",
        response_class=PlainTextResponse,
    )
    async def metrics() -> PlainTextResponse:
        health = await projection_health(platform.engine, platform.store)
        return PlainTextResponse(
            prometheus_text(health), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app


async def readiness(platform: Platform, timeout: float = 2.0) -> dict[str, str]:
    """Each dependency's state: "ok" or what is wrong with it."""
    checks: dict[str, str] = {}
    if not platform.nc.is_connected:
        checks["nats"] = "not connected"
    else:
        checks["nats"] = "ok"
        for stream in REQUIRED_STREAMS:
            checks[f"stream:{stream}"] = await _stream_state(platform, stream, timeout)
    try:
        async with asyncio.timeout(timeout), platform.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
    return checks


async def _stream_state(platform: Platform, stream: str, timeout: float) -> str:
    try:
        await platform.store.on_stream(stream, timeout=timeout).stream_info()
    except StreamNotFound as exc:
        return f"missing ({exc}): run agentbus streams apply"
    except StoreUnavailable as exc:
        return f"no answer ({exc})"
    return "ok"
