"""`openai`: any OpenAI-compatible `/v1/chat/completions` endpoint, streamed.

OpenAI itself, vLLM, llama.cpp, Ollama, LM Studio, LiteLLM, ... One request per attempt, with
`stream: true` and `stream_options: {"include_usage": true}`. Content deltas go to the live
output as they arrive; each tool call the model makes is reported once, complete, as
`progress("tool_call", {"id", "name", "arguments"})` (`arguments`: the JSON text the model
wrote); a call whose tool name matches an `approval_tools` pattern then goes through
`request_approval` once the response is read, and its outcome is reported as
`progress("tool_approval", ...)`. Token usage is recorded from the final usage chunk; a server
that sends none records none (nothing is estimated). A server that ignores `stream` and answers
with one JSON completion is read as well.

Nothing is retried here: a failure is an `ExecutorError` and the run decides (see
`agentbus.executors.http.transport_error` and `status_error` for the classes).
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentbus.executors.executor import ExecutorError, RunOutput, RunRequest
from agentbus.executors.http import (
    bearer_header,
    client_session,
    excerpt,
    parse_options,
    redact,
    status_error,
    transport_error,
)

_ERROR_BODY_LIMIT = 8192


class OpenAIOptions(BaseModel):
    """`options` of an agent run by the `openai` executor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1, description="e.g. https://api.openai.com/v1")
    model: str = Field(min_length=1)
    api_key: str | None = None
    api_key_env: str | None = Field(default=None, min_length=1)
    system: str | None = None
    timeout: float = Field(default=60.0, gt=0, description="Seconds to connect / between reads.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    approval_tools: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="glob patterns of tool names whose calls need approval (see approvals.md)",
    )


# The parts of a chunk (or of a whole completion) that are read; the rest is ignored.


class _Function(BaseModel):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(BaseModel):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Message(BaseModel):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(BaseModel):
    index: int = 0
    delta: _Message | None = None
    message: _Message | None = None
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)


class _Chunk(BaseModel):
    """A `chat.completion.chunk`, or a whole `chat.completion`, or an error object."""

    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: dict[str, Any] | str | None = None


class OpenAIExecutor:
    name = "openai"

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        """`client`: a shared client (owned by the caller) to pool connections across runs;
        without one, each run opens and closes its own."""
        self._client = client

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        options = parse_options(OpenAIOptions, request.options, "openai")
        url = options.base_url.rstrip("/") + "/chat/completions"
        headers = bearer_header(options.api_key, options.api_key_env, "api_key")
        headers["Accept"] = "text/event-stream"
        body: dict[str, Any] = {
            "model": options.model,
            "messages": _messages(options, request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if request.max_tokens is not None:
            # What the budget reserved caps the output: the prompt counts too, so a long one
            # can still overrun the reservation (recorded as `overrun`, see budgets.md).
            body["max_tokens"] = request.max_tokens
        reply = _Reply(output, options.model, redact(url), options.approval_tools)
        async with client_session(self._client) as client:
            try:
                async with client.stream(
                    "POST", url, json=body, headers=headers, timeout=httpx.Timeout(options.timeout)
                ) as response:
                    if not response.is_success:
                        raise status_error(response.status_code, url, await _start_of(response))
                    if response.headers.get("content-type", "").startswith("application/json"):
                        await reply.read_completion(await response.aread())
                    else:
                        await reply.read_stream(_sse_data(response.aiter_lines()))
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise transport_error(exc, url) from exc
        await reply.record_usage()
        await reply.ask_approvals()
        return reply.text


def _messages(options: OpenAIOptions, request: RunRequest) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": options.system}] if options.system else []
    messages += [{"role": turn.role, "content": turn.text} for turn in request.history]
    messages.append({"role": "user", "content": request.input})
    return messages


class _Reply:
    """What the model has said so far: its text, tool calls being assembled, its usage."""

    def __init__(
        self, output: RunOutput, model: str, where: str, approval_tools: list[str] | None = None
    ) -> None:
        self._output = output
        self._approval_tools = approval_tools or []
        self._to_approve: list[tuple[str | None, str, str]] = []
        self._model = model
        self._where = where
        self._parts: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # by index, until reported
        self._usage: tuple[str, int, int] | None = None
        self._finished = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    async def read_stream(self, events: AsyncIterator[str]) -> None:
        async for data in events:
            if data.strip() == "[DONE]":
                break
            await self._read(self._parse(data), streamed=True)
        else:
            if not self._finished:
                raise ExecutorError(
                    "protocol",
                    f"the stream from {self._where} ended before a finish_reason or [DONE]",
                    retryable=False,
                )
        await self._report_tool_calls()

    async def read_completion(self, body: bytes) -> None:
        await self._read(self._parse(body), streamed=False)
        await self._report_tool_calls()

    async def record_usage(self) -> None:
        if self._usage is not None:
            await self._output.usage(*self._usage)

    def _parse(self, data: str | bytes) -> _Chunk:
        try:
            return _Chunk.model_validate_json(data)
        except ValidationError:
            text = data if isinstance(data, str) else data.decode(errors="replace")
            raise ExecutorError(
                "protocol",
                f"malformed chunk from {self._where}: {excerpt(text, 200)}",
                retryable=False,
            ) from None

    async def _read(self, chunk: _Chunk, *, streamed: bool) -> None:
        if chunk.error:
            raise _stream_error(chunk.error, self._where)
        usage = chunk.usage
        if usage and usage.prompt_tokens is not None and usage.completion_tokens is not None:
            self._usage = (chunk.model or self._model, usage.prompt_tokens, usage.completion_tokens)
        for choice in chunk.choices or ():
            if choice.index != 0:  # one completion is asked for (n = 1)
                continue
            message = (choice.delta if streamed else choice.message) or _Message()
            if message.content:
                self._parts.append(message.content)
                await self._output.delta(message.content)
            for call in message.tool_calls or ():
                self._add_tool_call(call)
            if choice.finish_reason:
                self._finished = True
                await self._report_tool_calls()

    def _add_tool_call(self, fragment: _ToolCall) -> None:
        # The first fragment of a call carries its id and name, later ones pieces of its
        # arguments. Servers that omit `index` send each call whole, with an id.
        index = fragment.index
        if index is None and fragment.id:
            known = (i for i, call in self._calls.items() if call["id"] == fragment.id)
            index = next(known, max(self._calls, default=-1) + 1)
        elif index is None:
            index = max(self._calls, default=0)
        call = self._calls.setdefault(index, {"id": None, "name": "", "arguments": []})
        if fragment.id:
            call["id"] = fragment.id
        if fragment.function is not None:
            if fragment.function.name:
                call["name"] += fragment.function.name
            if fragment.function.arguments:
                call["arguments"].append(fragment.function.arguments)

    async def _report_tool_calls(self) -> None:
        calls, self._calls = self._calls, {}
        for index in sorted(calls):
            call = calls[index]
            arguments = "".join(call["arguments"])
            await self._output.progress(
                "tool_call", {"id": call["id"], "name": call["name"], "arguments": arguments}
            )
            if any(fnmatch.fnmatchcase(call["name"], p) for p in self._approval_tools):
                self._to_approve.append((call["id"], call["name"], arguments))

    async def ask_approvals(self) -> None:
        """Ask approval for the tool calls that need it, once the response has been read
        whole (a person may take long; the connection is not held open meanwhile)."""
        calls, self._to_approve = self._to_approve, []
        for call_id, name, arguments in calls:
            await self._ask_approval(call_id, name, arguments)

    async def _ask_approval(self, call_id: str | None, name: str, arguments: str) -> None:
        """A tool call that needs approval: ask, and report the outcome (nothing executes
        tools here; a caller acting on `tool_call` progress waits for `tool_approval`)."""
        try:
            parsed = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {"arguments": arguments}  # what the model wrote, approved as it is
        decision = await self._output.request_approval(name, parsed, None)
        await self._output.progress(
            "tool_approval",
            {
                "id": call_id,
                "name": name,
                "approval_id": decision.approval_id,
                "decision": decision.decision,
                "by": decision.by,
                "reason": decision.reason,
                "explanation": decision.explain(),
            },
        )


def _stream_error(error: dict[str, Any] | str, where: str) -> ExecutorError:
    """An error object sent in place of a chunk (after a 200, so there is no status)."""
    if isinstance(error, str):
        error = {"message": error}
    code = error.get("code")
    retryable = error.get("type") == "server_error" or (
        isinstance(code, int) and (code >= 500 or code in (408, 429))
    )
    message = excerpt(str(error.get("message") or error), 500)
    return ExecutorError("executor", f"{where} reported an error: {message}", retryable=retryable)


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
        # Comments (":..."), `event`, `id` and `retry` carry nothing chat completions use.
    if data:
        yield "\n".join(data)


async def _start_of(response: httpx.Response) -> str:
    """At most the first few KiB of an error body."""
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= _ERROR_BODY_LIMIT:
            break
    text = body[:_ERROR_BODY_LIMIT].decode(errors="replace")
    return _error_message(text) or text


def _error_message(text: str) -> str | None:
    """`error.message` of an OpenAI-style error body, if that is what it is."""
    try:
        chunk = _Chunk.model_validate_json(text)
    except ValidationError:
        return None
    if isinstance(chunk.error, dict) and isinstance(chunk.error.get("message"), str):
        return str(chunk.error["message"])
    return chunk.error if isinstance(chunk.error, str) else None
