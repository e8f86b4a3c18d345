"""`http`: an agent behind an HTTP service of your own.

For each attempt agentbus POSTs the run as JSON (`run_payload`) to `options["url"]`, with
`Authorization: Bearer <token>` when a token is configured, and expects `{"output": "..."}`
back, optionally with `"usage": {"model", "tokens_in", "tokens_out"}`. The service does not
stream: the whole reply is sent to the live output as one delta when it arrives.

Network errors, timeouts and 5xx answers are retried here, with exponential backoff; a 4xx
answer fails at once. What is left when the executor gives up is an `ExecutorError` that the
run may retry as a whole (timeout, network, 5xx, 408, 429) or not (other 4xx).

This module is also where executors talk HTTP: `openai` reuses its error mapping, and
`command` sends its child the same `run_payload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentbus.executors.executor import ExecutorError, RunOutput, RunRequest

log = structlog.get_logger("agentbus.executors")

_Options = TypeVar("_Options", bound=BaseModel)


def run_payload(request: RunRequest) -> dict[str, Any]:
    """What an agent service (or a `command` child) receives for one attempt."""
    return {
        "run_id": request.run_id,
        "attempt": request.attempt,
        "workspace": request.workspace,
        "agent": request.agent,
        "input": request.input,
        "session_id": request.session_id,
        "history": [{"role": turn.role, "text": turn.text} for turn in request.history],
        # The tokens the run's budget reserved for this attempt (null: no budget applies): an
        # agent that can cap its model's output should (docs/budgets.md).
        "max_tokens": request.max_tokens,
    }


class Usage(BaseModel):
    """Tokens an agent reports having spent on the attempt."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1, max_length=200)
    tokens_in: int = Field(ge=0)
    tokens_out: int = Field(ge=0)


class HttpOptions(BaseModel):
    """`options` of an agent run by the `http` executor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1)
    token: str | None = None
    token_env: str | None = Field(default=None, min_length=1)
    timeout: float = Field(default=60.0, gt=0, description="Seconds for one request, in all.")
    connect_timeout: float = Field(default=5.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10, description="Retries after the first request.")
    backoff: float = Field(default=0.2, ge=0, description="Seconds before the first retry.")


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    output: str
    usage: Usage | None = None


class HttpStatusError(ExecutorError):
    """The server answered with a status other than 2xx."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__("http_status", message, retryable=status >= 500 or status in (408, 429))


class HttpExecutor:
    name = "http"

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        """`client`: a shared client (owned by the caller) to pool connections across runs;
        without one, each run opens and closes its own."""
        self._client = client

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        options = parse_options(HttpOptions, request.options, "http")
        headers = bearer_header(options.token, options.token_env, "token")
        payload = run_payload(request)
        async with client_session(self._client) as client:
            retry = 0
            while True:
                try:
                    reply = await self._post(client, options, headers, payload)
                    break
                except ExecutorError as error:
                    if retry >= options.retries or not _worth_retrying_now(error):
                        raise
                    delay = options.backoff * 2**retry
                    retry += 1
                    log.info(
                        "http executor retrying",
                        run_id=request.run_id,
                        error_class=error.error_class,
                        error=str(error),
                        retry=retry,
                        delay=delay,
                    )
                    await asyncio.sleep(delay)
        if reply.output:
            await output.delta(reply.output)
        if reply.usage is not None:
            await output.usage(reply.usage.model, reply.usage.tokens_in, reply.usage.tokens_out)
        return reply.output

    async def _post(
        self,
        client: httpx.AsyncClient,
        options: HttpOptions,
        headers: Mapping[str, str],
        payload: Mapping[str, Any],
    ) -> _Reply:
        timeout = httpx.Timeout(
            options.timeout, connect=min(options.connect_timeout, options.timeout)
        )
        try:
            # httpx times each read and write; the option bounds the whole request.
            async with asyncio.timeout(options.timeout):
                response = await client.post(
                    options.url, json=payload, headers=headers, timeout=timeout
                )
        except TimeoutError:
            raise ExecutorError(
                "timeout",
                f"no answer from {redact(options.url)} within {options.timeout:g}s",
                retryable=True,
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc, options.url) from exc
        if not response.is_success:
            raise status_error(response.status_code, options.url, response.text)
        try:
            return _Reply.model_validate_json(response.content)
        except ValidationError:
            raise ExecutorError(
                "protocol",
                f"{redact(options.url)} answered {response.status_code} without "
                f'{{"output": "..."}}: {excerpt(response.text)}',
                retryable=False,
            ) from None


def _worth_retrying_now(error: ExecutorError) -> bool:
    if isinstance(error, HttpStatusError):
        return error.status >= 500
    return error.error_class in ("timeout", "network")


def parse_options(model: type[_Options], options: Mapping[str, Any], executor: str) -> _Options:
    """The agent's options read into `model`; an `ExecutorError` naming every bad field."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'options'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ExecutorError(
            "executor", f"invalid options for the {executor} executor: {problems}", retryable=False
        ) from None


def bearer_header(secret: str | None, secret_env: str | None, option: str) -> dict[str, str]:
    """`Authorization: Bearer ...` from an option given inline or as the name of an
    environment variable (`<option>_env`), read at each run so that rotation needs no restart."""
    if secret is None and secret_env is not None:
        secret = os.environ.get(secret_env)
        if not secret:
            raise ExecutorError(
                "executor",
                f"{option}_env names the environment variable {secret_env}, which is not set",
                retryable=False,
            )
    return {"Authorization": f"Bearer {secret}"} if secret else {}


@contextlib.asynccontextmanager
async def client_session(shared: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    """The shared client if there is one, else a client for this run only."""
    if shared is not None:
        yield shared
        return
    async with httpx.AsyncClient() as client:
        yield client


def status_error(status: int, url: str, body: str) -> HttpStatusError:
    """A non-2xx answer: retryable for 5xx, 408 and 429."""
    return HttpStatusError(status, f"HTTP {status} from {redact(url)}: {excerpt(body)}")


def transport_error(exc: httpx.HTTPError | httpx.InvalidURL, url: str) -> ExecutorError:
    """An `httpx` failure as an `ExecutorError`: timeouts and network errors are retryable;
    an unusable URL is not."""
    where = redact(url)
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return ExecutorError("executor", f"unusable URL {where}: {exc}", retryable=False)
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting to",
            httpx.ReadTimeout: "waiting for data from",
            httpx.WriteTimeout: "sending to",
            httpx.PoolTimeout: "waiting for a connection to",
        }.get(type(exc), "talking to")
        return ExecutorError("timeout", f"timed out {phase} {where}", retryable=True)
    if isinstance(exc, httpx.TransportError):
        detail = str(exc) or type(exc).__name__
        return ExecutorError("network", f"{where}: {detail}", retryable=True)
    return ExecutorError("protocol", f"{where}: {type(exc).__name__}: {exc}", retryable=False)


def redact(url: str) -> str:
    """`url` without credentials or query string, for messages that are stored and shown."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "(invalid URL)"
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


def excerpt(text: str, limit: int = 300) -> str:
    """The start of a response body on one line, for an error message."""
    flat = re.sub(r"\s+", " ", text).strip()
    if not flat:
        return "(empty body)"
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
