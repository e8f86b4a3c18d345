"""The peer of scenario `projection`: the `eventsourcing` library (9.5.6), as its documentation
shows a projection into a Postgres materialised view, on the same Postgres as agentbus.

- `SessionsApp` stores `Session` aggregates (opened, messages received and sent, closed) in its
  own database, through its Postgres persistence module;
- `SessionsView` is a `PostgresTrackingRecorder` holding the same `sessions` and `messages`
  tables as agentbus's read model (the same DDL), in another database;
- `SessionsViewProjection` turns each event into those rows; the library's `ProjectionRunner`
  feeds it the application's events from position 0 and records each event's tracking row in
  the same transaction as its rows, as the library does (one transaction per event: there is no
  batching in its projection API).

Needs the `bench` extra (`pip install -e '.[bench]'`): `available()` says whether it is there,
and nothing here is imported by the scenario otherwise. Everything is synchronous (the library
runs its projection in threads): the scenario calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from psycopg.sql import SQL
from sqlalchemy.engine import make_url

from agentbus.projections.sessions import SessionsProjection
from benchmarks.projection import SessionPlan

WORKSPACE = "peer"
VIEW_NAME = "sessionsview"
"""The projection's name: its environment variables are prefixed `SESSIONSVIEW_`."""


class Session(Aggregate):
    """A conversation, with the same events as agentbus's session aggregate."""

    class Opened(Aggregate.Created):
        channel: str
        title: str | None
        agent: str | None

    class MessageReceived(Aggregate.Event):
        message_id: str
        author: str
        text: str
        external_id: str | None

    class MessageSent(Aggregate.Event):
        message_id: str
        author: str
        text: str
        run_id: str | None

    class Closed(Aggregate.Event):
        reason: str | None

    @event(Opened)
    def __init__(self, channel: str, title: str | None, agent: str | None) -> None:
        self.channel = channel
        self.title = title
        self.agent = agent
        self.messages = 0
        self.closed = False

    @event(MessageReceived)
    def receive(self, message_id: str, author: str, text: str, external_id: str | None) -> None:
        self.messages += 1

    @event(MessageSent)
    def send(self, message_id: str, author: str, text: str, run_id: str | None) -> None:
        self.messages += 1

    @event(Closed)
    def close(self, reason: str | None) -> None:
        self.closed = True


class SessionsApp(Application[UUID]):
    """Stores the sessions' events (table `stored_events` of its database)."""


_INSERT_SESSION = SQL(
    """INSERT INTO sessions (workspace, id, channel, title, agent, status, created_at,
                             message_count, position)
       VALUES (%s, %s, %s, %s, %s, 'open', %s, 0, %s)
       ON CONFLICT (workspace, id) DO NOTHING"""
)
_INSERT_MESSAGE = SQL(
    """INSERT INTO messages (workspace, session_id, position, message_id, direction, author,
                             text, created_at, external_id, run_id, data_subject)
       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
       ON CONFLICT (workspace, position) DO NOTHING"""
)
_COUNT_MESSAGE = SQL(
    """UPDATE sessions
          SET message_count = message_count + 1,
              last_message_at = GREATEST(last_message_at, %s),
              position = GREATEST(position, %s)
        WHERE workspace = %s AND id = %s"""
)
_CLOSE_SESSION = SQL(
    """UPDATE sessions
          SET status = 'closed', closed_at = %s, close_reason = %s,
              position = GREATEST(position, %s)
        WHERE workspace = %s AND id = %s"""
)


class SessionsView(PostgresTrackingRecorder):
    """The materialised view: agentbus's `sessions` and `messages` tables, plus the library's
    tracking table, each change in one transaction with its tracking row."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        tables = {"sessions": "sessions", "messages": "messages"}
        for ddl in SessionsProjection.schema:
            self.sql_create_statements.append(SQL(ddl.format_map(tables)).format())

    def open_session(
        self,
        session: str,
        channel: str,
        title: str | None,
        agent: str | None,
        at: datetime,
        tracking: Tracking,
    ) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            position = tracking.notification_id
            curs.execute(
                _INSERT_SESSION,
                (WORKSPACE, session, channel, title, agent, at, position),
                prepare=True,
            )

    def add_message(
        self,
        session: str,
        message_id: str,
        direction: str,
        author: str,
        text: str,
        at: datetime,
        external_id: str | None,
        run_id: str | None,
        tracking: Tracking,
    ) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            position = tracking.notification_id
            curs.execute(
                _INSERT_MESSAGE,
                (
                    WORKSPACE,
                    session,
                    position,
                    message_id,
                    direction,
                    author,
                    text,
                    at,
                    external_id,
                    run_id,
                    author if direction == "in" else None,  # the rows the projection writes
                ),
                prepare=True,
            )
            curs.execute(_COUNT_MESSAGE, (at, position, WORKSPACE, session), prepare=True)

    def close_session(
        self, session: str, reason: str | None, at: datetime, tracking: Tracking
    ) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(
                _CLOSE_SESSION,
                (at, reason, tracking.notification_id, WORKSPACE, session),
                prepare=True,
            )


class SessionsViewProjection(Projection[SessionsView]):
    name = VIEW_NAME

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)  # not ours: just move past it

    @process_event.register
    def _opened(self, domain_event: Session.Opened, tracking: Tracking) -> None:
        e = domain_event
        self.view.open_session(
            str(e.originator_id), e.channel, e.title, e.agent, e.timestamp, tracking
        )

    @process_event.register
    def _received(self, domain_event: Session.MessageReceived, tracking: Tracking) -> None:
        e = domain_event
        self.view.add_message(
            str(e.originator_id),
            e.message_id,
            "in",
            e.author,
            e.text,
            e.timestamp,
            e.external_id,
            None,
            tracking,
        )

    @process_event.register
    def _sent(self, domain_event: Session.MessageSent, tracking: Tracking) -> None:
        e = domain_event
        self.view.add_message(
            str(e.originator_id),
            e.message_id,
            "out",
            e.author,
            e.text,
            e.timestamp,
            None,
            e.run_id,
            tracking,
        )

    @process_event.register
    def _closed(self, domain_event: Session.Closed, tracking: Tracking) -> None:
        e = domain_event
        self.view.close_session(str(e.originator_id), e.reason, e.timestamp, tracking)


# ---------------------------------------------------------------------- driving it


def environment(postgres_url: str, database: str) -> dict[str, str]:
    """The library's configuration (environment variables) for the application's `database`
    on the server of `postgres_url` (a unix-socket `?host=/dir` URL works too)."""
    url = make_url(postgres_url)
    host = url.host or str(url.query.get("host", "localhost"))
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": database,
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_PASSWORD": url.password or "",
    }


def fill(env: dict[str, str], sessions: Sequence[SessionPlan], per_save: int = 100) -> int:
    """Record the sessions' events through `SessionsApp`, about `per_save` events per save (one
    transaction), as a bulk import would. Returns the last notification id."""
    app = SessionsApp(env=env)
    try:
        pending: list[Session] = []
        size = 0
        for plan in sessions:
            session = Session(channel=plan.channel, title=plan.title, agent=plan.agent)
            for number in range(plan.messages):
                message = plan.message(number)
                if message.inbound:
                    session.receive(
                        message.message_id, message.author, message.text, message.external_id
                    )
                else:
                    session.send(message.message_id, message.author, message.text, message.run_id)
            if plan.closed:
                session.close(plan.close_reason)
            pending.append(session)
            size += plan.events
            if size >= per_save:
                app.save(*pending)
                pending, size = [], 0
        if pending:
            app.save(*pending)
        return app.recorder.max_notification_id() or 0
    finally:
        app.close()


@dataclass(frozen=True)
class CatchUp:
    seconds: float
    cpu_seconds: float
    sessions: int
    messages: int


def catch_up(
    env: dict[str, str], view_database: str, last: int, *, poll: float, timeout: float
) -> CatchUp:
    """Run the library's `ProjectionRunner` from position 0 into a fresh view in
    `view_database` until it has tracked notification `last`; time it (from the runner's
    construction, which creates the view's tables, as agentbus's time includes creating its
    generation's tables)."""
    env = {**env, f"{VIEW_NAME.upper()}_POSTGRES_DBNAME": view_database}
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = wall + timeout
    with ProjectionRunner(
        application_class=SessionsApp,
        projection_class=SessionsViewProjection,
        view_class=SessionsView,
        env=env,
    ) as runner:
        while (runner.view.max_tracking_id(runner.app_name) or 0) < last:
            if runner.is_interrupted.is_set():
                runner.run_forever()  # re-raises the processing thread's error
                raise RuntimeError("the ProjectionRunner stopped before catching up")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the ProjectionRunner did not catch up within {timeout:g}s")
            runner.run_forever(timeout=poll)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with runner.view.datastore.transaction(commit=False) as curs:
            curs.execute(
                "SELECT (SELECT count(*) FROM sessions) AS sessions, "
                "(SELECT count(*) FROM messages) AS messages"
            )
            row = curs.fetchone()
    assert row is not None
    return CatchUp(wall, cpu, int(row["sessions"]), int(row["messages"]))
