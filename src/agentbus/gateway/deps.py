"""FastAPI dependencies: the platform, who is calling, and their access to the workspace in
the path (authenticated, member with a role that allows the operation, under the rate limit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from agentbus.gateway.auth import COOKIE, Identities, Permission, Principal
from agentbus.gateway.limits import RateLimiter
from agentbus.runtime.platform import Platform


def platform(request: Request) -> Platform:
    value: Platform = request.app.state.platform
    return value


def identities(request: Request) -> Identities:
    value: Identities = request.app.state.identities
    return value


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


@dataclass(frozen=True, slots=True)
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
PlatformDep = Annotated[Platform, Depends(platform)]
