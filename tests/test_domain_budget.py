"""The budget decider as given/when/then tables: plain data, no servers."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agentbus.domain.budget import (
    BUDGET,
    BudgetCommand,
    BudgetExceeded,
    InvalidBudget,
    Release,
    ReleaseForRun,
    ReservationNotFound,
    ReservationSuperseded,
    Reserve,
    SetBudget,
    Settle,
    check_can_start,
    next_period_start,
    period_key,
)
from agentbus.events.budget import (
    BudgetAlerted,
    BudgetExhausted,
    BudgetPeriodStarted,
    BudgetSet,
    OpenReservation,
    PeriodBooks,
    ReservationReleased,
    ReservationSettled,
    TokensReserved,
)
from agentbus.events.registry import DomainEvent

DAY = "2026-11-21"
NOON = datetime(2026, 11, 21, 12, tzinfo=UTC)
TOMORROW = NOON + timedelta(days=1)

SET = BudgetSet(
    limit_tokens=10_000,
    period_kind="daily",
    alert_at=0.8,
    by="ada",
    period=DAY,
    period_used=0,
    period_reserved=0,
    balance=10_000,
)


def reserved(
    rid: str, tokens: int, used: int, held: int, *, run: str = "r1", attempt: int = 1
) -> TokensReserved:
    return TokensReserved(
        reservation_id=rid,
        run_id=run,
        attempt=attempt,
        tokens=tokens,
        period=DAY,
        period_used=used,
        period_reserved=held,
        balance=10_000 - used - held,
    )


R1 = reserved("r1:1", 1000, 0, 1000)


def then(given: list[DomainEvent], when: BudgetCommand) -> list[DomainEvent]:
    return list(BUDGET.decide(when, BUDGET.fold(given)))


LEGAL: list[tuple[str, list[DomainEvent], BudgetCommand, list[DomainEvent]]] = [
    ("set a first budget", [], SetBudget(10_000, "daily", "ada", NOON, alert_at=0.8), [SET]),
    ("set it to what it is", [SET], SetBudget(10_000, "daily", "ada", NOON, alert_at=0.8), []),
    (
        "raise the limit mid-period: what is used and held stays",
        [SET, R1],
        SetBudget(20_000, "daily", "bob", NOON, alert_at=0.8),
        [
            SET.model_copy(
                update={
                    "limit_tokens": 20_000,
                    "by": "bob",
                    "period_reserved": 1000,
                    "balance": 19_000,
                }
            )
        ],
    ),
    (
        "a zero budget is exhausted at once",
        [],
        SetBudget(0, "none", "ada", NOON),
        [
            BudgetSet(
                limit_tokens=0,
                period_kind="none",
                by="ada",
                period="all",
                period_used=0,
                period_reserved=0,
                balance=0,
            ),
            BudgetExhausted(period="all", used=0, limit_tokens=0),
        ],
    ),
    ("no budget: a reservation is not needed", [], Reserve("r1:1", "r1", 1, 1000, NOON), []),
    ("reserve", [SET], Reserve("r1:1", "r1", 1, 1000, NOON), [R1]),
    ("reserve the same call twice", [SET, R1], Reserve("r1:1", "r1", 1, 1000, NOON), []),
    (
        "reserve exactly what is left",
        [SET, reserved("r2:1", 9000, 0, 9000, run="r2")],
        Reserve("r1:1", "r1", 1, 1000, NOON),
        [reserved("r1:1", 1000, 0, 10_000)],
    ),
    (
        "settle: charge what was used, give the rest back",
        [SET, R1],
        Settle("r1:1", 600),
        [
            ReservationSettled(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=1000,
                used=600,
                released=400,
                period=DAY,
                period_used=600,
                period_reserved=0,
                balance=9400,
            )
        ],
    ),
    (
        "settle past the alert threshold",
        [SET, reserved("r1:1", 9000, 0, 9000)],
        Settle("r1:1", 8000),
        [
            ReservationSettled(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=9000,
                used=8000,
                released=1000,
                period=DAY,
                period_used=8000,
                period_reserved=0,
                balance=2000,
            ),
            BudgetAlerted(period=DAY, used=8000, limit_tokens=10_000, alert_at=0.8),
        ],
    ),
    (
        "settle to the last token: exhausted",
        [SET, reserved("r1:1", 10_000, 0, 10_000)],
        Settle("r1:1", 10_000),
        [
            ReservationSettled(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=10_000,
                used=10_000,
                released=0,
                period=DAY,
                period_used=10_000,
                period_reserved=0,
                balance=0,
            ),
            BudgetAlerted(period=DAY, used=10_000, limit_tokens=10_000, alert_at=0.8),
            BudgetExhausted(period=DAY, used=10_000, limit_tokens=10_000),
        ],
    ),
    (
        "an executor that used more than it reserved: recorded as overrun",
        [SET, R1],
        Settle("r1:1", 1500),
        [
            ReservationSettled(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=1000,
                used=1500,
                released=0,
                overrun=500,
                period=DAY,
                period_used=1500,
                period_reserved=0,
                balance=8500,
            )
        ],
    ),
    (
        "settle twice",
        [SET, R1, *then([SET, R1], Settle("r1:1", 600))],
        Settle("r1:1", 600),
        [],
    ),
    (
        "release",
        [SET, R1],
        Release("r1:1", "cancelled"),
        [
            ReservationReleased(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=1000,
                reason="cancelled",
                period=DAY,
                period_used=0,
                period_reserved=0,
                balance=10_000,
            )
        ],
    ),
    ("release what was never reserved", [SET], Release("r9:1", "failed"), []),
    (
        "release after settling",
        [SET, R1, *then([SET, R1], Settle("r1:1", 600))],
        Release("r1:1", "failed"),
        [],
    ),
    (
        "a run that ended gives back everything it holds",
        [SET, R1, reserved("r2:1", 500, 0, 1500, run="r2")],
        ReleaseForRun("r1", "run_ended"),
        [
            ReservationReleased(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=1000,
                reason="run_ended",
                period=DAY,
                period_used=0,
                period_reserved=500,
                balance=9500,
            )
        ],
    ),
    (
        "a takeover's reservation gives back the dead attempt's",
        [SET, R1],
        Reserve("r1:2", "r1", 2, 1000, NOON),
        [
            ReservationReleased(
                reservation_id="r1:1",
                run_id="r1",
                attempt=1,
                tokens=1000,
                reason="superseded",
                period=DAY,
                period_used=0,
                period_reserved=0,
                balance=10_000,
            ),
            reserved("r1:2", 1000, 0, 1000, attempt=2),
        ],
    ),
    (
        "a worker whose clock is behind stays in the current period",
        [SET],
        Reserve("r1:1", "r1", 1, 1000, NOON - timedelta(days=1)),
        [R1],
    ),
]


@pytest.mark.parametrize(
    ("given", "when", "expected"), [c[1:] for c in LEGAL], ids=[c[0] for c in LEGAL]
)
def test_legal(given: list[DomainEvent], when: BudgetCommand, expected: list[DomainEvent]) -> None:
    assert then(given, when) == expected


REFUSED: list[tuple[str, list[DomainEvent], BudgetCommand, type[Exception], str]] = [
    (
        "a call that does not fit",
        [SET, reserved("r2:1", 9500, 0, 9500, run="r2")],
        Reserve("r1:1", "r1", 1, 1000, NOON),
        BudgetExceeded,
        "a call may use 1000 tokens, 500 of 10000 are free (0 used, 9500 reserved",
    ),
    ("settle what is not held", [SET], Settle("r9:1", 10), ReservationNotFound, "r9:1"),
    (
        "an attempt older than the one holding tokens",
        [SET, reserved("r1:2", 1000, 0, 1000, attempt=2)],
        Reserve("r1:1", "r1", 1, 1000, NOON),
        ReservationSuperseded,
        "later attempt",
    ),
    ("a negative limit", [], SetBudget(-1, "none", "ada", NOON), InvalidBudget, "limit_tokens"),
    (
        "an alert beyond the limit",
        [],
        SetBudget(10, "none", "ada", NOON, alert_at=1.5),
        InvalidBudget,
        "alert_at",
    ),
    ("negative usage", [SET, R1], Settle("r1:1", -1), InvalidBudget, "used"),
]


@pytest.mark.parametrize(
    ("given", "when", "error", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(
    given: list[DomainEvent], when: BudgetCommand, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        then(given, when)


def test_a_refusal_says_what_was_asked_and_what_was_left() -> None:
    with pytest.raises(BudgetExceeded) as refused:
        then([SET, reserved("r2:1", 9500, 0, 9500, run="r2")], Reserve("r1:1", "r1", 1, 1000, NOON))
    assert (refused.value.period, refused.value.needed, refused.value.left) == (DAY, 1000, 500)
    assert str(refused.value.scoped("workspace acme")).startswith("workspace acme: budget exceeded")


# ---------------------------------------------------------------------------- periods


def test_period_keys_and_resets_are_utc() -> None:
    late = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    assert period_key("daily", late) == "2026-11-30"
    assert period_key("monthly", late) == "2026-11"
    assert period_key("none", late) == "all"
    # 23:30 in New York is already the next day in UTC
    new_york = late.astimezone(UTC).replace(tzinfo=None)
    assert period_key("daily", (late + timedelta(hours=1))) == "2026-12-01"
    assert period_key("daily", new_york) == "2026-11-30"  # naive: taken as UTC
    assert next_period_start("daily", "2026-11-30") == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_period_start("monthly", "2026-12") == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_period_start("none", "all") is None


def decided(*commands: BudgetCommand) -> list[DomainEvent]:
    """The events of `commands` decided one after the other from no events."""
    events: list[DomainEvent] = []
    for command in commands:
        events += BUDGET.decide(command, BUDGET.fold(events))
    return events


def test_the_first_reservation_of_a_new_day_starts_the_period_and_carries_open_ones() -> None:
    """The reset: a new period begins with its whole budget; a reservation of yesterday still
    in flight is carried (and later charged to yesterday)."""
    given = decided(
        SetBudget(10_000, "daily", "ada", NOON, alert_at=0.8),
        Reserve("r2:1", "r2", 1, 3000, NOON),
        Settle("r2:1", 3000),
        Reserve("r1:1", "r1", 1, 1000, NOON),
    )
    events = then(given, Reserve("r3:1", "r3", 1, 4000, TOMORROW))
    assert events == [
        BudgetPeriodStarted(
            period="2026-11-22",
            period_kind="daily",
            limit_tokens=10_000,
            alert_at=0.8,
            balance=10_000,
            earlier=[PeriodBooks(period=DAY, limit_tokens=10_000, used=3000, reserved=1000)],
            open_reservations=[
                OpenReservation(
                    reservation_id="r1:1", run_id="r1", attempt=1, tokens=1000, period=DAY
                )
            ],
        ),
        TokensReserved(
            reservation_id="r3:1",
            run_id="r3",
            attempt=1,
            tokens=4000,
            period="2026-11-22",
            period_used=0,
            period_reserved=4000,
            balance=6000,
        ),
    ]
    state = BUDGET.fold([*given, *events])
    # yesterday's call settles against yesterday; today is untouched
    (late,) = BUDGET.decide(Settle("r1:1", 800), state)
    assert isinstance(late, ReservationSettled)
    assert (late.period, late.period_used, late.period_reserved, late.balance) == (
        DAY,
        3800,
        0,
        6200,
    )
    after = BUDGET.evolve(state, late)
    assert after.books["2026-11-22"].balance == 6000
    assert after.current == "2026-11-22"


def test_yesterday_exhausted_today_fresh() -> None:
    exhausted = [SET, reserved("r1:1", 10_000, 0, 10_000)]
    exhausted += then(exhausted, Settle("r1:1", 10_000))
    state = BUDGET.fold(exhausted)
    with pytest.raises(
        BudgetExceeded,
        match=r"budget exhausted for 2026-11-21: 0 of 10000 tokens "
        r"left, a call may use 1.*resets at 2026-11-22T00:00:00Z",
    ):
        check_can_start(state, 1, NOON)
    check_can_start(state, 10_000, TOMORROW)
    with pytest.raises(BudgetExceeded):
        BUDGET.decide(Reserve("r2:1", "r2", 1, 1, NOON), state)
    assert [type(e) for e in BUDGET.decide(Reserve("r2:1", "r2", 1, 1, TOMORROW), state)] == [
        BudgetPeriodStarted,
        TokensReserved,
    ]


def test_queue_time_check_counts_settled_usage_only() -> None:
    """Calls in flight may give tokens back, so only settled usage refuses a new run."""
    state = BUDGET.fold([SET, reserved("r1:1", 10_000, 0, 10_000)])
    check_can_start(state, 4096, NOON)
    state = BUDGET.fold(
        [
            SET,
            reserved("r1:1", 9000, 0, 9000),
            *then([SET, reserved("r1:1", 9000, 0, 9000)], Settle("r1:1", 9000)),
        ]
    )
    with pytest.raises(BudgetExceeded, match="1000 of 10000 tokens left, a call may use 4096"):
        check_can_start(state, 4096, NOON)
    check_can_start(BUDGET.initial_state, 10**9, NOON)  # no budget: unlimited


def test_changing_the_period_kind_starts_a_new_period_now() -> None:
    (changed,) = then([SET, R1], SetBudget(50_000, "monthly", "ada", NOON))
    assert isinstance(changed, BudgetSet)
    assert (changed.period, changed.period_used, changed.period_reserved, changed.balance) == (
        "2026-11",
        0,
        0,
        50_000,
    )
    state = BUDGET.fold([SET, R1, changed])
    assert state.current == "2026-11"
    assert DAY in state.books  # still holds r1:1, which will settle there
    (settled, *_) = BUDGET.decide(Settle("r1:1", 10), state)
    assert isinstance(settled, ReservationSettled)
    assert settled.period == DAY


def test_a_higher_limit_re_arms_exhaustion() -> None:
    given = [SET, reserved("r1:1", 10_000, 0, 10_000)]
    given += then(given, Settle("r1:1", 10_000))
    raised = then(given, SetBudget(20_000, "daily", "ada", NOON, alert_at=0.8))
    given += raised
    assert not BUDGET.fold(given).books[DAY].exhausted
    given += then(given, Reserve("r2:1", "r2", 1, 10_000, NOON))
    assert BudgetExhausted(period=DAY, used=20_000, limit_tokens=20_000) in then(
        given, Settle("r2:1", 10_000)
    )


# ---------------------------------------------------------------------------- properties


def simulate(seed: int, steps: int = 3000) -> tuple[list[DomainEvent], list[int]]:
    """Random reservations, settlements and releases over several days, decided one by one.
    Returns the events and the settled usage per period."""
    rng = random.Random(seed)
    events: list[DomainEvent] = list(
        BUDGET.decide(SetBudget(10_000, "daily", "ada", NOON, alert_at=0.5), BUDGET.initial_state)
    )
    state = BUDGET.fold(events)
    now = NOON
    attempt_of: dict[str, int] = {}
    for step in range(steps):
        now += timedelta(minutes=rng.randint(0, 30))
        roll = rng.random()
        command: BudgetCommand
        if roll < 0.5 or not state.open:
            run = f"r{rng.randint(0, 40)}"
            attempt_of[run] = attempt_of.get(run, 0) + (1 if rng.random() < 0.9 else 0)
            attempt = max(1, attempt_of[run])
            command = Reserve(f"{run}:{attempt}:{step}", run, attempt, rng.randint(0, 3000), now)
        elif roll < 0.85:
            rid = rng.choice(sorted(state.open))
            command = Settle(rid, rng.randint(0, state.open[rid].tokens))
        else:
            command = Release(rng.choice(sorted(state.open)), "failed")
        try:
            decided = BUDGET.decide(command, state)
        except (BudgetExceeded, ReservationSuperseded):
            continue
        for event in decided:
            state = BUDGET.evolve(state, event)
        events.extend(decided)
    used: dict[str, int] = {}
    for event in events:
        if isinstance(event, ReservationSettled):
            used[event.period] = used.get(event.period, 0) + event.used
    return events, list(used.values())


@pytest.mark.parametrize("seed", range(5))
def test_never_overspent_never_negative(seed: int) -> None:
    events, used_per_period = simulate(seed)
    assert len([e for e in events if isinstance(e, BudgetPeriodStarted)]) >= 3
    assert all(used <= 10_000 for used in used_per_period)
    for event in events:
        balance = getattr(event, "balance", None)
        assert balance is None or balance >= 0, event


@pytest.mark.parametrize("seed", range(5))
def test_loading_from_the_last_period_start_gives_the_same_state(seed: int) -> None:
    """`period_started` carries the whole state, so a load may start there (Decider.snapshot)."""
    events, _ = simulate(seed)
    starts = [i for i, e in enumerate(events) if isinstance(e, BudgetPeriodStarted)]
    for start in starts:
        prefix = events[: start + 1 + 5]
        assert BUDGET.fold(prefix) == BUDGET.fold(prefix[start:])
    assert BUDGET.fold(events) == BUDGET.fold(events[starts[-1] :])
    assert BUDGET.snapshot == "period_started"
