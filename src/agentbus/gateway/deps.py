"""FastAPI dependencies: the platform, who is calling, and their access to the workspace in
the path (authenticated, member with a role that allows the operation, under the rate limit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Path, Query, Request

from agentbus.gateway.auth import COOKIE, Identities, Permission, Principal
from agentbus.gateway.limits import RateLimiter
from agentbus.gateway.posting import SessionPosts
from agentbus.queries.consistency import ensure_written
from agentbus.runtime.platform import Platform
from agentbus.values import value


def platform(request: Request) -> Platform:
    value: Platform = request.app.state.platform
    return value


def identities(request: Request) -> Identities:
    value: Identities = request.app.state.identities
    return value


async def session_posts(request: Request) -> SessionPosts:
    """The process's views of the sessions it posts into."""
    posts: SessionPosts = request.app.state.session_posts
    return posts


async def caller(request: Request) -> Principal:
    ids = identities(request)
    principal = await ids.authenticate(
        request.headers.get("authorization"), request.cookies.get(COOKIE)
    )
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.check(principal.actor)
    return principal


Caller = Annotated[Principal, Depends(caller)]
WorkspaceId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
Id = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""A session, run or approval id in a path (what a subject token may hold)."""


@value
class Access:
    principal: Principal
    workspace: str
    role: str


def access(need: Permission) -> Callable[..., Awaitable[Access]]:
    async def check(request: Request, ws: WorkspaceId, principal: Caller) -> Access:
        role = await identities(request).authorize(principal, ws, need)
        return Access(principal, ws, role)

    return check


Reader = Annotated[Access, Depends(access("read"))]
Writer = Annotated[Access, Depends(access("write"))]
Admin = Annotated[Access, Depends(access("admin"))]
Auditor = Annotated[Access, Depends(access("audit"))]


async def _platform(request: Request) -> Platform:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request
    return platform(request)


PlatformDep = Annotated[Platform, Depends(_platform)]
SessionPostsDep = Annotated[SessionPosts, Depends(session_posts)]


async def min_position(
    request: Request,
    min_position: Annotated[
        int | None,
        Query(ge=0, description="wait until the read model has applied this stream position"),
    ] = None,
) -> int | None:
    """A query's `min_position`, refused at once (422) when the event history has not reached
    it, rather than held for the whole wait and answered 504."""
    if min_position:
        await ensure_written(platform(request).store, min_position)
    return min_position


MinPosition = Annotated[int | None, Depends(min_position)]
"""Read-your-writes: give it a default of None."""
