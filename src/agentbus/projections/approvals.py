"""Read model `approvals`: one row per approval, pending or decided, by workspace and run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

from agentbus.audit.sealing import ERASED
from agentbus.events.approval import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
)
from agentbus.events.privacy import SubjectForgotten
from agentbus.events.registry import DomainEvent
from agentbus.projections.projection import Handler, Projection, Statement, Write
from agentbus.store.eventstore import RecordedEvent

INSERT_APPROVAL = Statement(
    "insert_approval",
    """INSERT INTO {approvals} (workspace, id, run_id, attempt, session_id, tool,
                                arguments_digest, arguments_preview, reason, requested_by,
                                status, requested_at, expires_at, position, data_subject,
                                requested_position)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', $11, $12, $13, $14, $13)
       ON CONFLICT (workspace, id) DO NOTHING""",
)
# Inserts run before this statement in every batch, and an approval is decided once: the
# position guard only keeps a replayed batch from applying twice.
DECIDE = Statement(
    "decide",
    """UPDATE {approvals}
          SET status = $3, decided_at = $4, decided_by = $5, decision_reason = $6, rule = $7,
              jti = $8, position = $9
        WHERE workspace = $1 AND id = $2 AND position < $9""",
)

# What the request wrote (the preview and the agent's reason), if written before the erasure:
# judged by `requested_position`, which the decision does not move, so the result does not
# depend on where batches are cut.
ERASE_SUBJECT = Statement(
    "erase_subject",
    f"""UPDATE {{approvals}}
           SET arguments_preview = '{ERASED}',
               reason = CASE WHEN reason IS NULL THEN NULL ELSE '{ERASED}' END
         WHERE workspace = $1 AND data_subject = $2 AND requested_position < $3
           AND arguments_preview <> '{ERASED}'""",
)


class ApprovalsProjection(Projection):
    name: ClassVar[str] = "approvals"
    version: ClassVar[int] = 2  # 2: data_subject (a forgotten subject's previews are erased)
    tables: ClassVar[tuple[str, ...]] = ("approvals",)
    schema: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE {approvals} (
               workspace         text        NOT NULL,
               id                text        NOT NULL,
               run_id            text        NOT NULL,
               attempt           integer     NOT NULL,
               session_id        text,
               tool              text        NOT NULL,
               arguments_digest  text        NOT NULL,
               arguments_preview text        NOT NULL,
               reason            text,
               requested_by      text        NOT NULL,
               status            text        NOT NULL,
               requested_at      timestamptz NOT NULL,
               expires_at        timestamptz NOT NULL,
               decided_at        timestamptz,
               decided_by        text,
               decision_reason   text,
               rule              text,
               jti               text,
               position          bigint      NOT NULL,
               data_subject       text,
               requested_position bigint      NOT NULL,
               PRIMARY KEY (workspace, id))""",
        "CREATE INDEX ON {approvals} (workspace, status, requested_at DESC, id)",
        "CREATE INDEX ON {approvals} (workspace, run_id, requested_at)",
    )
    statements: ClassVar[tuple[Statement, ...]] = (INSERT_APPROVAL, DECIDE, ERASE_SUBJECT)

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        return {
            ApprovalRequested: self.requested,
            ApprovalGranted: self.decided,
            ApprovalDenied: self.decided,
            ApprovalExpired: self.decided,
            SubjectForgotten: self.forgotten,
        }

    @staticmethod
    def requested(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        assert isinstance(event, ApprovalRequested)
        ref = recorded.ref
        yield INSERT_APPROVAL.row(
            ref.workspace,
            ref.id,
            event.run_id,
            event.attempt,
            event.session_id,
            event.tool,
            event.arguments_digest,
            event.arguments_preview,
            event.reason,
            event.requested_by,
            recorded.time,
            event.expires_at,
            recorded.position,
            event.author,
        )

    @staticmethod
    def forgotten(recorded: RecordedEvent) -> Iterator[Write]:
        """A forgotten subject's approvals keep no preview and no reason (docs/erasure.md)."""
        event = recorded.event
        assert isinstance(event, SubjectForgotten)
        yield ERASE_SUBJECT.row(recorded.ref.workspace, event.subject, recorded.position)

    @staticmethod
    def decided(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        ref = recorded.ref
        by: str | None
        match event:
            case ApprovalGranted() | ApprovalDenied():
                status = "granted" if isinstance(event, ApprovalGranted) else "denied"
                by, reason, rule, jti = event.by, event.reason, event.rule, event.jti
            case ApprovalExpired():
                status, by, reason, rule, jti = "expired", None, None, None, None
            case _:
                raise TypeError(f"not an approval decision: {event!r}")
        yield DECIDE.row(
            ref.workspace, ref.id, status, recorded.time, by, reason, rule, jti, recorded.position
        )
