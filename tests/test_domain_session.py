"""The session decider as given/when/then tables."""

from __future__ import annotations

import pytest

from agentbus.domain.session import (
    SESSION,
    CloseSession,
    OpenSession,
    ReceiveMessage,
    SendMessage,
    SessionAlreadyExists,
    SessionClosedError,
    SessionCommand,
    SessionNotFound,
)
from agentbus.events.registry import DomainEvent
from agentbus.events.session import MessageReceived, MessageSent, SessionClosed, SessionOpened

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
