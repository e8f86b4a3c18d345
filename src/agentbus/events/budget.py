"""Events of the budget aggregate: a token budget of a workspace (or of one agent in it).

Aggregate `budget/<scope>` with scope `workspace` or `agent-<name>`. Every event that moves
tokens carries the figures of its period *after* it (`period_used`, `period_reserved`,
`balance` = limit - used - reserved), so a ledger row needs no arithmetic across rows and an
auditor can check each step on its own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentbus.events.registry import DomainEvent, EventKind

PeriodKind = Literal["none", "daily", "monthly"]
"""When the budget resets: never, at 00:00 UTC each day, on the 1st of each month (UTC)."""
ReleaseReason = Literal[
    "failed", "cancelled", "timed_out", "retry", "superseded", "run_ended", "not_started"
]
"""Why reserved tokens were given back unused."""

_PERIOD = Field(min_length=1, max_length=16, description="period key: all, 2026-11, 2026-11-21")
_RESERVATION = Field(min_length=1, max_length=128)
_RUN = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class BudgetSet(DomainEvent):
    """The budget's limit and period were set (or changed). Applies to `period` at once."""

    kind: ClassVar[EventKind] = EventKind("budget", "set", 1)

    limit_tokens: int = Field(ge=0)
    limit_cost: float | None = Field(default=None, ge=0, description="recorded, not enforced")
    period_kind: PeriodKind
    alert_at: float | None = Field(default=None, gt=0, le=1, description="fraction of the limit")
    by: str = Field(min_length=1, max_length=200)
    period: str = _PERIOD
    period_used: int = Field(ge=0)
    period_reserved: int = Field(ge=0)
    balance: int


class OpenReservation(BaseModel):
    """A reservation carried into a new period by `period_started`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reservation_id: str = _RESERVATION
    run_id: str = _RUN
    attempt: int = Field(ge=1)
    tokens: int = Field(ge=0)
    period: str = _PERIOD


class PeriodBooks(BaseModel):
    """An earlier period that still has open reservations, carried by `period_started`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    period: str = _PERIOD
    limit_tokens: int = Field(ge=0)
    used: int = Field(ge=0)
    reserved: int = Field(ge=0)
    alerted: bool = False
    exhausted: bool = False


class BudgetPeriodStarted(DomainEvent):
    """A new period began (the reset), with the first reservation in it.

    It carries the whole state of the budget, so loading the aggregate may start at its last
    `period_started` instead of its first event (the books are closed at each period start).
    """

    kind: ClassVar[EventKind] = EventKind("budget", "period_started", 1)

    period: str = _PERIOD
    period_kind: PeriodKind
    limit_tokens: int = Field(ge=0)
    limit_cost: float | None = Field(default=None, ge=0)
    alert_at: float | None = Field(default=None, gt=0, le=1)
    period_used: int = Field(default=0, ge=0)
    period_reserved: int = Field(default=0, ge=0)
    balance: int
    earlier: list[PeriodBooks] = Field(default_factory=list)
    open_reservations: list[OpenReservation] = Field(default_factory=list)


class TokensReserved(DomainEvent):
    """Before a model call: its maximum tokens are held, so concurrent calls cannot overshoot."""

    kind: ClassVar[EventKind] = EventKind("budget", "tokens_reserved", 1)

    reservation_id: str = _RESERVATION
    run_id: str = _RUN
    attempt: int = Field(ge=1)
    tokens: int = Field(ge=0)
    period: str = _PERIOD
    period_used: int = Field(ge=0)
    period_reserved: int = Field(ge=0)
    balance: int


class ReservationSettled(DomainEvent):
    """After the call: `used` tokens are charged (to the reservation's period), the rest
    (`released`) goes back. `overrun`: tokens used beyond the reservation (an executor that
    spent more than the agent's `max_tokens`)."""

    kind: ClassVar[EventKind] = EventKind("budget", "reservation_settled", 1)

    reservation_id: str = _RESERVATION
    run_id: str = _RUN
    attempt: int = Field(ge=1)
    tokens: int = Field(ge=0, description="the reservation")
    used: int = Field(ge=0)
    released: int = Field(ge=0)
    overrun: int = Field(default=0, ge=0)
    period: str = _PERIOD
    period_used: int = Field(ge=0)
    period_reserved: int = Field(ge=0)
    balance: int


class ReservationReleased(DomainEvent):
    """A reservation given back whole: the call did not happen or reported no usage."""

    kind: ClassVar[EventKind] = EventKind("budget", "reservation_released", 1)

    reservation_id: str = _RESERVATION
    run_id: str = _RUN
    attempt: int = Field(ge=1)
    tokens: int = Field(ge=0)
    reason: ReleaseReason
    period: str = _PERIOD
    period_used: int = Field(ge=0)
    period_reserved: int = Field(ge=0)
    balance: int


class BudgetAlerted(DomainEvent):
    """The period's settled usage crossed the soft-alert threshold (`alert_at` x limit)."""

    kind: ClassVar[EventKind] = EventKind("budget", "alerted", 1)

    period: str = _PERIOD
    used: int = Field(ge=0)
    limit_tokens: int = Field(ge=0)
    alert_at: float = Field(gt=0, le=1)


class BudgetExhausted(DomainEvent):
    """The period's settled usage reached the limit: nothing is left until the next period
    (or a higher limit)."""

    kind: ClassVar[EventKind] = EventKind("budget", "exhausted", 1)

    period: str = _PERIOD
    used: int = Field(ge=0)
    limit_tokens: int = Field(ge=0)
