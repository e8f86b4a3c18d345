"""Every error as RFC 9457 `application/problem+json`, mapped in this one place."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from agentbus.domain.approval import (
    ApprovalAlreadyDecided,
    ApprovalHasExpired,
    ApprovalMismatch,
    ApprovalNotFound,
    InvalidRules,
    LinkAlreadyUsed,
)
from agentbus.domain.approval_link import LinkExpired, LinkInvalid, LinkMismatch
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
from agentbus.gateway.cursors import BadStreamCursor
from agentbus.gateway.limits import BodyTooLarge, RateLimited
from agentbus.gateway.sse import BadStreamFilter
from agentbus.queries.consistency import PositionNotWritten
from agentbus.queries.pagination import BadCursor

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("agentbus.gateway")

# Most specific first: the first matching type decides.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (NotVisible, 404, "not-found"),
    (RateLimited, 429, "rate-limited"),
    (BadCursor, 400, "bad-cursor"),
    (BadStreamCursor, 400, "bad-cursor"),
    (BadStreamFilter, 400, "bad-filter"),
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
    (ApprovalNotFound, 404, "not-found"),
    (ApprovalHasExpired, 410, "approval-expired"),
    (ApprovalAlreadyDecided, 409, "approval-decided"),
    (ApprovalMismatch, 409, "conflict"),
    (LinkAlreadyUsed, 409, "link-used"),
    (LinkExpired, 410, "link-expired"),
    (LinkInvalid, 403, "link-invalid"),
    (LinkMismatch, 403, "link-mismatch"),
    (InvalidRules, 422, "invalid"),
    (InvalidBudget, 422, "invalid"),
    (InvalidWorkspaceId, 422, "invalid"),
    (InvalidUserId, 422, "invalid"),
    (DomainError, 409, "refused"),
    (InvalidEvent, 422, "invalid-event"),
    (ConcurrencyConflict, 409, "concurrency-conflict"),
    (StoreUnavailable, 503, "store-unavailable"),
    (ProjectionTimeout, 504, "projection-timeout"),
    (PositionNotWritten, 422, "position-not-written"),
]


class FieldError(BaseModel):
    location: str = Field(description="where, e.g. `body.text`, `query.limit`, `path.sid`")
    message: str


class Problem(BaseModel):
    """Every error answer: RFC 9457 problem details, `application/problem+json`. Extension
    members appear where they apply."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str = Field(description="what was wrong, for a human")
    errors: list[FieldError] | None = Field(default=None, description="422: each invalid input")
    retry_after: int | None = Field(default=None, description="429: seconds to wait")
    actual_position: int | None = Field(
        default=None, description="409 concurrency conflict: the aggregate's last position"
    )
    checks: dict[str, str] | None = Field(
        default=None, description="503 from /readyz: each dependency's state"
    )


_MEANING = {
    400: "A body that cannot be read as JSON, or a cursor this server did not hand out",
    401: "No valid credentials",
    402: "The token budget is exhausted",
    403: "The caller's role does not allow this",
    404: "Not found, or not visible to this caller",
    409: "Refused in the resource's current state",
    410: "Expired",
    413: "Request body over 256 KiB",
    422: "Invalid input",
    429: "Rate limited: retry after `Retry-After` seconds",
    503: "The event store (JetStream) did not answer",
    504: "The read model did not reach `min_position` in time",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a router or route: each status answered as problem+json."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {"description": _MEANING[status], "content": {PROBLEM_JSON: {"schema": schema}}}
        for status in statuses
    }


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


def agentbus_problem(exc: AgentbusError) -> JSONResponse:
    """The answer to an agentbus error (its status from the table above)."""
    for error_type, status, kind in _STATUS:
        if isinstance(exc, error_type):
            extra: dict[str, Any] = {}
            if isinstance(exc, RateLimited):
                extra["retry_after"] = exc.retry_after
            if isinstance(exc, ConcurrencyConflict):
                extra["actual_position"] = exc.actual
            if isinstance(exc, ApprovalAlreadyDecided):
                extra["original"] = exc.original.as_dict()
            return problem(status, type(exc).__name__, str(exc), kind, **extra)
    log.error("unmapped error", error=repr(exc))
    return _internal()


def unexpected_problem(exc: Exception) -> JSONResponse:
    """The answer to an error nothing expected: logged with its traceback, answered 500
    without its details (the app's handler, and the fast path ahead of it)."""
    log.exception("unhandled error", error=repr(exc))
    return _internal()


def _internal() -> JSONResponse:
    return problem(500, "Internal error", "an unexpected error occurred", "internal")


def install_problem_handlers(app: FastAPI) -> None:
    async def on_agentbus_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AgentbusError)
        return agentbus_problem(exc)

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
        return unexpected_problem(exc)

    app.add_exception_handler(AgentbusError, on_agentbus_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
    _document_problems(app)


def _document_problems(app: FastAPI) -> None:
    """Put `Problem` in the OpenAPI components, for the `$ref`s of `problem_responses`, and
    document what every route may answer whatever it does: with a body, 400 (not readable as
    JSON) and 413 (`BodyLimit`); with parameters or a body, 422 as problem+json (FastAPI
    would document its own JSON shape, which `on_validation_error` replaces)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()  # FastAPI keeps it in app.openapi_schema: updated in place
        _, definitions = models_json_schema(
            [(Problem, "serialization")], ref_template="#/components/schemas/{model}"
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(definitions["$defs"])
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                statuses = [400, 413, 422] if "requestBody" in operation else []
                if "422" in responses or operation.get("parameters"):
                    statuses.append(422)
                for status, response in problem_responses(*statuses).items():
                    if PROBLEM_JSON not in responses.get(str(status), {}).get("content", {}):
                        responses[str(status)] = response
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
