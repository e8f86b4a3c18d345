"""Read models `sessions` and `messages`: how session events become rows.

One projection owns both tables, so one pass over the stream feeds both (a session's message
count and its messages come from the same events).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from agentbus.audit.sealing import ERASED
from agentbus.events.privacy import SubjectForgotten
from agentbus.events.registry import DomainEvent
from agentbus.events.session import MessageReceived, MessageSent, SessionClosed, SessionOpened
from agentbus.projections.projection import Handler, Projection, Statement, Write
from agentbus.store.eventstore import RecordedEvent

INSERT_SESSION = Statement(
    "insert_session",
    """INSERT INTO {sessions} (workspace, id, channel, title, agent, status, created_at,
                               message_count, position)
       VALUES ($1, $2, $3, $4, $5, 'open', $6, 0, $7)
       ON CONFLICT (workspace, id) DO NOTHING""",
)
INSERT_MESSAGE = Statement.copy(
    "insert_message",
    # Keyed by position: new by construction. Most of a chat's events are messages; with COPY
    # instead of an executemany INSERT the catch-up ran ~1.1x faster (docs/benchmarks.md).
    "{messages}",
    (
        "workspace",
        "session_id",
        "position",
        "message_id",
        "direction",
        "author",
        "text",
        "created_at",
        "external_id",
        "run_id",
        "data_subject",
    ),
)
COUNT_MESSAGE = Statement(
    "count_message",
    """UPDATE {sessions}
          SET message_count = message_count + $5,
              last_message_at = GREATEST(last_message_at, $3),
              position = GREATEST(position, $4)
        WHERE workspace = $1 AND id = $2""",
    # One update per session per batch: counts add up, times and positions take the latest.
    merge_on=(0, 1),
    merge=lambda a, b: (a[0], a[1], max(a[2], b[2]), max(a[3], b[3]), a[4] + b[4]),
)
CLOSE_SESSION = Statement(
    "close_session",
    """UPDATE {sessions}
          SET status = 'closed', closed_at = $3, close_reason = $4,
              position = GREATEST(position, $5)
        WHERE workspace = $1 AND id = $2""",
)
ERASE_SUBJECT = Statement(
    "erase_subject",
    # Only what was written before the erasure: the same rows whatever the batch cuts (rows
    # after it are inserted later or, within a batch, have a higher position), and the same
    # as a rebuild, which reads those texts as [erased] anyway (their key is gone).
    f"""UPDATE {{messages}} SET text = '{ERASED}'
         WHERE workspace = $1 AND data_subject = $2 AND position < $3
           AND text <> '{ERASED}'""",
)


class SessionsProjection(Projection):
    name: ClassVar[str] = "sessions"
    version: ClassVar[int] = 2  # 2: messages.data_subject (agents' replies are erased too)
    tables: ClassVar[tuple[str, ...]] = ("sessions", "messages")
    schema: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE {sessions} (
               workspace       text        NOT NULL,
               id              text        NOT NULL,
               channel         text        NOT NULL,
               title           text,
               agent           text,
               status          text        NOT NULL,
               created_at      timestamptz NOT NULL,
               closed_at       timestamptz,
               close_reason    text,
               last_message_at timestamptz,
               message_count   integer     NOT NULL,
               position        bigint      NOT NULL,
               PRIMARY KEY (workspace, id))
           WITH (fillfactor = 50)""",
        "CREATE INDEX ON {sessions} (workspace, created_at DESC, id)",
        """CREATE TABLE {messages} (
               workspace   text        NOT NULL,
               session_id  text        NOT NULL,
               position    bigint      NOT NULL,
               message_id  text        NOT NULL,
               direction   text        NOT NULL CHECK (direction IN ('in', 'out')),
               author      text        NOT NULL,
               text        text        NOT NULL,
               created_at  timestamptz NOT NULL,
               external_id text,
               run_id      text,
               data_subject text,
               PRIMARY KEY (workspace, position))""",
        "CREATE INDEX ON {messages} (workspace, session_id, position)",
    )
    # Inserts first, then the updates that need the rows: see projection.py for the rule.
    # `sessions` is updated once per message: fillfactor 50 leaves room on each page for
    # HOT updates (no index churn, few dead tuples); measured ~2x faster catch-up
    # (docs/benchmarks.md, scenario projection).
    statements: ClassVar[tuple[Statement, ...]] = (
        INSERT_SESSION,
        INSERT_MESSAGE,
        COUNT_MESSAGE,
        CLOSE_SESSION,
        ERASE_SUBJECT,
    )

    def handlers(self) -> Mapping[type[DomainEvent], Handler]:
        return {
            SessionOpened: self.opened,
            SessionClosed: self.closed,
            MessageReceived: self.received,
            MessageSent: self.sent,
            SubjectForgotten: self.forgotten,
        }

    # The handlers run for every event of a catch-up: each returns its rows as a tuple and
    # narrows its event with `type(...) is` (cheaper than a generator and `isinstance` on a
    # pydantic model).

    @staticmethod
    def opened(recorded: RecordedEvent) -> tuple[Write, ...]:
        event = recorded.event
        assert type(event) is SessionOpened
        ref = recorded.ref
        return (
            INSERT_SESSION.row(
                ref.workspace,
                ref.id,
                event.channel,
                event.title,
                event.agent,
                recorded.time,
                recorded.position,
            ),
        )

    @staticmethod
    def closed(recorded: RecordedEvent) -> tuple[Write, ...]:
        event = recorded.event
        assert type(event) is SessionClosed
        ref = recorded.ref
        return (
            CLOSE_SESSION.row(
                ref.workspace, ref.id, recorded.time, event.reason, recorded.position
            ),
        )

    @staticmethod
    def received(recorded: RecordedEvent) -> tuple[Write, ...]:
        event = recorded.event
        assert type(event) is MessageReceived
        return _message_rows(recorded, event, "in", event.external_id, None, event.author)

    @staticmethod
    def sent(recorded: RecordedEvent) -> tuple[Write, ...]:
        event = recorded.event
        assert type(event) is MessageSent
        return _message_rows(recorded, event, "out", None, event.run_id, event.recipient)

    @staticmethod
    def forgotten(recorded: RecordedEvent) -> tuple[Write, ...]:
        """A forgotten subject's messages, and the replies to them, keep no text
        (docs/erasure.md)."""
        event = recorded.event
        assert type(event) is SubjectForgotten
        return (ERASE_SUBJECT.row(recorded.ref.workspace, event.subject, recorded.position),)


def _message_rows(
    recorded: RecordedEvent,
    event: MessageReceived | MessageSent,
    direction: str,
    external_id: str | None,
    run_id: str | None,
    data_subject: str | None,
) -> tuple[Write, ...]:
    """A message's row (`data_subject`: whose key seals its text), and its session's count
    moved by one."""
    ref, at, position = recorded.ref, recorded.time, recorded.position
    return (
        INSERT_MESSAGE.row(
            ref.workspace,
            ref.id,
            position,
            event.message_id,
            direction,
            event.author,
            event.text,
            at,
            external_id,
            run_id,
            data_subject,
        ),
        COUNT_MESSAGE.row(ref.workspace, ref.id, at, position, 1),
    )
