"""Approvals: list and read them (the `approvals` read model), decide them (an API caller, or
the holder of a signed link), mint signed links, set the workspace's rules. See
docs/approvals.md.

Deciding answers 202 once the decision is durable; the same caller deciding the same again
answers 202 with `duplicate: true`; any other later decision is a 409 whose `original` member
is the decision that stands. Links need no credentials: the signature is the authority, and
each link works once (a replay is a 409, an expired link a 410)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agentbus.domain.approval import (
    APPROVAL,
    ApprovalAlreadyDecided,
    ApprovalHasExpired,
    ApprovalNotFound,
    Verdict,
    approval_ref,
    approval_rules,
    decide_approval,
    set_approval_rules,
)
from agentbus.domain.approval_link import LinkClaims, LinkMismatch, sign_link, verify_link
from agentbus.domain.handling import Handled, load
from agentbus.events.approval import MAX_RULES, ApprovalRule, Decision
from agentbus.events.envelope import EventContext
from agentbus.gateway.deps import Admin, Caller, Id, MinPosition, PlatformDep, Reader, Writer
from agentbus.gateway.problems import PROBLEM_JSON, problem_responses
from agentbus.gateway.routes.admin import context, require_system
from agentbus.queries.approvals import ApprovalRow, get_approval, list_approvals
from agentbus.runtime.link_keys import link_keys, rotate_link_key

router = APIRouter(prefix="/v1")

_STRICT = ConfigDict(extra="forbid")
Token = Annotated[str, Path(min_length=1, max_length=2048, description="the signed link token")]
MAX_LINK_LIFETIME = timedelta(days=7)
_GONE: dict[int | str, dict[str, Any]] = {
    410: {
        "description": "The approval (or the link) expired",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}
READ = problem_responses(401, 404, 422, 429, 503, 504)
COMMAND = {**problem_responses(401, 403, 404, 409, 413, 422, 429, 503), **_GONE}
LINK = {**problem_responses(403, 404, 409, 413, 422, 429, 503), **_GONE}


class ApprovalOut(BaseModel):
    id: str
    run_id: str
    attempt: int
    session_id: str | None
    tool: str
    arguments_digest: str
    arguments_preview: str
    reason: str | None
    requested_by: str
    status: Literal["pending", "granted", "denied", "expired"]
    requested_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    rule: str | None = Field(description="the rule that decided, when no person did")
    position: int

    @classmethod
    def of(cls, row: ApprovalRow) -> ApprovalOut:
        return cls.model_validate(row, from_attributes=True)


class ApprovalPage(BaseModel):
    approvals: list[ApprovalOut]
    next_cursor: str | None


class DecisionIn(BaseModel):
    model_config = _STRICT
    decision: Decision
    reason: str | None = Field(
        default=None, max_length=2000, description="told to the agent (most useful on a denial)"
    )


class DecisionOut(BaseModel):
    id: str = Field(description="the approval")
    decision: Literal["granted", "denied", "expired"]
    by: str | None
    reason: str | None
    position: int = Field(description="the approval's last stream position")
    duplicate: bool = Field(description="true: this caller had made this decision already")

    @classmethod
    def of(cls, approval_id: str, done: Handled[Any]) -> DecisionOut:
        verdict: Verdict = done.state.verdict
        return cls(
            id=approval_id,
            decision=verdict.outcome,
            by=verdict.by,
            reason=verdict.reason,
            position=done.position,
            duplicate=not done.events,
        )


# ---------------------------------------------------------------------------- approvals


@router.get(
    "/workspaces/{ws}/approvals",
    tags=["approvals"],
    summary="Approvals, newest first",
    responses={**READ, **problem_responses(400)},
)
async def approvals(
    platform: PlatformDep,
    access: Reader,
    status: Annotated[
        Literal["pending", "decided"] | None,
        Query(description="pending, or decided (granted, denied, expired)"),
    ] = None,
    run_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    min_position: MinPosition = None,
) -> ApprovalPage:
    rows, following = await list_approvals(
        platform.engine,
        access.workspace,
        status=status,
        run_id=run_id,
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return ApprovalPage(approvals=[ApprovalOut.of(r) for r in rows], next_cursor=following)


@router.get(
    "/workspaces/{ws}/approvals/{aid}",
    tags=["approvals"],
    summary="One approval",
    responses=READ,
)
async def approval(
    aid: Id,
    platform: PlatformDep,
    access: Reader,
    min_position: MinPosition = None,
) -> ApprovalOut:
    row = await get_approval(platform.engine, access.workspace, aid, min_position=min_position)
    if row is None:
        raise ApprovalNotFound(f"approval {aid} not found")
    return ApprovalOut.of(row)


@router.post(
    "/workspaces/{ws}/approvals/{aid}/decide",
    status_code=202,
    tags=["approvals"],
    summary="Grant or deny a pending approval (the first decision wins)",
    responses=COMMAND,
)
async def decide(aid: Id, body: DecisionIn, platform: PlatformDep, access: Writer) -> DecisionOut:
    done = await decide_approval(
        platform.store,
        access.workspace,
        aid,
        body.decision,
        by=access.principal.actor,
        reason=body.reason,
        context=context(access.principal),
    )
    return DecisionOut.of(aid, done)


# ---------------------------------------------------------------------------- signed links


class LinkIn(BaseModel):
    model_config = _STRICT
    decision: Decision = Field(description="the one decision the link allows")
    expires_in: int = Field(
        default=86_400,
        ge=60,
        le=int(MAX_LINK_LIFETIME.total_seconds()),
        description="seconds (never past the approval's own expiry)",
    )
    decider: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="who the link is for, recorded as the decision's `by` (default: you)",
    )


class LinkOut(BaseModel):
    token: str
    path: str = Field(description="POST here to decide (no credentials needed)")
    decision: Decision
    decider: str
    expires_at: datetime
    jti: str


@router.post(
    "/workspaces/{ws}/approvals/{aid}/links",
    status_code=201,
    tags=["approvals"],
    summary="Mint a signed, single-use link that makes one decision",
    responses=COMMAND,
)
async def mint_link(aid: Id, body: LinkIn, platform: PlatformDep, access: Writer) -> LinkOut:
    state, _ = await load(platform.store, APPROVAL, approval_ref(access.workspace, aid))
    if state.status == "new":
        raise ApprovalNotFound(f"approval {aid} not found")
    if state.verdict is not None:
        raise ApprovalAlreadyDecided(state.verdict)
    assert state.expires_at is not None
    now = datetime.now(UTC)
    if now >= state.expires_at:
        raise ApprovalHasExpired(Verdict("expired", reason="its time ran out"))
    expires_at = min(now + timedelta(seconds=body.expires_in), state.expires_at)
    decider = body.decider or access.principal.actor
    claims = LinkClaims.new(access.workspace, aid, body.decision, decider, expires_at)
    keys = await link_keys(platform.nc)
    token = sign_link(claims, keys.signing_key, keys.current)
    return LinkOut(
        token=token,
        path=f"/v1/approval-links/{token}",
        decision=claims.decision,
        decider=decider,
        expires_at=claims.expiry,
        jti=claims.jti,
    )


class LinkInfo(BaseModel):
    workspace: str
    approval_id: str
    decision: Decision = Field(description="what using the link decides")
    decider: str
    expires_at: datetime
    tool: str
    arguments_preview: str
    reason: str | None
    status: Literal["pending", "granted", "denied", "expired"]


class LinkUse(BaseModel):
    model_config = _STRICT
    decision: Decision | None = Field(
        default=None, description="if given, must be the link's own decision"
    )
    reason: str | None = Field(default=None, max_length=2000)


async def _verified(request: Request, platform: PlatformDep, token: str) -> LinkClaims:
    client = request.client.host if request.client else "unknown"
    request.app.state.rate_limiter.check(f"link:{client}")
    keys = await link_keys(platform.nc)
    return verify_link(token, keys.keys)


@router.get(
    "/approval-links/{token}",
    tags=["approvals"],
    summary="What a signed link would decide (changes nothing)",
    responses=LINK,
)
async def link_info(token: Token, request: Request, platform: PlatformDep) -> LinkInfo:
    claims = await _verified(request, platform, token)
    ref = approval_ref(claims.workspace, claims.approval_id)
    state, _ = await load(platform.store, APPROVAL, ref)
    if state.status == "new":
        raise ApprovalNotFound(f"approval {claims.approval_id} not found")
    assert state.expires_at is not None
    return LinkInfo(
        workspace=claims.workspace,
        approval_id=claims.approval_id,
        decision=claims.decision,
        decider=claims.by,
        expires_at=claims.expiry,
        tool=state.tool,
        arguments_preview=state.arguments_preview,
        reason=state.reason,
        status=state.status,
    )


@router.post(
    "/approval-links/{token}",
    status_code=202,
    tags=["approvals"],
    summary="Decide through a signed link (no credentials; each link works once)",
    responses=LINK,
)
async def use_link(
    token: Token, request: Request, platform: PlatformDep, body: LinkUse | None = None
) -> DecisionOut:
    claims = await _verified(request, platform, token)
    if body is not None and body.decision not in (None, claims.decision):
        raise LinkMismatch(f"this link can only make the decision {claims.decision!r}")
    done = await decide_approval(
        platform.store,
        claims.workspace,
        claims.approval_id,
        claims.decision,
        by=claims.by,
        reason=body.reason if body else None,
        jti=claims.jti,
        context=EventContext(source="agentbus/gateway", actor=f"link:{claims.jti}"),
    )
    return DecisionOut.of(claims.approval_id, done)


class RotatedKeys(BaseModel):
    current: str = Field(description="the key id new links are signed with")
    kids: list[str] = Field(description="every key id links are still verified with")


class RotateIn(BaseModel):
    model_config = _STRICT
    keep: int = Field(
        default=3, ge=1, le=10, description="keys kept, the new one included (1: void all links)"
    )


@router.post(
    "/approval-link-keys/rotate",
    tags=["approvals"],
    summary="Rotate the key that signs approval links (system key)",
    responses=problem_responses(401, 403, 413, 422, 429, 503),
)
async def rotate_keys(
    platform: PlatformDep, principal: Caller, body: RotateIn | None = None
) -> RotatedKeys:
    require_system(principal)
    keys = await rotate_link_key(platform.nc, keep=body.keep if body else 3)
    return RotatedKeys(current=keys.current, kids=list(keys.keys))


# ---------------------------------------------------------------------------- rules


class RulesIn(BaseModel):
    model_config = _STRICT
    rules: list[ApprovalRule] = Field(
        max_length=MAX_RULES, description="in order: the first matching rule decides; none: ask"
    )


class RulesOut(BaseModel):
    rules: list[ApprovalRule]


class RulesSet(BaseModel):
    position: int


@router.put(
    "/workspaces/{ws}/approval-rules",
    status_code=202,
    tags=["approvals"],
    summary="Replace the workspace's approval rules",
    responses=COMMAND,
)
async def put_rules(body: RulesIn, platform: PlatformDep, access: Admin) -> RulesSet:
    done = await set_approval_rules(
        platform.store,
        access.workspace,
        body.rules,
        by=access.principal.actor,
        context=context(access.principal),
    )
    return RulesSet(position=done.position)


@router.get(
    "/workspaces/{ws}/approval-rules",
    tags=["approvals"],
    summary="The workspace's approval rules",
    responses=READ,
)
async def get_rules(platform: PlatformDep, access: Reader) -> RulesOut:
    return RulesOut(rules=list(await approval_rules(platform.store, access.workspace)))
