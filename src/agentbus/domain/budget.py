"""The budget aggregate: a hard token limit per period, for a workspace or one of its agents.

    set(limit, period none|daily|monthly, alert_at) ->
    reserve(tokens before a model call) -> settle(tokens used) | release(unused)
    new period: period_started (the reset) with its first reservation

A model call first *reserves* its maximum tokens; the append carries an expectation on the
budget's last position, so concurrent reservations serialise and the balance (limit - used -
reserved) can never be spent twice. A reservation that does not fit is refused
(`BudgetExceeded`). Settlement charges what the call used to the period it reserved in and gives
the rest back. Read top to bottom: state, evolve, commands, decide; the thin service that wires
it to the store is at the end. Events are in `agentbus.events.budget`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import structlog

from agentbus.domain.decider import Decider, DomainError
from agentbus.domain.handling import Handled, StateCache, handle, load
from agentbus.errors import AgentbusError
from agentbus.events.budget import (
    BudgetAlerted,
    BudgetExhausted,
    BudgetPeriodStarted,
    BudgetSet,
    OpenReservation,
    PeriodBooks,
    PeriodKind,
    ReleaseReason,
    ReservationReleased,
    ReservationSettled,
    TokensReserved,
)
from agentbus.events.envelope import EventContext
from agentbus.events.registry import DomainEvent
from agentbus.events.subjects import MAX_TOKEN_LENGTH, AggregateRef, validate_token
from agentbus.store.eventstore import EventStore

# ---------------------------------------------------------------------------- state

CLOSED_MEMORY = 256
"""Recently settled/released reservation ids remembered, so a repeated command is a no-op."""
MAX_LIMIT_TOKENS = 2**53 - 1
"""The largest limit: exact in every JSON client, and within the read model's bigint (and
orjson's 64 bits: a larger one could not even be encoded as an event)."""


@dataclass(frozen=True, slots=True)
class Books:
    """One period's figures."""

    period: str
    limit: int
    used: int = 0
    reserved: int = 0
    alerted: bool = False
    exhausted: bool = False

    @property
    def balance(self) -> int:
        """What a new reservation may take: limit - used - reserved."""
        return self.limit - self.used - self.reserved

    @property
    def remaining(self) -> int:
        """What is left once the calls in flight have settled at most: limit - used."""
        return self.limit - self.used


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    run_id: str
    attempt: int
    tokens: int
    period: str


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit_tokens: int | None = None
    """None: no budget was ever set (unlimited)."""
    limit_cost: float | None = None
    period_kind: PeriodKind = "none"
    alert_at: float | None = None
    current: str | None = None
    """The key of the current period: `all`, `2026-11` or `2026-11-21`."""
    books: Mapping[str, Books] = field(default_factory=dict)
    """The current period, and earlier ones that still had open reservations when it began."""
    open: Mapping[str, Reservation] = field(default_factory=dict)
    closed: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        return self.limit_tokens is not None


INITIAL = BudgetState()


def period_key(kind: PeriodKind, now: datetime) -> str:
    """The period `now` falls in (UTC): `all`, `2026-11-21` (daily), `2026-11` (monthly)."""
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    if kind == "daily":
        return now.strftime("%Y-%m-%d")
    if kind == "monthly":
        return now.strftime("%Y-%m")
    return "all"


def next_period_start(kind: PeriodKind, period: str) -> datetime | None:
    """When the period after `period` begins (UTC); None for a budget that never resets."""
    if kind == "daily":
        day = datetime.strptime(period, "%Y-%m-%d").replace(tzinfo=UTC)
        return day + timedelta(days=1)
    if kind == "monthly":
        month = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
        return month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)
    return None


def period_at(state: BudgetState, now: datetime) -> str:
    """The period a command at `now` belongs to. A worker whose clock is behind never reopens a
    period that has already been left (keys of one kind sort in time order)."""
    key = period_key(state.period_kind, now)
    current = state.current
    if current is not None and len(current) == len(key) and key < current:
        return current
    return key


def books_at(state: BudgetState, now: datetime) -> Books | None:
    """The figures that apply at `now` (fresh ones if a new period has begun); None: no budget."""
    if state.limit_tokens is None:
        return None
    period = period_at(state, now)
    if period == state.current and period in state.books:
        return state.books[period]
    return Books(period, state.limit_tokens)


def _books(state: BudgetState, period: str, used: int, reserved: int, balance: int) -> Books:
    """The books of `period` after an event that carries its figures."""
    old = state.books.get(period)
    limit = balance + used + reserved
    if old is None:
        return Books(period, limit, used, reserved)
    return replace(old, limit=limit, used=used, reserved=reserved)


def _with(mapping: Mapping[str, Books], books: Books) -> dict[str, Books]:
    return {**mapping, books.period: books}


def evolve(state: BudgetState, event: DomainEvent) -> BudgetState:
    match event:
        case BudgetSet():
            books = dict(state.books)
            if event.period != state.current:  # a new period (or period kind) begins now
                books = {
                    b.period: b
                    for b in books.values()
                    if any(r.period == b.period for r in state.open.values())
                }
            updated = _books(
                replace(state, books=books),
                event.period,
                event.period_used,
                event.period_reserved,
                event.balance,
            )
            # A higher limit (or threshold) re-arms the alert and the exhaustion.
            alert_line = None if event.alert_at is None else event.alert_at * updated.limit
            updated = replace(
                updated,
                alerted=updated.alerted and alert_line is not None and updated.used >= alert_line,
                exhausted=updated.exhausted and updated.used >= updated.limit,
            )
            return replace(
                state,
                limit_tokens=event.limit_tokens,
                limit_cost=event.limit_cost,
                period_kind=event.period_kind,
                alert_at=event.alert_at,
                current=event.period,
                books=_with(books, updated),
            )
        case BudgetPeriodStarted():
            # Carries the whole state: whatever came before it does not matter (see `snapshot`).
            earlier = {
                b.period: Books(
                    b.period, b.limit_tokens, b.used, b.reserved, b.alerted, b.exhausted
                )
                for b in event.earlier
            }
            # (A period met again after a change of period kind continues its books.)
            current = replace(
                earlier.pop(event.period, Books(event.period, event.limit_tokens)),
                limit=event.limit_tokens,
                used=event.period_used,
                reserved=event.period_reserved,
            )
            return BudgetState(
                limit_tokens=event.limit_tokens,
                limit_cost=event.limit_cost,
                period_kind=event.period_kind,
                alert_at=event.alert_at,
                current=event.period,
                books=_with(earlier, current),
                open={
                    r.reservation_id: Reservation(
                        r.reservation_id, r.run_id, r.attempt, r.tokens, r.period
                    )
                    for r in event.open_reservations
                },
                closed=(),
            )
        case TokensReserved():
            figures = _books(
                state, event.period, event.period_used, event.period_reserved, event.balance
            )
            reservation = Reservation(
                event.reservation_id, event.run_id, event.attempt, event.tokens, event.period
            )
            return replace(
                state,
                books=_with(state.books, figures),
                open={**state.open, event.reservation_id: reservation},
            )
        case ReservationSettled() | ReservationReleased():
            figures = _books(
                state, event.period, event.period_used, event.period_reserved, event.balance
            )
            return replace(
                state,
                books=_with(state.books, figures),
                open={k: v for k, v in state.open.items() if k != event.reservation_id},
                closed=(*state.closed, event.reservation_id)[-CLOSED_MEMORY:],
            )
        case BudgetAlerted() | BudgetExhausted():
            flagged = state.books.get(event.period)
            if flagged is None:
                return state
            if isinstance(event, BudgetAlerted):
                flagged = replace(flagged, alerted=True)
            else:
                flagged = replace(flagged, exhausted=True)
            return replace(state, books=_with(state.books, flagged))
    return state


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SetBudget:
    limit_tokens: int
    period: PeriodKind
    by: str
    now: datetime
    alert_at: float | None = None
    """Emit `budget.alerted` once settled usage reaches this fraction of the limit."""
    limit_cost: float | None = None
    """Recorded and shown; not enforced yet (agentbus knows no prices)."""


@dataclass(frozen=True, slots=True)
class Reserve:
    """Hold `tokens` for one model call of attempt `attempt` of run `run_id` at `now`."""

    reservation_id: str
    run_id: str
    attempt: int
    tokens: int
    now: datetime


@dataclass(frozen=True, slots=True)
class Settle:
    """The call used `used` tokens: charge them, give the rest back."""

    reservation_id: str
    used: int


@dataclass(frozen=True, slots=True)
class Release:
    """Give a reservation back whole (the call did not happen, or failed without usage)."""

    reservation_id: str
    reason: ReleaseReason


@dataclass(frozen=True, slots=True)
class ReleaseForRun:
    """Give back every open reservation of a run (it ended, maybe while its worker was dead)."""

    run_id: str
    reason: ReleaseReason


BudgetCommand = SetBudget | Reserve | Settle | Release | ReleaseForRun

# ---------------------------------------------------------------------------- errors


class BudgetExceeded(DomainError):
    """A model call (or a new run) does not fit in what is left of the budget's period.

    `period` is the period key, `needed` the tokens asked for, `left` what was available.
    """

    def __init__(self, message: str, *, period: str, needed: int, left: int) -> None:
        super().__init__(message)
        self.period = period
        self.needed = needed
        self.left = left

    def scoped(self, label: str) -> BudgetExceeded:
        """The same refusal, its message prefixed with whose budget it is."""
        return BudgetExceeded(
            f"{label}: {self}", period=self.period, needed=self.needed, left=self.left
        )


class InvalidBudget(DomainError):
    """A budget command with impossible values (negative tokens, alert_at outside (0, 1])."""


class ReservationNotFound(DomainError):
    """Settling a reservation the budget does not hold (released by a takeover meanwhile)."""


class ReservationSuperseded(DomainError):
    """A reservation for an attempt older than one the run already holds (a late worker)."""


# ---------------------------------------------------------------------------- decide


class _Decision:
    """Events decided so far, and the state they lead to (later events see earlier ones)."""

    def __init__(self, state: BudgetState) -> None:
        self.state = state
        self.events: list[DomainEvent] = []

    def emit(self, event: DomainEvent) -> None:
        self.events.append(event)
        self.state = evolve(self.state, event)


def decide(command: BudgetCommand, state: BudgetState) -> list[DomainEvent]:
    match command:
        case SetBudget():
            return _set(command, state)
        case Reserve():
            return _reserve(command, state)
        case Settle():
            if command.reservation_id in state.closed:
                return []  # settled (or released) before: a repeat
            reservation = state.open.get(command.reservation_id)
            if reservation is None:
                raise ReservationNotFound(
                    f"no open reservation {command.reservation_id!r} in this budget"
                )
            if command.used < 0:
                raise InvalidBudget(f"used tokens must be >= 0, got {command.used}")
            decision = _Decision(state)
            books = state.books[reservation.period]
            used = books.used + command.used
            reserved = books.reserved - reservation.tokens
            decision.emit(
                ReservationSettled(
                    reservation_id=reservation.reservation_id,
                    run_id=reservation.run_id,
                    attempt=reservation.attempt,
                    tokens=reservation.tokens,
                    used=command.used,
                    released=max(0, reservation.tokens - command.used),
                    overrun=max(0, command.used - reservation.tokens),
                    period=reservation.period,
                    period_used=used,
                    period_reserved=reserved,
                    balance=books.limit - used - reserved,
                )
            )
            _thresholds(decision, reservation.period)
            return decision.events
        case Release():
            reservation = state.open.get(command.reservation_id)
            if reservation is None:
                return []  # never reserved, or settled/released before: nothing to give back
            decision = _Decision(state)
            decision.emit(_released(state, reservation, command.reason))
            return decision.events
        case ReleaseForRun():
            decision = _Decision(state)
            for reservation in sorted(state.open.values(), key=lambda r: r.attempt):
                if reservation.run_id == command.run_id:
                    decision.emit(_released(decision.state, reservation, command.reason))
            return decision.events
    raise TypeError(f"not a budget command: {command!r}")


def _set(command: SetBudget, state: BudgetState) -> list[DomainEvent]:
    if not 0 <= command.limit_tokens <= MAX_LIMIT_TOKENS:
        raise InvalidBudget(
            f"limit_tokens must be within 0..{MAX_LIMIT_TOKENS}, got {command.limit_tokens}"
        )
    if command.alert_at is not None and not 0 < command.alert_at <= 1:
        raise InvalidBudget(
            f"alert_at is a fraction of the limit in (0, 1], not {command.alert_at}"
        )
    if command.limit_cost is not None and command.limit_cost < 0:
        raise InvalidBudget(f"limit_cost must be >= 0, got {command.limit_cost}")
    config = (command.limit_tokens, command.limit_cost, command.period, command.alert_at)
    if state.configured and config == (
        state.limit_tokens,
        state.limit_cost,
        state.period_kind,
        state.alert_at,
    ):
        return []  # set to what it is: nothing happened
    if state.configured and command.period == state.period_kind:
        period = period_at(state, command.now)
    else:  # a first budget, or a new kind of period: it begins now
        period = period_key(command.period, command.now)
    books = state.books.get(period)
    used, reserved = (books.used, books.reserved) if books else (0, 0)
    decision = _Decision(state)
    decision.emit(
        BudgetSet(
            limit_tokens=command.limit_tokens,
            limit_cost=command.limit_cost,
            period_kind=command.period,
            alert_at=command.alert_at,
            by=command.by,
            period=period,
            period_used=used,
            period_reserved=reserved,
            balance=command.limit_tokens - used - reserved,
        )
    )
    _thresholds(decision, period)
    return decision.events


def _reserve(command: Reserve, state: BudgetState) -> list[DomainEvent]:
    if state.limit_tokens is None:
        return []  # no budget: unlimited, nothing to record
    if command.reservation_id in state.open or command.reservation_id in state.closed:
        return []  # reserved before: a repeat
    if command.tokens < 0:
        raise InvalidBudget(f"tokens must be >= 0, got {command.tokens}")
    same_run = [r for r in state.open.values() if r.run_id == command.run_id]
    if any(r.attempt > command.attempt for r in same_run):
        raise ReservationSuperseded(
            f"run {command.run_id} already holds a reservation for a later attempt than "
            f"{command.attempt}"
        )
    decision = _Decision(state)
    # An earlier attempt of this run died holding its reservation: the takeover gives it back.
    for reservation in sorted(same_run, key=lambda r: r.attempt):
        decision.emit(_released(decision.state, reservation, "superseded"))
    period = period_at(decision.state, command.now)
    if period != decision.state.current:
        decision.emit(_period_started(decision.state, period))
    books = decision.state.books[period]
    if command.tokens > books.balance:
        raise BudgetExceeded(
            f"budget exceeded for {period}: a call may use {command.tokens} tokens, "
            f"{max(0, books.balance)} of {books.limit} are free "
            f"({books.used} used, {books.reserved} reserved by calls in flight)",
            period=period,
            needed=command.tokens,
            left=max(0, books.balance),
        )
    used, reserved = books.used, books.reserved + command.tokens
    decision.emit(
        TokensReserved(
            reservation_id=command.reservation_id,
            run_id=command.run_id,
            attempt=command.attempt,
            tokens=command.tokens,
            period=period,
            period_used=used,
            period_reserved=reserved,
            balance=books.limit - used - reserved,
        )
    )
    return decision.events


def _released(state: BudgetState, reservation: Reservation, reason: ReleaseReason) -> DomainEvent:
    books = state.books[reservation.period]
    reserved = books.reserved - reservation.tokens
    return ReservationReleased(
        reservation_id=reservation.reservation_id,
        run_id=reservation.run_id,
        attempt=reservation.attempt,
        tokens=reservation.tokens,
        reason=reason,
        period=reservation.period,
        period_used=books.used,
        period_reserved=reserved,
        balance=books.limit - books.used - reserved,
    )


def _period_started(state: BudgetState, period: str) -> BudgetPeriodStarted:
    assert state.limit_tokens is not None
    holding = {r.period for r in state.open.values()}
    used = reserved = 0
    if period in holding:  # met again after a change of period kind: its books continue
        used, reserved = state.books[period].used, state.books[period].reserved
    return BudgetPeriodStarted(
        period=period,
        period_kind=state.period_kind,
        limit_tokens=state.limit_tokens,
        limit_cost=state.limit_cost,
        alert_at=state.alert_at,
        period_used=used,
        period_reserved=reserved,
        balance=state.limit_tokens - used - reserved,
        earlier=[
            PeriodBooks(
                period=b.period,
                limit_tokens=b.limit,
                used=b.used,
                reserved=b.reserved,
                alerted=b.alerted,
                exhausted=b.exhausted,
            )
            for b in state.books.values()
            if b.period in holding
        ],
        open_reservations=[
            OpenReservation(
                reservation_id=r.reservation_id,
                run_id=r.run_id,
                attempt=r.attempt,
                tokens=r.tokens,
                period=r.period,
            )
            for r in state.open.values()
        ],
    )


def _thresholds(decision: _Decision, period: str) -> None:
    """Alert and exhaustion of `period`, each once (until a higher limit re-arms them)."""
    books = decision.state.books[period]
    alert_at = decision.state.alert_at
    if alert_at is not None and not books.alerted and books.used >= alert_at * books.limit:
        decision.emit(
            BudgetAlerted(
                period=period, used=books.used, limit_tokens=books.limit, alert_at=alert_at
            )
        )
    if not books.exhausted and books.used >= books.limit:
        decision.emit(BudgetExhausted(period=period, used=books.used, limit_tokens=books.limit))


def check_can_start(state: BudgetState, tokens: int, now: datetime) -> None:
    """Refuse a new run (`BudgetExceeded`) when not even one call of `tokens` can fit in what
    is left of the period at `now`, counting settled usage only (calls in flight may still
    give tokens back). No budget: always fine."""
    books = books_at(state, now)
    if books is None or books.remaining >= tokens:
        return
    reset = next_period_start(state.period_kind, books.period)
    when = f"; the budget resets at {reset:%Y-%m-%dT%H:%M:%SZ}" if reset else ""
    how = "exhausted" if books.remaining <= 0 else "nearly exhausted"
    raise BudgetExceeded(
        f"budget {how} for {books.period}: {max(0, books.remaining)} of {books.limit} "
        f"tokens left, a call may use {tokens}{when}",
        period=books.period,
        needed=tokens,
        left=max(0, books.remaining),
    )


BUDGET: Decider[BudgetCommand, BudgetState] = Decider(
    "budget", INITIAL, evolve, decide, snapshot=BudgetPeriodStarted.kind.name
)


# ---------------------------------------------------------------------------- service

log = structlog.get_logger("agentbus.budget")

WORKSPACE_SCOPE = "workspace"


def budget_ref(workspace: str, agent: str | None = None) -> AggregateRef:
    """The budget of a workspace, or of one agent in it (`agent-<name>`)."""
    return AggregateRef(workspace, "budget", WORKSPACE_SCOPE if agent is None else f"agent-{agent}")


def _agent_ref(workspace: str, agent: str) -> AggregateRef | None:
    """The agent's budget, or None when the agent's name cannot be a budget id."""
    scope = f"agent-{agent}"
    if len(scope) > MAX_TOKEN_LENGTH:
        return None
    try:
        validate_token(scope, "budget id")
    except AgentbusError:
        return None
    return AggregateRef(workspace, "budget", scope)


def reservation_id(run_id: str, attempt: int) -> str:
    """One model call per attempt: the reservation id follows from the attempt, so a retry or
    a redelivery can never hold tokens twice for it."""
    return f"{run_id}:{attempt}"


@dataclass(frozen=True, slots=True)
class Hold:
    """Tokens held for one model call, in every budget that applies (none: unlimited)."""

    reservation_id: str
    run_id: str
    attempt: int
    tokens: int
    budgets: tuple[AggregateRef, ...]


class Budgets:
    """The budget aggregates wired to the store, for the run worker, the auto-reply reactor
    and the API. A run spends from its workspace's budget and, if one is set, its agent's.

    Loads go through a `StateCache` (only events since the last load are read) and a lock per
    budget, so the calls of one process on a busy budget queue up instead of colliding;
    processes still serialise on the append's expectation.
    """

    def __init__(
        self,
        store: EventStore,
        cache: StateCache | None = None,
        *,
        context: EventContext = EventContext.DEFAULT,
        attempts: int = 50,
    ) -> None:
        self._store = store
        self._cache = cache if cache is not None else StateCache()
        self._context = context
        self._attempts = attempts
        self._locks: weakref.WeakValueDictionary[AggregateRef, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _refs(self, workspace: str, agent: str | None) -> list[AggregateRef]:
        agent_ref = _agent_ref(workspace, agent) if agent else None
        return [ref for ref in (agent_ref, budget_ref(workspace)) if ref is not None]

    async def _applying(self, workspace: str, agent: str | None) -> list[AggregateRef]:
        """The budgets that apply to a call of `agent` in `workspace` (agent first). The cheap
        check: one multi-last direct get on their `set` subjects, skipped for budgets already
        known to be set (a budget, once set, stays set). No budget: no request beyond it."""
        refs = self._refs(workspace, agent)
        known = {ref for ref in refs if _is_set(self._cache.get(ref))}
        unknown = {ref.subject(BudgetSet.kind.name): ref for ref in refs if ref not in known}
        if unknown:
            found = await self._store.last_positions(list(unknown))
            known.update(unknown[subject] for subject in found)
        return [ref for ref in refs if ref in known]

    async def _handle(self, ref: AggregateRef, command: BudgetCommand) -> Handled[BudgetState]:
        lock = self._locks.get(ref)
        if lock is None:
            lock = self._locks[ref] = asyncio.Lock()
        async with lock:
            return await handle(
                self._store,
                BUDGET,
                ref,
                command,
                context=self._context,
                attempts=self._attempts,
                cache=self._cache,
            )

    async def state(self, ref: AggregateRef) -> BudgetState:
        state, _ = await load(self._store, BUDGET, ref, self._cache)
        return state

    async def set(
        self,
        workspace: str,
        *,
        limit_tokens: int,
        period: PeriodKind,
        by: str,
        alert_at: float | None = None,
        limit_cost: float | None = None,
        agent: str | None = None,
        now: datetime | None = None,
    ) -> Handled[BudgetState]:
        """Set (or change) a budget. `InvalidBudget` for impossible values."""
        command = SetBudget(
            limit_tokens, period, by, now or datetime.now(UTC), alert_at, limit_cost
        )
        return await self._handle(budget_ref(workspace, agent), command)

    async def ensure_can_start(
        self, workspace: str, agent: str | None, tokens: int, now: datetime | None = None
    ) -> None:
        """`BudgetExceeded` when the workspace's (or the agent's) budget cannot pay for one
        more call of `tokens` this period. Call it before queueing a run."""
        for ref in await self._applying(workspace, agent):
            try:
                check_can_start(await self.state(ref), tokens, now or datetime.now(UTC))
            except BudgetExceeded as exc:
                raise exc.scoped(_label(ref)) from None

    async def reserve(
        self, run: AggregateRef, agent: str, attempt: int, tokens: int, now: datetime | None = None
    ) -> Hold:
        """Hold `tokens` for attempt `attempt` of `run` in every budget that applies.
        `BudgetExceeded` (nothing held) when one of them cannot."""
        rid = reservation_id(run.id, attempt)
        command = Reserve(rid, run.id, attempt, tokens, now or datetime.now(UTC))
        held: list[AggregateRef] = []
        try:
            for ref in await self._applying(run.workspace, agent):
                try:
                    result = await self._handle(ref, command)
                except BudgetExceeded as exc:
                    raise exc.scoped(_label(ref)) from None
                if rid in result.state.open:
                    held.append(ref)
        except BaseException:
            hold = Hold(rid, run.id, attempt, tokens, tuple(held))
            await asyncio.shield(self._give_back(hold, "not_started"))
            raise
        return Hold(rid, run.id, attempt, tokens, tuple(held))

    async def settle(self, hold: Hold, used: int) -> None:
        """Charge what the call used; give the rest back."""
        for ref in hold.budgets:
            try:
                await self._handle(ref, Settle(hold.reservation_id, used))
            except ReservationNotFound as exc:  # a takeover released it meanwhile
                log.warning("usage not charged", budget=ref.path, run=hold.run_id, why=str(exc))

    async def release(self, hold: Hold, reason: ReleaseReason) -> None:
        """Give the whole reservation back."""
        for ref in hold.budgets:
            await self._handle(ref, Release(hold.reservation_id, reason))

    async def release_run(self, run: AggregateRef, agent: str, reason: ReleaseReason) -> None:
        """Give back whatever `run` still holds (it ended while no worker settled for it)."""
        for ref in await self._applying(run.workspace, agent):
            await self._handle(ref, ReleaseForRun(run.id, reason))

    async def _give_back(self, hold: Hold, reason: ReleaseReason) -> None:
        try:
            await self.release(hold, reason)
        except AgentbusError as exc:  # left to the takeover or the run's end
            log.warning("reservation not released", run=hold.run_id, error=str(exc))


def _is_set(cached: tuple[object, int] | None) -> bool:
    return cached is not None and isinstance(cached[0], BudgetState) and cached[0].configured


def _label(ref: AggregateRef) -> str:
    if ref.id == WORKSPACE_SCOPE:
        return f"workspace {ref.workspace}"
    return f"agent {ref.id.removeprefix('agent-')} in workspace {ref.workspace}"


async def set_budget(
    store: EventStore,
    workspace: str,
    *,
    limit_tokens: int,
    period: PeriodKind,
    by: str,
    alert_at: float | None = None,
    limit_cost: float | None = None,
    agent: str | None = None,
    now: datetime | None = None,
) -> Handled[BudgetState]:
    """Set the token budget of a workspace (or of one agent in it), e.g. for the CLI or API.
    Raises `InvalidBudget` for impossible values, `InvalidEvent` for a bad workspace/agent."""
    return await Budgets(store).set(
        workspace,
        limit_tokens=limit_tokens,
        period=period,
        by=by,
        alert_at=alert_at,
        limit_cost=limit_cost,
        agent=agent,
        now=now,
    )


async def ensure_can_start(
    store: EventStore,
    workspace: str,
    agent: str | None,
    tokens: int,
    *,
    now: datetime | None = None,
    cache: StateCache | None = None,
) -> None:
    """Raise `BudgetExceeded` when a new run of `agent` in `workspace` could not make one call
    of `tokens` (the agent's `max_tokens`) this period. For the API: map it to HTTP 402."""
    await Budgets(store, cache).ensure_can_start(workspace, agent, tokens, now)
