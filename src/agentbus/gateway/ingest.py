"""The gateway's hot path, posting a message, answered ahead of FastAPI and its middleware.

`POST /v1/workspaces/{ws}/sessions/{sid}/messages` is the request channels and chat pages make
for every message. Through FastAPI, routing, dependency solving and the middleware stack took
about as much CPU as the post itself (docs/benchmarks.md, `http_ingest`). `FastIngest` is the
first thing the gateway app runs (`GatewayApp.__call__`); it answers that one request with the
route's own steps, in plain code: the path's ids, the `Idempotency-Key` and the body checked
with the route's own constraints and model, the caller authenticated, rate limited and
authorized for `write` exactly as the route's dependencies do, then `post_message_as`, the
function the route itself calls, whose answer has the route's response model's fields.

Whatever it does not take as it is goes to FastAPI untouched, with the body it read handed
on: another method or path, an id or header the route's constraints refuse, a body without a
`Content-Length` or over the body limit (`BodyLimit` answers those), a body the model refuses.
So every validation error is the route's own answer, and the route in
`routes/conversations.py` stays what the OpenAPI document describes and what this follows.
Errors once the request is taken (authentication, the session's refusal, the store) are
answered here, through the same problem mapping as everywhere else; an unexpected one is
logged and answered 500, as the app's own handler does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import orjson
from pydantic import ValidationError
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentbus.audit.redaction import Redactor
from agentbus.errors import AgentbusError
from agentbus.gateway.auth import COOKIE, Identities
from agentbus.gateway.deps import Access
from agentbus.gateway.limits import RateLimiter, send_response
from agentbus.gateway.posting import SessionPosts
from agentbus.gateway.problems import agentbus_problem, unexpected_problem
from agentbus.gateway.routes.conversations import NewMessage, post_message_as

# The route's path, with its parameters' own constraints (`WorkspaceId`, `Id`).
_PATH: Final = re.compile(
    r"/v1/workspaces/([a-z0-9][a-z0-9_-]{0,63})/sessions/([A-Za-z0-9_-]{1,64})/messages"
)
_JSON: Final = (b"application/json", b"application/json; charset=utf-8")
_NEW_MESSAGE: Final = NewMessage.__pydantic_validator__


@dataclass(frozen=True, slots=True)
class Serving:
    """What posting needs, given by the gateway app's lifespan: the same objects the route's
    dependencies find in the app's state (where each is a Python-level `__getattr__` away,
    ~2 µs of a post for the four)."""

    identities: Identities
    limiter: RateLimiter
    posts: SessionPosts
    redactor: Redactor


class FastIngest:
    """ASGI app: answers posts of messages itself, hands everything else to `app`."""

    def __init__(self, app: ASGIApp, body_limit: int) -> None:
        self.app = app
        self.body_limit = body_limit
        self.serving: Serving | None = None
        """Set while the app's lifespan runs; before it (and after), posts go to the route."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = self.serving
        if serving is None or scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = _PATH.fullmatch(scope["path"])
        if path is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        key = headers.get(b"idempotency-key")
        length = headers.get(b"content-length", b"")
        if (
            headers.get(b"content-type", b"").lower() not in _JSON
            or (key is not None and not 0 < len(key) <= 200)
            or not length.isdigit()
            or int(length) > self.body_limit
        ):
            await self.app(scope, receive, send)
            return
        ws, sid = path.groups()
        try:
            raw = await _body(receive)
            try:
                # = NewMessage.model_validate_json, without its Python wrapper (0.4 µs)
                body: NewMessage = _NEW_MESSAGE.validate_json(raw)
            except ValidationError:
                # The route's own answer: 401/403/404 before 422, as its dependencies run first.
                await self.app(scope, _replay(raw), send)
                return
            authorization = _text(headers.get(b"authorization"))
            # An Authorization header is all `authenticate` looks at when there is one: the
            # cookies are parsed only without it.
            ids = serving.identities
            principal = await ids.authenticate(
                authorization, None if authorization else _cookie(headers.get(b"cookie"))
            )
            serving.limiter.check(principal.actor)
            role = await ids.authorize(principal, ws, "write")
            answer = await post_message_as(
                ids,
                serving.redactor,
                serving.posts,
                Access(principal, ws, role),
                sid,
                body,
                _text(key),
                scope["path"],
            )
        except AgentbusError as exc:
            await agentbus_problem(exc)(scope, receive, send)
            return
        except Exception as exc:  # as the app's own handler: logged, answered 500
            await unexpected_problem(exc)(scope, receive, send)
            return
        await send_response(send, 202, b"application/json", orjson.dumps(answer))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _cookie(header: bytes | None) -> str | None:
    return None if header is None else cookie_parser(header.decode("latin-1")).get(COOKIE)


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """A `receive` that hands on a body already read."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
