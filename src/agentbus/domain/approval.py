"""Approvals: a run asks a person before it uses a tool.

    requested(run, tool, arguments digest, reason, expires_at, requested_by)
        -> granted | denied (by whom, why; `rule` when a rule decided, `jti` of a signed link)
        -> expired (nobody decided before expires_at)

The first decision wins: a later *different* decision is refused (`ApprovalAlreadyDecided`,
carrying the original), the same decider repeating the same decision changes nothing, and a
signed link used twice is refused (`LinkAlreadyUsed`: its `jti` is in the decision). A decision
arriving at or after `expires_at` expires the approval instead, so expiry is exact even when
the timer that appends `expired` runs late.

The workspace's rules (`approval_rules/workspace`) decide without a person where they can:
the first rule whose tool pattern and argument matchers match says allow, deny or ask; no
matching rule means ask. `evaluate` is pure and table-tested.

Read top to bottom: ids and digests, the approval (state, evolve, commands, decide), the rules,
and at the end the thin functions that wire both to the store. Events: `agentbus.events.approval`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from agentbus.domain.decider import Decider, DomainError
from agentbus.domain.handling import Handled, handle, load
from agentbus.events.approval import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalRule,
    ApprovalRulesSet,
    ArgumentMatcher,
    Decision,
    Effect,
    Outcome,
)
from agentbus.events.envelope import EventContext
from agentbus.events.registry import DomainEvent
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import EventStore

# ---------------------------------------------------------------------------- ids and digests

RULES_ID = "workspace"
PREVIEW_LENGTH = 2000


def approval_id_for(run_id: str, attempt: int, index: int) -> str:
    """The approval of tool call `index` (0, 1, ...) of attempt `attempt` of a run: the same
    whoever asks, so a retried request is the same approval, never a second one."""
    digest = hashlib.sha256(f"{run_id}/{attempt}/{index}".encode()).hexdigest()
    return f"ap_{digest[:20]}"


def approval_ref(workspace: str, approval_id: str) -> AggregateRef:
    return AggregateRef(workspace, "approval", approval_id)


def rules_ref(workspace: str) -> AggregateRef:
    return AggregateRef(workspace, "approval_rules", RULES_ID)


def canonical_arguments(arguments: Mapping[str, Any]) -> bytes:
    """The arguments as canonical JSON (sorted keys): what the digest is taken of."""
    return orjson.dumps(dict(arguments), option=orjson.OPT_SORT_KEYS, default=str)


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_arguments(arguments)).hexdigest()


def arguments_preview(arguments: Mapping[str, Any]) -> str:
    text = canonical_arguments(arguments).decode()
    return text if len(text) <= PREVIEW_LENGTH else text[: PREVIEW_LENGTH - 1] + "…"


# ---------------------------------------------------------------------------- state

Status = Literal["new", "pending", "granted", "denied", "expired"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """How an approval ended."""

    outcome: Outcome
    by: str | None = None
    reason: str | None = None
    jti: str | None = None
    rule: str | None = None

    def describe(self) -> str:
        """`granted by ada`, `denied by rule:no-rm (destructive)`, `expired`."""
        if self.outcome == "expired":
            return f"expired ({self.reason})" if self.reason else "expired"
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.outcome} by {self.by}{why}"

    def as_dict(self) -> dict[str, str | None]:
        return {
            "decision": self.outcome,
            "by": self.by,
            "reason": self.reason,
            "rule": self.rule,
        }


@dataclass(frozen=True, slots=True)
class ApprovalState:
    status: Status = "new"
    run_id: str = ""
    attempt: int = 0
    session_id: str | None = None
    tool: str = ""
    arguments_digest: str = ""
    arguments_preview: str = ""
    reason: str | None = None
    expires_at: datetime | None = None
    requested_by: str = ""
    verdict: Verdict | None = None
    author: str | None = None
    """Whose input the run works on: the data subject of the preview and the reason."""

    @property
    def pending(self) -> bool:
        return self.status == "pending"


INITIAL = ApprovalState()


def evolve(state: ApprovalState, event: DomainEvent) -> ApprovalState:
    match event:
        case ApprovalRequested():
            return replace(
                state,
                status="pending",
                run_id=event.run_id,
                attempt=event.attempt,
                session_id=event.session_id,
                tool=event.tool,
                arguments_digest=event.arguments_digest,
                arguments_preview=event.arguments_preview,
                reason=event.reason,
                expires_at=event.expires_at,
                requested_by=event.requested_by,
                author=event.author,
            )
        case ApprovalGranted() | ApprovalDenied():
            outcome: Outcome = "granted" if isinstance(event, ApprovalGranted) else "denied"
            verdict = Verdict(outcome, event.by, event.reason, event.jti, event.rule)
            return replace(state, status=outcome, verdict=verdict)
        case ApprovalExpired():
            why = f"nobody decided before {event.expires_at.isoformat()}"
            return replace(state, status="expired", verdict=Verdict("expired", reason=why))
    return state


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """What the workspace's rules say about a tool call: `rule` None means no rule matched."""

    effect: Effect
    rule: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AskApproval:
    run_id: str
    attempt: int
    tool: str
    arguments_digest: str
    arguments_preview: str
    expires_at: datetime
    requested_by: str
    reason: str | None = None
    session_id: str | None = None
    rules: RuleVerdict = RuleVerdict("ask")
    """allow / deny: decided at once by that rule (in the same atomic append)."""
    author: str | None = None
    """Whose input the run works on: the preview and the reason are sealed with their key."""


@dataclass(frozen=True, slots=True)
class DecideApproval:
    decision: Decision
    by: str
    now: datetime
    reason: str | None = None
    jti: str | None = None
    """The id of the signed link this decision came through (each link works once)."""


@dataclass(frozen=True, slots=True)
class ExpireApproval:
    now: datetime


ApprovalCommand = AskApproval | DecideApproval | ExpireApproval

# ---------------------------------------------------------------------------- errors


class ApprovalNotFound(DomainError):
    pass


class ApprovalAlreadyDecided(DomainError):
    """A decision came after another one: the first stands. `original` says what it was."""

    def __init__(self, original: Verdict) -> None:
        self.original = original
        super().__init__(f"the approval was already {original.describe()}")


class ApprovalHasExpired(ApprovalAlreadyDecided):
    """A decision came at or after the approval's `expires_at`."""


class LinkAlreadyUsed(DomainError):
    """A signed approval link was used a second time (a replay)."""


class ApprovalMismatch(DomainError):
    """The approval id is taken by a request for another run, attempt, tool or arguments."""


class ApprovalNotDue(DomainError):
    """Expiring an approval before its `expires_at`."""


# ---------------------------------------------------------------------------- decide


def decide(command: ApprovalCommand, state: ApprovalState) -> list[DomainEvent]:
    match command:
        case AskApproval():
            if state.status != "new":
                asked = (state.run_id, state.attempt, state.tool, state.arguments_digest)
                if asked == (
                    command.run_id,
                    command.attempt,
                    command.tool,
                    command.arguments_digest,
                ):
                    return []  # the same request again: the same approval
                raise ApprovalMismatch("a different approval request with this id exists")
            requested: list[DomainEvent] = [
                ApprovalRequested(
                    run_id=command.run_id,
                    attempt=command.attempt,
                    session_id=command.session_id,
                    tool=command.tool,
                    arguments_digest=command.arguments_digest,
                    arguments_preview=command.arguments_preview,
                    reason=command.reason,
                    expires_at=command.expires_at,
                    requested_by=command.requested_by,
                    author=command.author,
                )
            ]
            rules = command.rules
            if rules.effect == "ask" or rules.rule is None:
                return requested
            decided = ApprovalGranted if rules.effect == "allow" else ApprovalDenied
            by = f"rule:{rules.rule}"
            return [*requested, decided(by=by, reason=rules.reason, rule=rules.rule)]
        case DecideApproval():
            if state.status == "new":
                raise ApprovalNotFound("no such approval")
            if state.pending:
                assert state.expires_at is not None
                if command.now >= state.expires_at:
                    return [ApprovalExpired(expires_at=state.expires_at)]
                decided = ApprovalGranted if command.decision == "granted" else ApprovalDenied
                return [decided(by=command.by, reason=command.reason, jti=command.jti)]
            verdict = state.verdict
            assert verdict is not None
            if verdict.outcome == "expired":
                raise ApprovalHasExpired(verdict)
            if command.jti is not None and command.jti == verdict.jti:
                raise LinkAlreadyUsed("this approval link was used already; each link works once")
            repeated = (verdict.outcome, verdict.by, verdict.jti, verdict.rule) == (
                command.decision,
                command.by,
                None,
                None,
            )
            if repeated and command.jti is None:
                return []  # the same person saying the same again
            raise ApprovalAlreadyDecided(verdict)
        case ExpireApproval():
            if state.status == "new":
                raise ApprovalNotFound("no such approval")
            if not state.pending:
                return []  # decided (or expired) already
            assert state.expires_at is not None
            if command.now < state.expires_at:
                raise ApprovalNotDue(f"the approval expires at {state.expires_at.isoformat()}")
            return [ApprovalExpired(expires_at=state.expires_at)]
    raise TypeError(f"not an approval command: {command!r}")


APPROVAL: Decider[ApprovalCommand, ApprovalState] = Decider("approval", INITIAL, evolve, decide)

# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class RulesState:
    rules: tuple[ApprovalRule, ...] = ()
    configured: bool = False


def evolve_rules(state: RulesState, event: DomainEvent) -> RulesState:
    if isinstance(event, ApprovalRulesSet):
        return RulesState(event.rules, configured=True)
    return state


@dataclass(frozen=True, slots=True)
class SetApprovalRules:
    rules: tuple[ApprovalRule, ...]
    by: str


class InvalidRules(DomainError):
    pass


def decide_rules(command: SetApprovalRules, state: RulesState) -> list[DomainEvent]:
    names = [rule.name for rule in command.rules]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidRules(f"rule names must be unique: {', '.join(duplicates)} repeated")
    if state.configured and state.rules == command.rules:
        return []
    return [ApprovalRulesSet(rules=command.rules, by=command.by)]


APPROVAL_RULES: Decider[SetApprovalRules, RulesState] = Decider(
    "approval_rules", RulesState(), evolve_rules, decide_rules
)


def evaluate(rules: Sequence[ApprovalRule], tool: str, arguments: Mapping[str, Any]) -> RuleVerdict:
    """What `rules` say about calling `tool` with `arguments`: the first rule whose tool glob
    (case-sensitive) and every argument matcher match decides; none matching means ask."""
    for rule in rules:
        if fnmatch.fnmatchcase(tool, rule.tool) and all(
            _matches(matcher, arguments) for matcher in rule.arguments
        ):
            return RuleVerdict(rule.effect, rule.name, rule.reason)
    return RuleVerdict("ask")


def _matches(matcher: ArgumentMatcher, arguments: Mapping[str, Any]) -> bool:
    if matcher.key not in arguments:
        return False
    value = arguments[matcher.key]
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return re.search(matcher.pattern, text) is not None


# ---------------------------------------------------------------------------- wiring


async def decide_approval(
    store: EventStore,
    workspace: str,
    approval_id: str,
    decision: Decision,
    *,
    by: str,
    reason: str | None = None,
    jti: str | None = None,
    now: datetime | None = None,
    context: EventContext = EventContext.DEFAULT,
) -> Handled[ApprovalState]:
    """Grant or deny a pending approval. Refusals: `ApprovalNotFound`, `ApprovalAlreadyDecided`
    (with the original decision), `ApprovalHasExpired` (also when this call found it due and
    expired it), `LinkAlreadyUsed`. Deciding again what one decided before returns the state
    and appends nothing."""
    ref = approval_ref(workspace, approval_id)
    command = DecideApproval(decision, by, now or datetime.now(UTC), reason, jti)
    done = await handle(store, APPROVAL, ref, command, context=context)
    if done.state.status == "expired":  # it was due: this call expired it
        assert done.state.verdict is not None
        raise ApprovalHasExpired(done.state.verdict)
    return done


async def expire_approval(
    store: EventStore,
    ref: AggregateRef,
    now: datetime | None = None,
    context: EventContext = EventContext.DEFAULT,
) -> Handled[ApprovalState]:
    """Append `expired` if the approval is still pending and due (`ApprovalNotDue` if not)."""
    return await handle(
        store, APPROVAL, ref, ExpireApproval(now or datetime.now(UTC)), context=context
    )


async def set_approval_rules(
    store: EventStore,
    workspace: str,
    rules: Sequence[ApprovalRule],
    *,
    by: str,
    context: EventContext = EventContext.DEFAULT,
) -> Handled[RulesState]:
    """Replace the workspace's rules (`InvalidRules` for repeated names)."""
    command = SetApprovalRules(tuple(rules), by)
    return await handle(store, APPROVAL_RULES, rules_ref(workspace), command, context=context)


async def approval_rules(store: EventStore, workspace: str) -> tuple[ApprovalRule, ...]:
    state, _ = await load(store, APPROVAL_RULES, rules_ref(workspace))
    return state.rules
