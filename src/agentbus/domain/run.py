"""The run aggregate: one turn of an agent.

    queued -> started(attempt, worker) -> (waiting_approval -> resumed)*
           -> succeeded | failed | cancelled | timed_out
    failed but retryable with attempts left -> retry_scheduled(attempt + 1, at) -> started ...

A worker that dies mid-run is taken over: the next `StartRun` on a running run (or on one
waiting for approval: its worker was waiting) starts a new attempt. Read top to bottom: events
(in agentbus.events.run), state, evolve, commands, decide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from agentbus.domain.decider import Decider, DomainError
from agentbus.events.registry import DomainEvent
from agentbus.events.run import (
    ErrorClass,
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

# ---------------------------------------------------------------------------- state

Status = Literal[
    "new",
    "queued",
    "running",
    "waiting_approval",
    "retry_scheduled",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
]
TERMINAL: frozenset[Status] = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


@dataclass(frozen=True, slots=True)
class RunState:
    status: Status = "new"
    agent: str = ""
    executor: str = ""
    input: str = ""
    session_id: str | None = None
    max_attempts: int = 1
    deadline_at: datetime | None = None
    attempt: int = 0
    worker: str | None = None
    retry_at: datetime | None = None
    approval_id: str | None = None
    output: str | None = None
    author: str | None = None
    """Whose words `input` is: the data subject of the input and of the output."""

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def active(self) -> bool:
        return self.status in ("running", "waiting_approval")


INITIAL = RunState()


def evolve(state: RunState, event: DomainEvent) -> RunState:
    match event:
        case RunQueued():
            return replace(
                state,
                status="queued",
                agent=event.agent,
                executor=event.executor,
                input=event.input,
                session_id=event.session_id,
                max_attempts=event.max_attempts,
                deadline_at=event.deadline_at,
                author=event.author,
            )
        case RunStarted():
            return replace(
                state, status="running", attempt=event.attempt, worker=event.worker, retry_at=None
            )
        case RunWaitingApproval():
            return replace(state, status="waiting_approval", approval_id=event.approval_id)
        case RunResumed():
            return replace(state, status="running", approval_id=None)
        case RunRetryScheduled():
            return replace(state, status="retry_scheduled", retry_at=event.at, worker=None)
        case RunSucceeded():
            return replace(state, status="succeeded", output=event.output)
        case RunFailed():
            return replace(state, status="failed")
        case RunCancelled():
            return replace(state, status="cancelled")
        case RunTimedOut():
            return replace(state, status="timed_out")
        case _:  # usage_recorded and future events do not change the state machine
            return state


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class QueueRun:
    agent: str
    executor: str
    input: str
    session_id: str | None = None
    trigger_message_id: str | None = None
    max_attempts: int = 3
    deadline_at: datetime | None = None
    author: str | None = None
    """Whose message `input` is: its data subject (docs/erasure.md)."""


@dataclass(frozen=True, slots=True)
class StartRun:
    """A worker claims the run at `now`: first attempt, a due retry, or a takeover."""

    worker: str
    now: datetime


@dataclass(frozen=True, slots=True)
class RequestApproval:
    attempt: int
    approval_id: str
    tool: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    approval_id: str
    decision: Literal["granted", "denied", "expired"]


@dataclass(frozen=True, slots=True)
class Succeed:
    attempt: int
    output: str


@dataclass(frozen=True, slots=True)
class Fail:
    attempt: int
    error_class: ErrorClass
    message: str
    retryable: bool
    now: datetime
    backoff: timedelta = timedelta(seconds=1)
    """Delay before attempt 2; doubles for each later attempt (capped at 5 minutes)."""


@dataclass(frozen=True, slots=True)
class Cancel:
    by: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class TimeOut:
    now: datetime


@dataclass(frozen=True, slots=True)
class RecordUsage:
    attempt: int
    model: str
    tokens_in: int
    tokens_out: int


RunCommand = (
    QueueRun | StartRun | RequestApproval | Resume | Succeed | Fail | Cancel | TimeOut | RecordUsage
)

# ---------------------------------------------------------------------------- errors


class RunNotFound(DomainError):
    pass


class IllegalRunTransition(DomainError):
    def __init__(self, command: str, state: RunState, why: str = "") -> None:
        self.status = state.status
        detail = f": {why}" if why else ""
        super().__init__(f"cannot {command} a run that is {state.status}{detail}")


class RunAlreadyExists(DomainError):
    """The run id is taken by a run with different parameters."""


MAX_BACKOFF = timedelta(minutes=5)


def backoff(base: timedelta, attempt: int) -> timedelta:
    """Delay before `attempt` (2, 3, ...): base, 2*base, 4*base, ... capped at 5 minutes."""
    delay: timedelta = base * (2 ** max(0, attempt - 2))
    return min(delay, MAX_BACKOFF)


# ---------------------------------------------------------------------------- decide


def decide(command: RunCommand, state: RunState) -> list[DomainEvent]:
    match command:
        case QueueRun():
            if state.status != "new":
                same = (state.agent, state.executor, state.input, state.session_id) == (
                    command.agent,
                    command.executor,
                    command.input,
                    command.session_id,
                )
                if same:
                    return []  # the same run requested twice is one run
                raise RunAlreadyExists("a different run with this id exists")
            return [
                RunQueued(
                    agent=command.agent,
                    executor=command.executor,
                    input=command.input,
                    session_id=command.session_id,
                    trigger_message_id=command.trigger_message_id,
                    max_attempts=command.max_attempts,
                    deadline_at=command.deadline_at,
                    author=command.author,
                )
            ]
        case StartRun():
            _require_exists(state, "start")
            if state.finished:
                raise IllegalRunTransition("start", state)
            if state.deadline_at is not None and command.now >= state.deadline_at:
                return [RunTimedOut(attempt=state.attempt)]
            if (
                state.status == "retry_scheduled"
                and state.retry_at
                and command.now < state.retry_at
            ):
                raise IllegalRunTransition("start", state, f"retry is due at {state.retry_at}")
            attempt = state.attempt + 1
            if attempt > state.max_attempts:
                return [
                    RunFailed(
                        attempt=state.attempt,
                        error_class="lease_lost",
                        retryable=False,
                        message=f"worker {state.worker} stopped renewing its lease; "
                        f"no attempts left ({state.max_attempts})",
                        author=state.author,
                    )
                ]
            return [RunStarted(attempt=attempt, worker=command.worker)]
        case RequestApproval():
            _require_attempt(state, command.attempt, "request approval for", ("running",))
            return [
                RunWaitingApproval(
                    approval_id=command.approval_id,
                    tool=command.tool,
                    reason=command.reason,
                    author=state.author,
                )
            ]
        case Resume():
            if state.status != "waiting_approval" or state.approval_id != command.approval_id:
                raise IllegalRunTransition(
                    "resume", state, f"not waiting for {command.approval_id}"
                )
            return [RunResumed(approval_id=command.approval_id, decision=command.decision)]
        case Succeed():
            _require_attempt(state, command.attempt, "complete", ("running",))
            return [
                RunSucceeded(attempt=command.attempt, output=command.output, author=state.author)
            ]
        case Fail():
            _require_attempt(state, command.attempt, "fail", ("running", "waiting_approval"))
            if command.retryable and command.attempt < state.max_attempts:
                at = command.now + backoff(command.backoff, command.attempt + 1)
                return [
                    RunRetryScheduled(
                        attempt=command.attempt + 1,
                        at=at,
                        error_class=command.error_class,
                        message=command.message,
                        author=state.author,
                    )
                ]
            return [
                RunFailed(
                    attempt=command.attempt,
                    error_class=command.error_class,
                    message=command.message,
                    retryable=command.retryable,
                    author=state.author,
                )
            ]
        case Cancel():
            _require_exists(state, "cancel")
            if state.finished:
                raise IllegalRunTransition("cancel", state)
            return [RunCancelled(by=command.by, reason=command.reason)]
        case TimeOut():
            _require_exists(state, "time out")
            if state.finished:
                raise IllegalRunTransition("time out", state)
            return [RunTimedOut(attempt=state.attempt)]
        case RecordUsage():
            _require_attempt(
                state, command.attempt, "record usage for", ("running", "waiting_approval")
            )
            return [
                RunUsageRecorded(
                    model=command.model, tokens_in=command.tokens_in, tokens_out=command.tokens_out
                )
            ]
    raise TypeError(f"not a run command: {command!r}")


def _require_exists(state: RunState, verb: str) -> None:
    if state.status == "new":
        raise RunNotFound(f"cannot {verb} a run that does not exist")


def _require_attempt(
    state: RunState, attempt: int, verb: str, statuses: tuple[Status, ...]
) -> None:
    _require_exists(state, verb)
    if state.status not in statuses:
        raise IllegalRunTransition(verb, state)
    if attempt != state.attempt:
        raise IllegalRunTransition(
            verb, state, f"attempt {attempt} was superseded by attempt {state.attempt}"
        )


RUN: Decider[RunCommand, RunState] = Decider("run", INITIAL, evolve, decide)
