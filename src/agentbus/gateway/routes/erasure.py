"""Forgetting a data subject over HTTP: what `agentbus audit forget` does (docs/erasure.md).

Destroys the subject's key (their sealed fields read as `[erased]` everywhere from then on),
waits a second for every process to drop it, records `SubjectForgotten` (the read models erase
their copies when they reach it) and removes their runs' live output from LIVE. Irreversible,
so it takes a workspace admin (or, for a user's own data in `_system`, a system key).
Idempotent: repeating it answers what was done."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from agentbus.audit.erasure import Outcome, forget
from agentbus.events.identity import SYSTEM_WORKSPACE
from agentbus.events.subjects import AggregateRef
from agentbus.gateway.deps import Admin, Caller, PlatformDep, identities
from agentbus.gateway.problems import problem_responses
from agentbus.gateway.routes.admin import UserId, require_system
from agentbus.runtime.platform import Platform

router = APIRouter(prefix="/v1", tags=["erasure"])

_REASON = Field(default=None, min_length=1, max_length=500, description="why (recorded)")


class ForgetSubject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(
        min_length=1,
        max_length=200,
        description="the data subject: a message's author (a user id, or the author a channel "
        "gave)",
        examples=["ada"],
    )
    reason: str | None = _REASON


class ForgetUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = _REASON


class ForgetAnswer(BaseModel):
    outcome: Outcome = Field(
        description="destroyed: the key was destroyed now; completed: it had been destroyed by "
        "a forget that stopped before recording it, recorded now; already_forgotten: nothing "
        "to do; unknown: nothing of theirs was ever sealed, nothing to do"
    )
    key_id: str | None = Field(description="the key destroyed now (destroyed only)")
    position: int | None = Field(
        description="stream position of the `subject_forgotten` recorded now: pass it as "
        "`min_position` to read the read models after they erased their copies"
    )
    forgotten_at: datetime | None = Field(
        description="when it had been forgotten (already_forgotten only)"
    )
    live_purged: int = Field(
        description="messages of their runs' live output (token deltas, progress) removed "
        "from the LIVE stream"
    )


@router.post(
    "/workspaces/{ws}/data-subjects/forget",
    summary="Forget a data subject of the workspace (crypto-shredding; admin)",
    responses=problem_responses(401, 403, 404, 413, 422, 429, 503),
)
async def forget_subject(body: ForgetSubject, platform: PlatformDep, access: Admin) -> ForgetAnswer:
    return await _forget(
        platform, access.workspace, body.subject, access.principal.actor, body.reason
    )


@router.post(
    "/users/{user_id}/forget",
    summary="Forget a user's own data, their display name (crypto-shredding; system key)",
    responses=problem_responses(401, 403, 413, 422, 429, 503),
)
async def forget_user(
    user_id: UserId,
    request: Request,
    platform: PlatformDep,
    principal: Caller,
    body: Annotated[ForgetUser | None, Body()] = None,
) -> ForgetAnswer:
    require_system(principal)
    done = await _forget(
        platform, SYSTEM_WORKSPACE, user_id, principal.actor, body.reason if body else None
    )
    identities(request).forget(AggregateRef(SYSTEM_WORKSPACE, "user", user_id))
    return done


async def _forget(
    platform: Platform, workspace: str, subject: str, by: str, reason: str | None
) -> ForgetAnswer:
    sealer = platform.store.sealer
    assert sealer is not None  # the platform always seals (runtime/platform.py)
    done = await forget(platform.store, sealer, workspace, subject, by=by, reason=reason)
    return ForgetAnswer.model_validate(done, from_attributes=True)  # the same fields
