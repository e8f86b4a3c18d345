"""The run decider as given/when/then tables: plain data, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agentbus.domain.decider import DomainError
from agentbus.domain.run import (
    RUN,
    Cancel,
    Fail,
    IllegalRunTransition,
    QueueRun,
    RecordUsage,
    RequestApproval,
    Resume,
    RunAlreadyExists,
    RunCommand,
    RunNotFound,
    StartRun,
    Succeed,
    TimeOut,
    backoff,
)
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

T0 = datetime(2026, 1, 1, tzinfo=UTC)
QUEUED = RunQueued(agent="echo", executor="echo", input="hi", max_attempts=3)
STARTED = RunStarted(attempt=1, worker="w1")
WAITING = RunWaitingApproval(approval_id="a1", tool="shell")
RETRY = RunRetryScheduled(
    attempt=2, at=T0 + timedelta(seconds=1), error_class="network", message="down"
)


def then(given: list[DomainEvent], when: RunCommand) -> list[DomainEvent]:
    return list(RUN.decide(when, RUN.fold(given)))


LEGAL: list[tuple[str, list[DomainEvent], RunCommand, list[DomainEvent]]] = [
    ("queue", [], QueueRun("echo", "echo", "hi", max_attempts=3), [QUEUED]),
    ("queue twice is one run", [QUEUED], QueueRun("echo", "echo", "hi"), []),
    ("claim", [QUEUED], StartRun("w1", T0), [STARTED]),
    (
        "take over a dead worker's run",
        [QUEUED, STARTED],
        StartRun("w2", T0),
        [RunStarted(attempt=2, worker="w2")],
    ),
    (
        "claim a due retry",
        [QUEUED, STARTED, RETRY],
        StartRun("w2", T0 + timedelta(seconds=2)),
        [RunStarted(attempt=2, worker="w2")],
    ),
    (
        "no attempts left on takeover",
        [QUEUED, STARTED, RunStarted(attempt=2, worker="w2"), RunStarted(attempt=3, worker="w3")],
        StartRun("w4", T0),
        [
            RunFailed(
                attempt=3,
                error_class="lease_lost",
                retryable=False,
                message="worker w3 stopped renewing its lease; no attempts left (3)",
            )
        ],
    ),
    (
        "deadline passed before start",
        [RunQueued(agent="a", executor="echo", input="x", deadline_at=T0)],
        StartRun("w1", T0),
        [RunTimedOut(attempt=0)],
    ),
    ("succeed", [QUEUED, STARTED], Succeed(1, "done"), [RunSucceeded(attempt=1, output="done")]),
    (
        "retryable failure schedules a retry with backoff",
        [QUEUED, STARTED],
        Fail(1, "network", "down", retryable=True, now=T0, backoff=timedelta(seconds=1)),
        [
            RunRetryScheduled(
                attempt=2, at=T0 + timedelta(seconds=1), error_class="network", message="down"
            )
        ],
    ),
    (
        "retryable failure on the last attempt fails",
        [QUEUED, STARTED, RunStarted(attempt=2, worker="w"), RunStarted(attempt=3, worker="w")],
        Fail(3, "timeout", "slow", retryable=True, now=T0),
        [RunFailed(attempt=3, error_class="timeout", message="slow", retryable=True)],
    ),
    (
        "non-retryable failure fails",
        [QUEUED, STARTED],
        Fail(1, "http_status", "400", retryable=False, now=T0),
        [RunFailed(attempt=1, error_class="http_status", message="400", retryable=False)],
    ),
    (
        "cancel queued",
        [QUEUED],
        Cancel("ada", "changed my mind"),
        [RunCancelled(by="ada", reason="changed my mind")],
    ),
    ("cancel running", [QUEUED, STARTED], Cancel("ada"), [RunCancelled(by="ada")]),
    ("cancel waiting", [QUEUED, STARTED, WAITING], Cancel("ada"), [RunCancelled(by="ada")]),
    ("time out running", [QUEUED, STARTED], TimeOut(T0), [RunTimedOut(attempt=1)]),
    ("ask approval", [QUEUED, STARTED], RequestApproval(1, "a1", "shell"), [WAITING]),
    (
        "take over a run whose worker died waiting for approval",
        [QUEUED, STARTED, WAITING],
        StartRun("w2", T0),
        [RunStarted(attempt=2, worker="w2")],
    ),
    (
        "resume",
        [QUEUED, STARTED, WAITING],
        Resume("a1", "granted"),
        [RunResumed(approval_id="a1", decision="granted")],
    ),
    (
        "usage",
        [QUEUED, STARTED],
        RecordUsage(1, "gpt", 10, 20),
        [RunUsageRecorded(model="gpt", tokens_in=10, tokens_out=20)],
    ),
]


@pytest.mark.parametrize(
    ("given", "when", "expected"), [c[1:] for c in LEGAL], ids=[c[0] for c in LEGAL]
)
def test_legal_transitions(
    given: list[DomainEvent], when: RunCommand, expected: list[DomainEvent]
) -> None:
    assert then(given, when) == expected


SUCCEEDED = RunSucceeded(attempt=1, output="x")
FINISHED = [
    [QUEUED, STARTED, SUCCEEDED],
    [QUEUED, STARTED, RunFailed(attempt=1, error_class="executor", message="x", retryable=False)],
    [QUEUED, RunCancelled(by="ada")],
    [QUEUED, STARTED, RunTimedOut(attempt=1)],
]

ILLEGAL: list[tuple[str, list[DomainEvent], RunCommand, type[DomainError], str]] = [
    ("start unknown", [], StartRun("w", T0), RunNotFound, "does not exist"),
    ("cancel unknown", [], Cancel("ada"), RunNotFound, "does not exist"),
    (
        "same id, other run",
        [QUEUED],
        QueueRun("echo", "echo", "other"),
        RunAlreadyExists,
        "different run",
    ),
    ("succeed queued", [QUEUED], Succeed(1, "x"), IllegalRunTransition, "queued"),
    (
        "succeed a superseded attempt",
        [QUEUED, STARTED, RunStarted(attempt=2, worker="w2")],
        Succeed(1, "x"),
        IllegalRunTransition,
        "superseded by attempt 2",
    ),
    (
        "retry not yet due",
        [QUEUED, STARTED, RETRY],
        StartRun("w", T0),
        IllegalRunTransition,
        "retry is due",
    ),
    (
        "resume the wrong approval",
        [QUEUED, STARTED, WAITING],
        Resume("zz", "granted"),
        IllegalRunTransition,
        "not waiting for zz",
    ),
    (
        "resume a running run",
        [QUEUED, STARTED],
        Resume("a1", "granted"),
        IllegalRunTransition,
        "running",
    ),
    (
        "ask approval when queued",
        [QUEUED],
        RequestApproval(0, "a1", "shell"),
        IllegalRunTransition,
        "queued",
    ),
    ("usage when queued", [QUEUED], RecordUsage(0, "m", 1, 1), IllegalRunTransition, "queued"),
    *[
        (f"{verb} a finished run ({i})", history, command, IllegalRunTransition, "cannot")
        for i, history in enumerate(FINISHED)
        for verb, command in (
            ("start", StartRun("w", T0)),
            ("cancel", Cancel("a")),
            ("time out", TimeOut(T0)),
            ("succeed", Succeed(1, "x")),
            ("fail", Fail(1, "executor", "x", retryable=False, now=T0)),
        )
    ],
]


@pytest.mark.parametrize(
    ("given", "when", "error", "message"), [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL]
)
def test_illegal_transitions_are_refused_with_a_clear_error(
    given: list[DomainEvent], when: RunCommand, error: type[DomainError], message: str
) -> None:
    with pytest.raises(error, match=message):
        then(given, when)


def test_state_follows_the_events() -> None:
    state = RUN.fold([QUEUED, STARTED, WAITING])
    assert (state.status, state.attempt, state.worker, state.approval_id) == (
        "waiting_approval",
        1,
        "w1",
        "a1",
    )
    assert state.active
    done = RUN.fold([QUEUED, STARTED, SUCCEEDED])
    assert done.finished
    assert done.output == "x"


def test_backoff_doubles_and_is_capped() -> None:
    base = timedelta(seconds=1)
    assert [backoff(base, n).total_seconds() for n in (2, 3, 4, 5)] == [1, 2, 4, 8]
    assert backoff(base, 30) == timedelta(minutes=5)
