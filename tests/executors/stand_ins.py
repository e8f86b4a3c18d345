"""Local servers the executor tests talk to: an OpenAI-compatible chat completions endpoint and
an agent service for the `http` executor. Both bind 127.0.0.1 on a free port and run in a
thread of their own (uvicorn), so that the tests' event loop has nothing to do with them."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

STAND_IN_MODEL = "stand-in-model-v1"


class LocalServer:
    """An ASGI app served by uvicorn on 127.0.0.1, on a free port, in a thread."""

    def __init__(self, app: Starlette) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> LocalServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the stand-in server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


# --- OpenAI-compatible chat completions ---------------------------------------------------
#
# The requested `model` picks the behaviour: chat, tools, no-usage, json, slow, malformed,
# truncated, stream-error, error-<status>.


def openai_app(received: list[dict[str, Any]]) -> Starlette:
    async def completions(request: Request) -> Response:
        body = await request.json()
        received.append({"headers": dict(request.headers), "body": body})
        mode: str = body["model"]
        if mode.startswith("error-"):
            status = int(mode.removeprefix("error-"))
            error = {"message": f"stand-in refuses with {status}", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=status)
        if mode == "json":
            return JSONResponse(_completion())
        return StreamingResponse(_sse(mode, body), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": STAND_IN_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": STAND_IN_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0},
    }


def _tool_fragment(
    index: int, *, call_id: str | None = None, name: str | None = None, arguments: str
) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name:
        function["name"] = name
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        call |= {"id": call_id, "type": "function"}
    return _chunk({"tool_calls": [call]})


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": STAND_IN_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "not streamed"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


async def _sse(mode: str, body: dict[str, Any]) -> AsyncIterator[str]:
    def event(payload: Any) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    wants_usage = body.get("stream_options", {}).get("include_usage") is True
    yield ": a comment, as some servers send to keep the connection alive\n\n"
    yield event(_chunk({"role": "assistant", "content": ""}))
    match mode:
        case "chat" | "no-usage":
            for piece in ["Hello", ",", " world"]:
                yield event(_chunk({"content": piece}))
            yield event(_chunk({}, "stop"))
            if mode == "chat" and wants_usage:
                yield event(_usage(len(body["messages"]) * 10, 3))
            yield "data: [DONE]\n\n"
        case "tools":
            yield event(_chunk({"content": "Let me check."}))
            yield event(_tool_fragment(0, call_id="call_1", name="get_weather", arguments=""))
            yield event(_tool_fragment(0, arguments='{"city": '))
            yield event(_tool_fragment(0, arguments='"Paris"}'))
            yield event(_tool_fragment(1, call_id="call_2", name="get_time", arguments="{}"))
            yield event(_chunk({}, "tool_calls"))
            yield event(_usage(20, 9))
            yield "data: [DONE]\n\n"
        case "slow":
            yield event(_chunk({"content": "Hel"}))
            await asyncio.sleep(5)
            yield "data: [DONE]\n\n"
        case "malformed":
            yield event(_chunk({"content": "Hel"}))
            yield 'data: {"choices": [{"delta": \n\n'
        case "truncated":
            yield event(_chunk({"content": "Hel"}))
        case "stream-error":
            yield event(_chunk({"content": "Hel"}))
            yield event({"error": {"message": "the model is overloaded", "type": "server_error"}})


# --- An agent service for the `http` executor --------------------------------------------


def agent_service_app(received: dict[str, list[dict[str, Any]]]) -> Starlette:
    """Routes: /reply (needs `Bearer s3cret`), /flaky (500 once per run, then 200), /bad (400),
    /down (503), /slow (2 s), /garbage (200 without JSON). Requests are recorded by path."""
    seen_runs: defaultdict[str, int] = defaultdict(int)

    async def handle(request: Request) -> Response:
        body = await request.json()
        path = request.url.path
        received[path].append({"headers": dict(request.headers), "body": body})
        reply = {
            "output": f"agent says: {body['input']}",
            "usage": {"model": "service-model", "tokens_in": 7, "tokens_out": 3},
        }
        match path:
            case "/reply":
                if request.headers.get("authorization") != "Bearer s3cret":
                    return JSONResponse({"detail": "who are you?"}, status_code=401)
                return JSONResponse(reply)
            case "/flaky":
                seen_runs[body["run_id"]] += 1
                if seen_runs[body["run_id"]] == 1:
                    return PlainTextResponse("boom: try again", status_code=500)
                return JSONResponse({"output": "second time lucky"})
            case "/bad":
                return JSONResponse({"detail": "input must not be empty"}, status_code=400)
            case "/down":
                return PlainTextResponse("upstream is down for maintenance", status_code=503)
            case "/slow":
                await asyncio.sleep(2)
                return JSONResponse(reply)
            case _:
                return PlainTextResponse("<html>not JSON</html>")

    paths = ["/reply", "/flaky", "/bad", "/down", "/slow", "/garbage"]
    return Starlette(routes=[Route(path, handle, methods=["POST"]) for path in paths])
