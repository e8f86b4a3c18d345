"""Read models `budgets` (one row per workspace, budget scope and period: limit, used,
reserved, balance, exhausted) and `budget_ledger` (every reservation, settlement, release,
reset and limit change, with the period's figures after it).

Budget events carry their period's figures after them (`period_used`, `period_reserved`,
`balance`), so no statement sums across rows: the `budgets` row is last-writer-wins guarded by
position, and a ledger row is a plain insert. That keeps the batching rule (projection.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

from agentbus.events.budget import (
    BudgetAlerted,
    BudgetExhausted,
    BudgetPeriodStarted,
    BudgetSet,
    ReservationReleased,
    ReservationSettled,
    TokensReserved,
)
from agentbus.events.registry import DomainEvent
from agentbus.projections.projection import Handler, Projection, Statement, Write
from agentbus.store.eventstore import RecordedEvent

# $13 says whether the event carries the configuration (set, period_started) or only figures.
UPSERT_PERIOD = Statement(
    "upsert_period",
    """INSERT INTO {budgets} AS b (workspace, scope, period, period_kind, limit_tokens,
                                   limit_cost, alert_at, used, reserved, balance, position,
                                   updated_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
       ON CONFLICT (workspace, scope, period) DO UPDATE
          SET period_kind = CASE WHEN $13::boolean THEN EXCLUDED.period_kind ELSE b.period_kind END,
              limit_cost = CASE WHEN $13::boolean THEN EXCLUDED.limit_cost ELSE b.limit_cost END,
              alert_at = CASE WHEN $13::boolean THEN EXCLUDED.alert_at ELSE b.alert_at END,
              limit_tokens = EXCLUDED.limit_tokens,
              used = EXCLUDED.used,
              reserved = EXCLUDED.reserved,
              balance = EXCLUDED.balance,
              position = EXCLUDED.position,
              updated_at = EXCLUDED.updated_at
        WHERE b.position < EXCLUDED.position""",
)
MARK = Statement(
    "mark",
    """UPDATE {budgets}
          SET alerted_at = CASE WHEN $4 = 'alerted' THEN coalesce(alerted_at, $5)
                                ELSE alerted_at END,
              exhausted_at = CASE WHEN $4 = 'exhausted' THEN coalesce(exhausted_at, $5)
                                  ELSE exhausted_at END
        WHERE workspace = $1 AND scope = $2 AND period = $3""",
)
INSERT_ENTRY = Statement(
    "insert_entry",
    """INSERT INTO {budget_ledger} (workspace, scope, position, period, entry, reservation_id,
                                    run_id, attempt, reserved_delta, used_delta, reason,
                                    limit_tokens, period_used, period_reserved, balance, at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
       ON CONFLICT (workspace, position) DO NOTHING""",
)

Figures = (
    BudgetSet | BudgetPeriodStarted | TokensReserved | ReservationSettled | ReservationReleased
)


class BudgetsProjection(Projection):
    name: ClassVar[str] = "budgets"
    version: ClassVar[int] = 1
    tables: ClassVar[tuple[str, ...]] = ("budgets", "budget_ledger")
    schema: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE {budgets} (
               workspace    text             NOT NULL,
               scope        text             NOT NULL,
               period       text             NOT NULL,
               period_kind  text,
               limit_tokens bigint           NOT NULL,
               limit_cost   double precision,
               alert_at     double precision,
               used         bigint           NOT NULL,
               reserved     bigint           NOT NULL,
               balance      bigint           NOT NULL,
               exhausted    boolean          GENERATED ALWAYS AS (used >= limit_tokens) STORED,
               alerted_at   timestamptz,
               exhausted_at timestamptz,
               position     bigint           NOT NULL,
               updated_at   timestamptz      NOT NULL,
               PRIMARY KEY (workspace, scope, period))""",
        """CREATE TABLE {budget_ledger} (
               workspace       text        NOT NULL,
               scope           text        NOT NULL,
               position        bigint      NOT NULL,
               period          text        NOT NULL,
               entry           text        NOT NULL CHECK (entry IN
                                   ('limit_set', 'period_started', 'reserved', 'settled',
                                    'released')),
               reservation_id  text,
               run_id          text,
               attempt         integer,
               reserved_delta  bigint      NOT NULL,
               used_delta      bigint      NOT NULL,
               reason          text,
               limit_tokens    bigint      NOT NULL,
               period_used     bigint      NOT NULL,
               period_reserved bigint      NOT NULL,
               balance         bigint      NOT NULL,
               at              timestamptz NOT NULL,
               PRIMARY KEY (workspace, position))""",
        "CREATE INDEX ON {budget_ledger} (workspace, scope, period, position)",
        "CREATE INDEX ON {budget_ledger} (workspace, run_id)",
    )
    # The period row first (inserted by the event that starts the period), then its marks.
    statements: ClassVar[tuple[Statement, ...]] = (UPSERT_PERIOD, MARK, INSERT_ENTRY)

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        return {
            BudgetSet: self.figures,
            BudgetPeriodStarted: self.figures,
            TokensReserved: self.figures,
            ReservationSettled: self.figures,
            ReservationReleased: self.figures,
            BudgetAlerted: self.mark,
            BudgetExhausted: self.mark,
        }

    @staticmethod
    def figures(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        assert isinstance(event, Figures)
        ref = recorded.ref
        limit = event.balance + event.period_used + event.period_reserved
        configured = isinstance(event, BudgetSet | BudgetPeriodStarted)
        config = (
            (event.period_kind, event.limit_cost, event.alert_at)
            if isinstance(event, BudgetSet | BudgetPeriodStarted)
            else (None, None, None)
        )
        yield UPSERT_PERIOD.row(
            ref.workspace,
            ref.id,
            event.period,
            config[0],
            limit,
            config[1],
            config[2],
            event.period_used,
            event.period_reserved,
            event.balance,
            recorded.position,
            recorded.time,
            configured,
        )
        reservation_id: str | None = None
        run_id: str | None = None
        attempt: int | None = None
        reason: str | None = None
        reserved_delta = used_delta = 0
        entry = "limit_set" if isinstance(event, BudgetSet) else "period_started"
        if isinstance(event, TokensReserved | ReservationSettled | ReservationReleased):
            reservation_id, run_id, attempt = event.reservation_id, event.run_id, event.attempt
            if isinstance(event, TokensReserved):
                entry, reserved_delta = "reserved", event.tokens
            elif isinstance(event, ReservationSettled):
                entry, reserved_delta, used_delta = "settled", -event.tokens, event.used
            else:
                entry, reserved_delta, reason = "released", -event.tokens, event.reason
        yield INSERT_ENTRY.row(
            ref.workspace,
            ref.id,
            recorded.position,
            event.period,
            entry,
            reservation_id,
            run_id,
            attempt,
            reserved_delta,
            used_delta,
            reason,
            limit,
            event.period_used,
            event.period_reserved,
            event.balance,
            recorded.time,
        )

    @staticmethod
    def mark(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        assert isinstance(event, BudgetAlerted | BudgetExhausted)
        ref = recorded.ref
        kind = "alerted" if isinstance(event, BudgetAlerted) else "exhausted"
        yield MARK.row(ref.workspace, ref.id, event.period, kind, recorded.time)
