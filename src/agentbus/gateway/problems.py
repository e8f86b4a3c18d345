"""Every error as RFC 9457 `application/problem+json`, mapped in this one place."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agentbus.domain.budget import BudgetExceeded, InvalidBudget
from agentbus.domain.decider import DomainError
from agentbus.domain.identity import ApiKeyNotFound, InvalidUserId, UserExists, UserNotFound
from agentbus.domain.run import IllegalRunTransition, RunAlreadyExists, RunNotFound
from agentbus.domain.session import (
    SessionAlreadyExists,
    SessionBusy,
    SessionClosedError,
    SessionNotFound,
)
from agentbus.domain.workspace import (
    InvalidWorkspaceId,
    LastOwner,
    WorkspaceExists,
    WorkspaceNotFound,
)
from agentbus.errors import (
    AgentbusError,
    ConcurrencyConflict,
    InvalidEvent,
    ProjectionTimeout,
    StoreUnavailable,
)
from agentbus.gateway.auth import Forbidden, NotVisible, Unauthenticated
from agentbus.gateway.limits import BodyTooLarge, RateLimited
from agentbus.queries.sessions import BadCursor

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("agentbus.gateway")

# Most specific first: the first matching type decides.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (NotVisible, 404, "not-found"),
    (RateLimited, 429, "rate-limited"),
    (BadCursor, 400, "bad-cursor"),
    (BodyTooLarge, 413, "body-too-large"),
    (SessionNotFound, 404, "not-found"),
    (RunNotFound, 404, "not-found"),
    (UserNotFound, 404, "not-found"),
    (ApiKeyNotFound, 404, "not-found"),
    (WorkspaceNotFound, 404, "not-found"),
    (SessionBusy, 409, "session-busy"),
    (SessionClosedError, 409, "session-closed"),
    (SessionAlreadyExists, 409, "conflict"),
    (RunAlreadyExists, 409, "conflict"),
    (IllegalRunTransition, 409, "illegal-transition"),
    (WorkspaceExists, 409, "conflict"),
    (UserExists, 409, "conflict"),
    (LastOwner, 409, "conflict"),
    (BudgetExceeded, 402, "budget-exhausted"),
    (InvalidBudget, 422, "invalid"),
    (InvalidWorkspaceId, 422, "invalid"),
    (InvalidUserId, 422, "invalid"),
    (DomainError, 409, "refused"),
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
    headers = {}
    if status == 429 and "retry_after" in extra:
        headers["Retry-After"] = str(extra["retry_after"])
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_agentbus_error(_: Request, exc: Exception) -> JSONResponse:
        for error_type, status, kind in _STATUS:
            if isinstance(exc, error_type):
                extra: dict[str, Any] = {}
                if isinstance(exc, RateLimited):
                    extra["retry_after"] = exc.retry_after
                if isinstance(exc, ConcurrencyConflict):
                    extra["actual_position"] = exc.actual
                return problem(status, type(exc).__name__, str(exc), kind, **extra)
        log.error("unmapped error", error=repr(exc))
        return problem(500, "Internal error", "an unexpected error occurred", "internal")

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return problem(exc.status_code, _reason(exc.status_code), str(exc.detail), "http")

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"location": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors)
        return problem(422, "Invalid request", detail, "invalid-request", errors=errors)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", error=repr(exc))
        return problem(500, "Internal error", "an unexpected error occurred", "internal")

    app.add_exception_handler(AgentbusError, on_agentbus_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
