"""The workspace's token budget: read it (from the `budgets` read model), set it (an event on
the budget aggregate). Runs spend from it; see docs/budgets.md."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from agentbus.domain.budget import MAX_LIMIT_TOKENS, set_budget
from agentbus.events.budget import PeriodKind
from agentbus.gateway.deps import Admin, MinPosition, PlatformDep, Reader
from agentbus.gateway.problems import problem_responses
from agentbus.queries.consistency import wait_for_position
from agentbus.queries.scope import workspace_scope

router = APIRouter(
    prefix="/v1/workspaces/{ws}", responses=problem_responses(401, 404, 422, 429, 503)
)


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit_tokens: int = Field(
        ge=0, le=MAX_LIMIT_TOKENS, description="tokens per period (a hard limit)"
    )
    period: PeriodKind = "monthly"
    alert_at: float | None = Field(
        default=None, gt=0, le=1, description="fraction of the limit that raises an alert"
    )
    agent: str | None = Field(
        default=None, max_length=64, description="a budget for one agent instead of the workspace"
    )


class BudgetPeriod(BaseModel):
    scope: str
    period: str
    period_kind: str | None
    limit_tokens: int
    used: int
    reserved: int
    balance: int
    exhausted: bool
    alerted_at: datetime | None
    exhausted_at: datetime | None


class BudgetSetOut(BaseModel):
    position: int


@router.put(
    "/budget",
    status_code=202,
    tags=["budget"],
    summary="Set the token budget",
    responses=problem_responses(403),
)
async def put_budget(body: BudgetIn, platform: PlatformDep, access: Admin) -> BudgetSetOut:
    done = await set_budget(
        platform.store,
        access.workspace,
        limit_tokens=body.limit_tokens,
        period=body.period,
        by=access.principal.actor,
        alert_at=body.alert_at,
        agent=body.agent,
    )
    return BudgetSetOut(position=done.position)


@router.get(
    "/budget",
    tags=["budget"],
    summary="Budget balances, current period first",
    responses=problem_responses(504),
)
async def get_budget(
    platform: PlatformDep,
    access: Reader,
    min_position: MinPosition = None,
) -> list[BudgetPeriod]:
    if min_position:
        await wait_for_position(platform.engine, "budgets", min_position)
    async with workspace_scope(platform.engine, access.workspace) as connection:
        rows = await connection.execute(
            text(
                "SELECT scope, period, period_kind, limit_tokens, used, reserved, balance, "
                "exhausted, alerted_at, exhausted_at FROM budgets WHERE workspace = :w "
                "ORDER BY period DESC, scope"
            ),
            {"w": access.workspace},
        )
        return [BudgetPeriod(**row._mapping) for row in rows]
