"""`command`: an agent in a child process, speaking JSON-RPC 2.0 over stdio.

Each attempt starts `options["command"]` (an argv list; `cwd`, `env` additions and `timeout`
optional). Messages are JSON objects, one per line (UTF-8, `\\n`-terminated), on the child's
stdin and stdout; stdout carries nothing else (log to stderr: its last lines end up in the
error message if the child dies without answering).

agentbus sends one request::

    {"jsonrpc": "2.0", "id": 1, "method": "run", "params": {"run_id", "attempt", "workspace",
     "agent", "input", "session_id", "history": [{"role", "text"}, ...]}}

The child may send notifications while it works (unknown methods are ignored)::

    {"jsonrpc": "2.0", "method": "delta", "params": {"text": "..."}}
    {"jsonrpc": "2.0", "method": "progress", "params": {"kind": "...", "data": {...}}}
    {"jsonrpc": "2.0", "method": "usage",
     "params": {"model": "...", "tokens_in": 0, "tokens_out": 0}}

and ends with the response, either::

    {"jsonrpc": "2.0", "id": 1, "result": {"output": "..."}}
    {"jsonrpc": "2.0", "id": 1,
     "error": {"code": 1, "message": "...", "data": {"retryable": false}}}

An error response fails the attempt (class `executor`, retryable only if `data.retryable` is
true); a line that is not such a message fails it with class `protocol`; exiting without a
response fails it with class `executor`, quoting the exit code and the last lines of stderr. A
request from the child (a message with both `id` and `method`) is answered with JSON-RPC error
-32601. stdin stays open until the end of the attempt (later versions may send more on it).
If the child streamed no delta, the output of its result is sent to the live output as one.

The child never outlives the attempt: it runs in a process group of its own, which gets
SIGTERM, then SIGKILL after a grace period (2 s), when the attempt ends in any way (answer,
failure, timeout, cancellation). On Linux the child also gets SIGKILL from the kernel if the
worker dies (PR_SET_PDEATHSIG), even by `kill -9`; that covers the child itself, not processes
it started (those it must stop, or keep in its process group).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentbus.executors.executor import ExecutorError, RunOutput, RunRequest
from agentbus.executors.http import Usage, excerpt, parse_options, run_payload

_PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 16 * 1024 * 1024  # one protocol message; a reply may be long
_STDERR_LINE_LIMIT = 300
_METHOD_NOT_FOUND = -32601


class CommandOptions(BaseModel):
    """`options` of an agent run by the `command` executor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] = Field(min_length=1, description="argv: the program, then its arguments.")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="Added to the environment.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds for the attempt.")


class _Delta(BaseModel):
    text: str


class _Progress(BaseModel):
    kind: str = Field(min_length=1, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


class _Result(BaseModel):
    model_config = ConfigDict(extra="ignore")

    output: str


class _Error(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: int
    message: str
    data: Any = None


class CommandExecutor:
    name = "command"

    def __init__(self, stop_grace: float = 2.0, stderr_lines: int = 20) -> None:
        """`stop_grace`: seconds between SIGTERM and SIGKILL; `stderr_lines`: how many of the
        child's last stderr lines are kept for error messages."""
        self._stop_grace = stop_grace
        self._stderr_lines = stderr_lines

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        options = parse_options(CommandOptions, request.options, "command")
        process = await _start(options)
        stderr: deque[str] = deque(maxlen=self._stderr_lines)
        stderr_reader = asyncio.create_task(_keep_tail(process, stderr))
        try:
            async with asyncio.timeout(options.timeout) as deadline:
                return await _Conversation(process, output, stderr, stderr_reader).run(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ExecutorError(
                "timeout",
                f"{options.command[0]} did not answer within {options.timeout:g}s",
                retryable=True,
            ) from None
        finally:
            try:
                await _stop(process, self._stop_grace)
            finally:
                stderr_reader.cancel()


class _Conversation:
    """One attempt's exchange with the child, from the request to the response."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        output: RunOutput,
        stderr: deque[str],
        stderr_reader: asyncio.Task[None],
    ) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._output = output
        self._stderr = stderr
        self._stderr_reader = stderr_reader
        self._streamed = False

    async def run(self, request: RunRequest) -> str:
        await self._send(
            {"jsonrpc": "2.0", "id": 1, "method": "run", "params": run_payload(request)}
        )
        while True:
            try:
                line = await self._stdout.readline()
            except ValueError:  # longer than the limit: the rest of it is unreadable
                raise _protocol(f"a line longer than {_LINE_LIMIT} bytes") from None
            if not line:
                raise await self._exited()
            if not line.strip():
                continue
            result = await self._receive(line)
            if result is not None:
                if not self._streamed and result:
                    await self._output.delta(result)
                return result

    async def _receive(self, line: bytes) -> str | None:
        """Handle one message; the output if it is the response."""
        try:
            message = json.loads(line)
        except ValueError:
            raise _protocol(f"not JSON: {_quote(line)}") from None
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            raise _protocol(f"not a JSON-RPC 2.0 message: {_quote(line)}")
        method = message.get("method")
        if "id" in message and method is None:
            return self._response(message, line)
        if not isinstance(method, str):
            raise _protocol(f"neither a response nor a notification: {_quote(line)}")
        if "id" in message:
            await self._send(
                {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "error": {"code": _METHOD_NOT_FOUND, "message": f"unknown method {method}"},
                }
            )
            return None
        await self._notification(method, message.get("params"), line)
        return None

    def _response(self, message: dict[str, Any], line: bytes) -> str:
        if message["id"] != 1:
            raise _protocol(f"a response to an unknown request id: {_quote(line)}")
        try:
            if "error" in message:
                error = _Error.model_validate(message["error"])
            else:
                return _Result.model_validate(message.get("result")).output
        except ValidationError:
            raise _protocol(f"a malformed response: {_quote(line)}") from None
        retryable = isinstance(error.data, dict) and error.data.get("retryable") is True
        raise ExecutorError("executor", f"{error.message} (code {error.code})", retryable=retryable)

    async def _notification(self, method: str, params: object, line: bytes) -> None:
        try:
            match method:
                case "delta":
                    delta = _Delta.model_validate(params)
                    if delta.text:
                        self._streamed = True
                        await self._output.delta(delta.text)
                case "progress":
                    progress = _Progress.model_validate(params)
                    await self._output.progress(progress.kind, progress.data)
                case "usage":
                    usage = Usage.model_validate(params)
                    await self._output.usage(usage.model, usage.tokens_in, usage.tokens_out)
                case _:
                    pass  # a notification from a newer protocol: nothing to do with it
        except ValidationError:
            raise _protocol(f"malformed {method} params: {_quote(line)}") from None

    async def _send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
        # A child that already exited is reported by the read that follows, with its code.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self._stdin.drain()

    async def _exited(self) -> ExecutorError:
        """The child closed its stdout without answering."""
        try:
            async with asyncio.timeout(1.0):
                code: int | None = await self._process.wait()
        except TimeoutError:
            code = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await asyncio.shield(self._stderr_reader)
        if code is None:
            how = "closed its stdout without answering"
        elif code < 0:
            how = f"was killed by signal {-code} before answering"
        else:
            how = f"exited with code {code} before answering"
        tail = "\n".join(self._stderr)
        stderr = f"; last lines of stderr:\n{tail}" if tail else " (nothing on stderr)"
        return ExecutorError("executor", f"the command {how}{stderr}", retryable=False)


def _protocol(what: str) -> ExecutorError:
    return ExecutorError("protocol", f"the command sent {what}", retryable=False)


def _quote(line: bytes) -> str:
    return excerpt(line.decode(errors="replace"), 200)


async def _start(options: CommandOptions) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *options.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=options.cwd,
            env={**os.environ, **options.env},
            limit=_LINE_LIMIT,
            process_group=0,  # its own group, named by its pid: stopped as a whole
            preexec_fn=_die_with_parent() if sys.platform == "linux" else None,
        )
    except OSError as exc:
        raise ExecutorError(
            "executor", f"cannot start {options.command[0]!r}: {exc}", retryable=False
        ) from exc


def _die_with_parent() -> Callable[[], None]:
    """What the child runs before exec, on Linux: ask the kernel for SIGKILL when its parent
    dies (strictly: when the thread that forked it ends, here the event loop's thread)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here, not in the forked child
    parent = os.getpid()

    def arm() -> None:  # pragma: no cover - runs in the child before exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return arm


async def _stop(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM to the child's group, SIGKILL after `grace` seconds; SIGKILL to the group in any
    case at the end, for what the child may have left behind in it."""
    try:
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await process.wait()
    finally:
        _signal_group(process.pid, signal.SIGKILL)
        if process.stdin is not None:
            process.stdin.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await process.wait()


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


async def _keep_tail(process: asyncio.subprocess.Process, tail: deque[str]) -> None:
    """Read the child's stderr to its end (so that it never blocks on a full pipe), keeping the
    last lines."""
    assert process.stderr is not None
    while True:
        try:
            line = await process.stderr.readline()
        except ValueError:
            tail.append("(a very long line)")
            continue
        if not line:
            return
        text = line.decode(errors="replace").rstrip()
        if len(text) > _STDERR_LINE_LIMIT:
            text = text[: _STDERR_LINE_LIMIT - 1] + "…"
        tail.append(text)
