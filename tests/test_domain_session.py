"""The session decider as given/when/then tables."""

from __future__ import annotations

import pytest

from agentbus.domain.session import (
    SESSION,
    AssignRun,
    CloseSession,
    OpenSession,
    ReceiveMessage,
    ReleaseRun,
    SendMessage,
    SessionAlreadyExists,
    SessionBusy,
    SessionClosedError,
    SessionCommand,
    SessionNotFound,
)
from agentbus.events.registry import DomainEvent
from agentbus.events.session import (
    ConcurrencyPolicy,
    MessageReceived,
    MessageSent,
    RunAssigned,
    RunEnqueued,
    RunInterrupted,
    RunReleased,
    SessionClosed,
    SessionOpened,
)

OPENED = SessionOpened(channel="web", agent="echo")
CLOSED = SessionClosed(reason="bye")


def then(given: list[DomainEvent], when: SessionCommand) -> list[DomainEvent]:
    return list(SESSION.decide(when, SESSION.fold(given)))


def test_open_post_and_close() -> None:
    assert then([], OpenSession("web", agent="echo")) == [OPENED]
    assert then([OPENED], OpenSession("web", agent="echo")) == []
    assert then([OPENED], ReceiveMessage("m1", "ada", "hi", "x1")) == [
        MessageReceived(message_id="m1", author="ada", text="hi", external_id="x1")
    ]
    assert then([OPENED], SendMessage("m2", "echo", "hi", "r1")) == [
        MessageSent(message_id="m2", author="echo", text="hi", run_id="r1")
    ]
    assert then([OPENED], CloseSession("bye")) == [CLOSED]
    assert then([OPENED, CLOSED], CloseSession()) == []


@pytest.mark.parametrize(
    ("given", "when", "error"),
    [
        ([], ReceiveMessage("m", "a", "t"), SessionNotFound),
        ([], CloseSession(), SessionNotFound),
        ([OPENED, CLOSED], ReceiveMessage("m", "a", "t"), SessionClosedError),
        ([OPENED, CLOSED], SendMessage("m", "a", "t"), SessionClosedError),
        ([OPENED], OpenSession("telegram"), SessionAlreadyExists),
    ],
)
def test_refusals(given: list[DomainEvent], when: SessionCommand, error: type[Exception]) -> None:
    with pytest.raises(error):
        then(given, when)


def test_state() -> None:
    state = SESSION.fold([OPENED, MessageReceived(message_id="m", author="a", text="t")])
    assert (state.status, state.agent, state.messages) == ("open", "echo", 1)


# ---------------------------------------------------------------------------- concurrency


def opened(policy: ConcurrencyPolicy) -> SessionOpened:
    return SessionOpened(channel="web", agent="echo", concurrency=policy)


def assigned(run_id: str) -> RunAssigned:
    return RunAssigned(run_id=run_id, input=f"in {run_id}", trigger_message_id=None)


def enqueued(run_id: str) -> RunEnqueued:
    return RunEnqueued(run_id=run_id, input=f"in {run_id}", trigger_message_id=None)


@pytest.mark.parametrize(
    ("given", "when", "expected"),
    [
        ([opened("enqueue")], AssignRun("r1", "in r1"), [assigned("r1")]),
        ([opened("enqueue"), assigned("r1")], AssignRun("r2", "in r2"), [enqueued("r2")]),
        ([opened("enqueue"), assigned("r1")], AssignRun("r1", "in r1"), []),
        (
            [opened("interrupt"), assigned("r1")],
            AssignRun("r2", "in r2"),
            [RunInterrupted(run_id="r1"), assigned("r2")],
        ),
        (
            [opened("enqueue"), assigned("r1"), enqueued("r2"), enqueued("r3")],
            ReleaseRun("r1"),
            [RunReleased(run_id="r1"), assigned("r2")],
        ),
        (
            [opened("enqueue"), assigned("r1"), enqueued("r2")],
            ReleaseRun("r2"),
            [RunReleased(run_id="r2")],
        ),
        ([opened("enqueue"), assigned("r1"), RunReleased(run_id="r1")], ReleaseRun("r1"), []),
        (
            [opened("interrupt"), assigned("r1"), RunInterrupted(run_id="r1"), assigned("r2")],
            ReleaseRun("r1"),
            [],
        ),
    ],
)
def test_run_assignment(
    given: list[DomainEvent], when: SessionCommand, expected: list[DomainEvent]
) -> None:
    assert then(given, when) == expected


def test_reject_policy_refuses_messages_while_a_run_is_active() -> None:
    busy = [opened("reject"), assigned("r1")]
    with pytest.raises(SessionBusy, match="r1 of this session is still active"):
        then(busy, ReceiveMessage("m2", "ada", "again"))
    free = [*busy, RunReleased(run_id="r1")]
    assert then(free, ReceiveMessage("m2", "ada", "again")) != []
    # replies are never refused
    assert then(busy, SendMessage("m3", "echo", "reply", "r1")) != []


def test_waiting_runs_are_served_in_order() -> None:
    state = SESSION.fold(
        [
            opened("enqueue"),
            assigned("r1"),
            enqueued("r2"),
            enqueued("r3"),
            RunReleased(run_id="r1"),
            assigned("r2"),
        ]
    )
    assert state.active_run == "r2"
    assert [p.run_id for p in state.pending] == ["r3"]
