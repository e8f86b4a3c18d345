"""Read models `runs` (one row per run: status, attempts, timings, error, usage) and
`run_steps` (the turn ledger: every event of every run with its position)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import orjson

from agentbus.audit.sealing import ERASED
from agentbus.events.privacy import Personal, SubjectForgotten
from agentbus.events.registry import DomainEvent
from agentbus.events.run import (
    RunCancelled,
    RunFailed,
    RunQueued,
    RunResumed,
    RunRetryScheduled,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    RunUsageRecorded,
    RunWaitingApproval,
)
from agentbus.projections.projection import Handler, Projection, Statement, Write
from agentbus.store.eventstore import RecordedEvent

INSERT_RUN = Statement(
    "insert_run",
    """INSERT INTO {runs} (workspace, id, session_id, agent, executor, status, attempts,
                           max_attempts, queued_at, deadline_at, tokens_in, tokens_out, position,
                           author)
       VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, $7, $8, 0, 0, $9, $10)
       ON CONFLICT (workspace, id) DO NOTHING""",
)
INSERT_STEP = Statement(
    "insert_step",
    """INSERT INTO {run_steps} (workspace, run_id, position, step, attempt, detail, at)
       VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7)
       ON CONFLICT (workspace, position) DO NOTHING""",
)
# Every transition goes through this one statement, guarded by position: last writer wins,
# whatever the batch boundaries. Columns a transition does not know are passed as NULL and kept.
TRANSITION = Statement(
    "transition",
    """UPDATE {runs}
          SET status = $3,
              attempts = GREATEST(attempts, coalesce($4, attempts)),
              started_at = coalesce(started_at, $5),
              finished_at = coalesce($6, finished_at),
              error_class = CASE WHEN $7::text IS NOT NULL THEN $7 ELSE error_class END,
              error_message = CASE WHEN $7::text IS NOT NULL THEN $8 ELSE error_message END,
              error_sealed_at = CASE WHEN $7::text IS NOT NULL THEN $13 ELSE error_sealed_at END,
              retry_at = $9,
              output = coalesce($10, output),
              position = $11,
              updated_at = $12
        WHERE workspace = $1 AND id = $2 AND position < $11""",
)
ADD_USAGE = Statement(
    "add_usage",
    """UPDATE {runs} SET tokens_in = tokens_in + $3, tokens_out = tokens_out + $4,
                         model = $5
        WHERE workspace = $1 AND id = $2""",
)


ERASE_SUBJECT = Statement(
    "erase_subject",
    # As the sessions projection erases messages: only what was written before the erasure,
    # judged by the position that wrote it (`position` for the output, which only the last
    # transition writes; `error_sealed_at` for the error, which later transitions keep), so
    # the result does not depend on where batches are cut.
    f"""UPDATE {{runs}}
           SET output = CASE WHEN output IS NOT NULL AND position < $3
                             THEN '{ERASED}' ELSE output END,
               error_message = CASE WHEN error_sealed_at < $3
                                    THEN '{ERASED}' ELSE error_message END
         WHERE workspace = $1 AND author = $2
           AND ((output IS NOT NULL AND output <> '{ERASED}' AND position < $3)
                OR (error_sealed_at < $3 AND error_message <> '{ERASED}'))""",
)


class RunsProjection(Projection):
    name: ClassVar[str] = "runs"
    # 2: runs.author (a forgotten subject's outputs are erased); 3: runs.error_sealed_at
    # (their error messages too)
    version: ClassVar[int] = 3
    tables: ClassVar[tuple[str, ...]] = ("runs", "run_steps")
    schema: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE {runs} (
               workspace     text        NOT NULL,
               id            text        NOT NULL,
               session_id    text,
               agent         text        NOT NULL,
               executor      text        NOT NULL,
               status        text        NOT NULL,
               attempts      integer     NOT NULL,
               max_attempts  integer     NOT NULL,
               queued_at     timestamptz NOT NULL,
               deadline_at   timestamptz,
               started_at    timestamptz,
               finished_at   timestamptz,
               retry_at      timestamptz,
               error_class   text,
               error_message text,
               output        text,
               model         text,
               tokens_in     bigint      NOT NULL,
               tokens_out    bigint      NOT NULL,
               position      bigint      NOT NULL,
               updated_at    timestamptz,
               author        text,
               error_sealed_at bigint,
               PRIMARY KEY (workspace, id))""",
        "CREATE INDEX ON {runs} (workspace, queued_at DESC, id)",
        "CREATE INDEX ON {runs} (workspace, session_id, queued_at)",
        """CREATE TABLE {run_steps} (
               workspace text        NOT NULL,
               run_id    text        NOT NULL,
               position  bigint      NOT NULL,
               step      text        NOT NULL,
               attempt   integer,
               detail    jsonb       NOT NULL,
               at        timestamptz NOT NULL,
               PRIMARY KEY (workspace, position))""",
        "CREATE INDEX ON {run_steps} (workspace, run_id, position)",
    )
    statements: ClassVar[tuple[Statement, ...]] = (
        INSERT_RUN,
        INSERT_STEP,
        TRANSITION,
        ADD_USAGE,
        ERASE_SUBJECT,
    )

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        return {
            RunQueued: self.queued,
            RunStarted: self.step,
            RunWaitingApproval: self.step,
            RunResumed: self.step,
            RunSucceeded: self.step,
            RunFailed: self.step,
            RunRetryScheduled: self.step,
            RunCancelled: self.step,
            RunTimedOut: self.step,
            RunUsageRecorded: self.usage,
            SubjectForgotten: self.forgotten,
        }

    @staticmethod
    def queued(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        assert isinstance(event, RunQueued)
        ref = recorded.ref
        yield INSERT_RUN.row(
            ref.workspace,
            ref.id,
            event.session_id,
            event.agent,
            event.executor,
            event.max_attempts,
            recorded.time,
            event.deadline_at,
            recorded.position,
            event.author,
        )
        yield _step(recorded, None, {"agent": event.agent, "executor": event.executor})

    @staticmethod
    def step(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        ref = recorded.ref
        at = recorded.time
        attempt: int | None = getattr(event, "attempt", None)
        started = finished = retry_at = None
        error_class: str | None = None
        error_message: str | None = None
        sealed_error = False  # the message is the author's personal data (a sealed field)
        output: str | None = None
        match event:
            case RunStarted():
                status, started = "running", at
            case RunWaitingApproval():
                status = "waiting_approval"
            case RunResumed():
                status = "running"
            case RunRetryScheduled():
                status, retry_at = "retry_scheduled", event.at
                error_class, error_message = event.error_class, event.message
                sealed_error = True
                attempt = event.attempt - 1
            case RunSucceeded():
                status, finished, output = "succeeded", at, event.output
            case RunFailed():
                status, finished = "failed", at
                error_class, error_message = event.error_class, event.message
                sealed_error = True
            case RunCancelled():
                status, finished = "cancelled", at
                error_class, error_message = "cancelled", event.reason or f"by {event.by}"
            case RunTimedOut():
                status, finished = "timed_out", at
                error_class, error_message = "timeout", "deadline passed"
            case _:
                raise TypeError(f"not a run transition: {event!r}")
        yield TRANSITION.row(
            ref.workspace,
            ref.id,
            status,
            attempt,
            started,
            finished,
            error_class,
            error_message,
            retry_at,
            output,
            recorded.position,
            at,
            recorded.position if sealed_error else None,
        )
        yield _step(recorded, attempt, event.model_dump(mode="json", exclude=_personal(event)))

    @staticmethod
    def forgotten(recorded: RecordedEvent) -> Iterator[Write]:
        """A forgotten subject's runs keep no output and no error message (docs/erasure.md)."""
        event = recorded.event
        assert isinstance(event, SubjectForgotten)
        yield ERASE_SUBJECT.row(recorded.ref.workspace, event.subject, recorded.position)

    @staticmethod
    def usage(recorded: RecordedEvent) -> Iterator[Write]:
        event = recorded.event
        assert isinstance(event, RunUsageRecorded)
        ref = recorded.ref
        yield ADD_USAGE.row(ref.workspace, ref.id, event.tokens_in, event.tokens_out, event.model)
        yield _step(recorded, None, event.model_dump(mode="json"))


def _personal(event: DomainEvent) -> set[str]:
    """The fields the turn ledger leaves out: the sealed ones (their plaintext is in the
    events, under the subject's key, and the erasable columns of `runs`)."""
    personal: Personal | None = getattr(event, "personal", None)
    return set(personal.fields) if personal is not None else set()


def _step(recorded: RecordedEvent, attempt: int | None, detail: Mapping[str, Any]) -> Write:
    ref = recorded.ref
    return INSERT_STEP.row(
        ref.workspace,
        ref.id,
        recorded.position,
        recorded.event.kind.name,
        attempt,
        orjson.dumps(detail).decode(),
        recorded.time,
    )
