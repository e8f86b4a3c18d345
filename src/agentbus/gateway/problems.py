"""Errors as RFC 9457 `application/problem+json`, mapped in this one place."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agentbus.errors import (
    AgentbusError,
    ConcurrencyConflict,
    InvalidEvent,
    ProjectionTimeout,
    StoreUnavailable,
)

PROBLEM_JSON = "application/problem+json"

_STATUS: list[tuple[type[AgentbusError], int, str]] = [
    (InvalidEvent, 422, "invalid-event"),
    (ConcurrencyConflict, 409, "concurrency-conflict"),
    (StoreUnavailable, 503, "store-unavailable"),
    (ProjectionTimeout, 504, "projection-timeout"),
]


def problem(status: int, title: str, detail: str, kind: str, **extra: Any) -> JSONResponse:
    body = {
        "type": f"https://agentbus.dev/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_agentbus_error(_: Request, exc: Exception) -> JSONResponse:
        for error_type, status, kind in _STATUS:
            if isinstance(exc, error_type):
                return problem(status, type(exc).__name__, str(exc), kind)
        return problem(500, type(exc).__name__, str(exc), "internal")

    app.add_exception_handler(AgentbusError, on_agentbus_error)
