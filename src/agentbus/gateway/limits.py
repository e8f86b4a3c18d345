"""Request limits: body size, and a per-caller rate limit (token bucket, 429 + Retry-After).

The rate limit is kept per gateway process: with N replicas a caller gets at most N times the
rate. Good enough to stop a runaway client; a cluster-wide limit would need shared state."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from agentbus.errors import AgentbusError


class RateLimited(AgentbusError):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"rate limit exceeded: retry in {self.retry_after}s")


class BodyTooLarge(AgentbusError):
    pass


@dataclass
class RateLimiter:
    rate: float = 50.0
    """Requests per second, sustained."""
    burst: float = 100.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def check(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited((1 - tokens) / self.rate)
        self._buckets[key] = (tokens - 1, now)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413, problem+json)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0

        async def limited() -> dict[str, object]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body over {self.limit} bytes")
            return message  # type: ignore[return-value]

        await self.app(scope, limited, send)


async def _too_large(send: Send, limit: int) -> None:
    import orjson

    body = orjson.dumps(
        {
            "type": "https://agentbus.dev/problems/body-too-large",
            "title": "Payload too large",
            "status": 413,
            "detail": f"request body over {limit} bytes",
        }
    )
    await send_response(send, 413, b"application/problem+json", body)


async def send_response(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    """Answer with the whole of `body`: one `http.response.start` (with its content type and
    length) and one `http.response.body`. For middleware answering on its own, ahead of any
    framework (no Response object to build: `FastIngest` is the hot path)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
