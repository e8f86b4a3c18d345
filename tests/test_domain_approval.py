"""The approval deciders, the rules and the signed links, as plain data: given these events,
when this command, then these events (or this refusal). No servers."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from agentbus.domain.approval import (
    APPROVAL,
    APPROVAL_RULES,
    ApprovalAlreadyDecided,
    ApprovalCommand,
    ApprovalHasExpired,
    ApprovalMismatch,
    ApprovalNotDue,
    ApprovalNotFound,
    AskApproval,
    DecideApproval,
    ExpireApproval,
    InvalidRules,
    LinkAlreadyUsed,
    RuleVerdict,
    SetApprovalRules,
    approval_id_for,
    arguments_digest,
    arguments_preview,
    evaluate,
)
from agentbus.domain.approval_link import (
    LinkClaims,
    LinkExpired,
    LinkInvalid,
    sign_link,
    verify_link,
)
from agentbus.domain.decider import DomainError
from agentbus.events.approval import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalRule,
    ApprovalRulesSet,
    ArgumentMatcher,
)
from agentbus.events.registry import DomainEvent
from agentbus.events.subjects import validate_token

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EXPIRES = T0 + timedelta(hours=1)
ARGS = {"command": "ls -la"}
DIGEST = arguments_digest(ARGS)
ASK = AskApproval(
    run_id="r1",
    attempt=1,
    tool="shell",
    arguments_digest=DIGEST,
    arguments_preview=arguments_preview(ARGS),
    expires_at=EXPIRES,
    requested_by="agent:helper",
    reason="list files",
)
REQUESTED = ApprovalRequested(
    run_id="r1",
    attempt=1,
    tool="shell",
    arguments_digest=DIGEST,
    arguments_preview='{"command":"ls -la"}',
    reason="list files",
    expires_at=EXPIRES,
    requested_by="agent:helper",
)
GRANTED = ApprovalGranted(by="user:ada", reason="fine")
DENIED = ApprovalDenied(by="user:bob", reason="no")
LINK_GRANTED = ApprovalGranted(by="user:ada", jti="j1")
EXPIRED = ApprovalExpired(expires_at=EXPIRES)


def then(given: list[DomainEvent], when: ApprovalCommand) -> list[DomainEvent]:
    return list(APPROVAL.decide(when, APPROVAL.fold(given)))


def decide_(decision: Any, by: str = "user:ada", **kwargs: Any) -> DecideApproval:
    return DecideApproval(decision, by, kwargs.pop("now", T0), **kwargs)


LEGAL: list[tuple[str, list[DomainEvent], ApprovalCommand, list[DomainEvent]]] = [
    ("ask", [], ASK, [REQUESTED]),
    ("ask again: the same approval", [REQUESTED], ASK, []),
    (
        "a rule allows at once",
        [],
        replace(ASK, rules=RuleVerdict("allow", "reads")),
        [REQUESTED, ApprovalGranted(by="rule:reads", rule="reads")],
    ),
    (
        "a rule denies at once, with its reason",
        [],
        replace(ASK, rules=RuleVerdict("deny", "no-rm", "destructive")),
        [REQUESTED, ApprovalDenied(by="rule:no-rm", reason="destructive", rule="no-rm")],
    ),
    (
        "a rule says ask",
        [],
        replace(ASK, rules=RuleVerdict("ask", "shell")),
        [REQUESTED],
    ),
    ("grant", [REQUESTED], decide_("granted", reason="fine"), [GRANTED]),
    ("deny", [REQUESTED], decide_("denied", "user:bob", reason="no"), [DENIED]),
    ("grant through a link", [REQUESTED], decide_("granted", jti="j1"), [LINK_GRANTED]),
    ("same decider, same decision: nothing new", [REQUESTED, GRANTED], decide_("granted"), []),
    (
        "a decision at expires_at expires it",
        [REQUESTED],
        decide_("granted", now=EXPIRES),
        [EXPIRED],
    ),
    ("expire when due", [REQUESTED], ExpireApproval(EXPIRES), [EXPIRED]),
    ("expire a decided approval: nothing", [REQUESTED, GRANTED], ExpireApproval(EXPIRES), []),
    ("expire twice: nothing", [REQUESTED, EXPIRED], ExpireApproval(EXPIRES), []),
]


@pytest.mark.parametrize(
    ("given", "when", "expected"), [c[1:] for c in LEGAL], ids=[c[0] for c in LEGAL]
)
def test_legal_commands(
    given: list[DomainEvent], when: ApprovalCommand, expected: list[DomainEvent]
) -> None:
    assert then(given, when) == expected


ILLEGAL: list[tuple[str, list[DomainEvent], ApprovalCommand, type[DomainError], str]] = [
    ("decide an unknown approval", [], decide_("granted"), ApprovalNotFound, "no such"),
    ("expire an unknown approval", [], ExpireApproval(EXPIRES), ApprovalNotFound, "no such"),
    (
        "a different request under the same id",
        [REQUESTED],
        replace(ASK, arguments_digest="0" * 64),
        ApprovalMismatch,
        "different",
    ),
    (
        "another decision after a grant",
        [REQUESTED, GRANTED],
        decide_("denied", "user:bob"),
        ApprovalAlreadyDecided,
        r"already granted by user:ada \(fine\)",
    ),
    (
        "the same decision by someone else",
        [REQUESTED, GRANTED],
        decide_("granted", "user:bob"),
        ApprovalAlreadyDecided,
        "already granted by user:ada",
    ),
    (
        "the same decider changing their mind",
        [REQUESTED, GRANTED],
        decide_("denied"),
        ApprovalAlreadyDecided,
        "already granted",
    ),
    (
        "a person overriding a rule",
        [REQUESTED, ApprovalDenied(by="rule:no-rm", rule="no-rm")],
        decide_("granted"),
        ApprovalAlreadyDecided,
        "denied by rule:no-rm",
    ),
    (
        "a replayed link",
        [REQUESTED, LINK_GRANTED],
        decide_("granted", jti="j1"),
        LinkAlreadyUsed,
        "once",
    ),
    (
        "another link after a link",
        [REQUESTED, LINK_GRANTED],
        decide_("granted", jti="j2"),
        ApprovalAlreadyDecided,
        "already granted",
    ),
    (
        "a link after a person decided",
        [REQUESTED, GRANTED],
        decide_("granted", jti="j2"),
        ApprovalAlreadyDecided,
        "already granted",
    ),
    (
        "decide an expired approval",
        [REQUESTED, EXPIRED],
        decide_("granted"),
        ApprovalHasExpired,
        "already expired",
    ),
    (
        "expire before it is due",
        [REQUESTED],
        ExpireApproval(EXPIRES - timedelta(seconds=1)),
        ApprovalNotDue,
        "expires at",
    ),
]


@pytest.mark.parametrize(
    ("given", "when", "error", "message"), [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL]
)
def test_refusals_say_why(
    given: list[DomainEvent], when: ApprovalCommand, error: type[DomainError], message: str
) -> None:
    with pytest.raises(error, match=message):
        then(given, when)


def test_a_refused_decision_carries_the_original() -> None:
    with pytest.raises(ApprovalAlreadyDecided) as refused:
        then([REQUESTED, DENIED], decide_("granted"))
    assert refused.value.original.as_dict() == {
        "decision": "denied",
        "by": "user:bob",
        "reason": "no",
        "rule": None,
    }


def test_state_follows_the_events() -> None:
    state = APPROVAL.fold([REQUESTED])
    assert (state.status, state.run_id, state.tool, state.expires_at) == (
        "pending",
        "r1",
        "shell",
        EXPIRES,
    )
    state = APPROVAL.fold([REQUESTED, EXPIRED])
    assert state.status == "expired"
    assert state.verdict is not None
    assert "nobody decided before" in state.verdict.describe()


def test_ids_are_deterministic_tokens_and_digests_canonical() -> None:
    first = approval_id_for("r1", 1, 0)
    assert first == approval_id_for("r1", 1, 0)
    assert len({first, approval_id_for("r1", 2, 0), approval_id_for("r1", 1, 1)}) == 3
    assert validate_token(first, "approval id") == first
    assert arguments_digest({"a": 1, "b": [2]}) == arguments_digest({"b": [2], "a": 1})
    assert arguments_digest({"a": 1}) != arguments_digest({"a": "1"})
    assert arguments_preview({"text": "x" * 5000}).endswith("…")
    assert len(arguments_preview({"text": "x" * 5000})) == 2000


# ---------------------------------------------------------------------------- rules

RM_RF = ArgumentMatcher(key="command", pattern=r"\brm\s+-[A-Za-z]*([rR][A-Za-z]*f|f[A-Za-z]*[rR])")
RULES = (
    ApprovalRule(name="no-rm-rf", tool="shell", arguments=(RM_RF,), effect="deny", reason="rm -rf"),
    ApprovalRule(
        name="ls",
        tool="shell",
        arguments=(ArgumentMatcher(key="command", pattern=r"^ls(\s|$)"),),
        effect="allow",
    ),
    ApprovalRule(name="reads", tool="fs_read*", effect="allow"),
    ApprovalRule(
        name="big-payments",
        tool="pay",
        arguments=(ArgumentMatcher(key="amount", pattern=r"^\d{4,}"),),
        effect="ask",
    ),
    ApprovalRule(name="payments", tool="pay", effect="allow"),
)

EVALUATE: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    ("rm -rf is denied", "shell", {"command": "rm -rf /"}, "deny", "no-rm-rf"),
    ("rm -fr is denied", "shell", {"command": "cd /tmp && rm -fr x"}, "deny", "no-rm-rf"),
    ("rm -Rf is denied", "shell", {"command": "rm -Rf x"}, "deny", "no-rm-rf"),
    ("ls is allowed", "shell", {"command": "ls"}, "allow", "ls"),
    ("ls -la is allowed", "shell", {"command": "ls -la /srv"}, "allow", "ls"),
    ("lsblk is not ls", "shell", {"command": "lsblk"}, "ask", None),
    ("rm without -rf asks", "shell", {"command": "rm notes.txt"}, "ask", None),
    ("a word containing rm is not rm", "shell", {"command": "echo confirm -rf"}, "ask", None),
    ("a missing argument does not match", "shell", {"cmd": "rm -rf /"}, "ask", None),
    ("tool globs", "fs_read_file", {"path": "/etc/hosts"}, "allow", "reads"),
    ("tool names are case-sensitive", "Shell", {"command": "ls"}, "ask", None),
    ("unknown tools ask", "browser", {}, "ask", None),
    ("an earlier ask wins over a later allow", "pay", {"amount": 25000}, "ask", "big-payments"),
    ("non-strings match as JSON", "pay", {"amount": 12}, "allow", "payments"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "effect", "rule"), [c[1:] for c in EVALUATE], ids=[c[0] for c in EVALUATE]
)
def test_rules_first_match_wins_default_ask(
    tool: str, arguments: dict[str, Any], effect: str, rule: str | None
) -> None:
    verdict = evaluate(RULES, tool, arguments)
    assert (verdict.effect, verdict.rule) == (effect, rule)


def test_no_rules_ask() -> None:
    assert evaluate((), "shell", {"command": "rm -rf /"}) == RuleVerdict("ask")


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        ArgumentMatcher(key="command", pattern="(")
    with pytest.raises(ValidationError):
        ApprovalRule(name="x", tool="shell", effect="maybe")
    state = APPROVAL_RULES.fold([])
    with pytest.raises(InvalidRules, match="ls repeated"):
        APPROVAL_RULES.decide(SetApprovalRules((RULES[1], RULES[1]), "ada"), state)
    events = APPROVAL_RULES.decide(SetApprovalRules(RULES, "ada"), state)
    assert events == [ApprovalRulesSet(rules=RULES, by="ada")]
    state = APPROVAL_RULES.fold(events)
    assert APPROVAL_RULES.decide(SetApprovalRules(RULES, "bob"), state) == []  # unchanged


# ---------------------------------------------------------------------------- signed links

KEY = b"k" * 32
NOW = datetime.now(UTC)


def claims(**changes: Any) -> LinkClaims:
    base = LinkClaims.new("acme", "ap_1", "granted", "user:ada", NOW + timedelta(hours=1), NOW)
    return replace(base, **changes)


def test_a_link_verifies_and_says_what_it_allows() -> None:
    link = claims()
    token = sign_link(link, KEY, "k1")
    assert verify_link(token, {"k1": KEY}, NOW) == link
    header = orjson.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    assert claims().jti != claims().jti  # every link is its own


def _swap_payload(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    forged = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def _with_header(token: str, header: dict[str, Any]) -> str:
    _, payload, signature = token.split(".")
    forged = base64.urlsafe_b64encode(orjson.dumps(header)).rstrip(b"=").decode()
    return f"{forged}.{payload}.{signature}"


def test_tampering_is_refused() -> None:
    token = sign_link(claims(), KEY, "k1")
    keys = {"k1": KEY}
    for forged in (
        _swap_payload(token, decision="denied"),
        _swap_payload(token, sub="ap_2"),
        _swap_payload(token, ws="other"),
        _swap_payload(token, exp=int((NOW + timedelta(days=30)).timestamp())),
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
    ):
        with pytest.raises(LinkInvalid):
            verify_link(forged, keys, NOW)
    with pytest.raises(LinkInvalid, match="HS256"):
        verify_link(_with_header(token, {"alg": "none", "kid": "k1"}), keys, NOW)
    with pytest.raises(LinkInvalid):
        verify_link(sign_link(claims(), b"another key", "k1"), keys, NOW)
    header = token.split(".")[0]
    for garbage in ("", "a.b", "a.b.c.d", "!!.??.**", "x" * 5000, f"{header}.é.ü", "é.é.é"):
        with pytest.raises(LinkInvalid):
            verify_link(garbage, keys, NOW)


def test_an_expired_link_is_refused() -> None:
    token = sign_link(claims(expires_at=int(NOW.timestamp()) + 10), KEY, "k1")
    assert verify_link(token, {"k1": KEY}, NOW).approval_id == "ap_1"
    with pytest.raises(LinkExpired, match="expired at"):
        verify_link(token, {"k1": KEY}, NOW + timedelta(seconds=10))


def test_an_unknown_or_retired_kid_is_refused_and_rotation_keeps_older_links() -> None:
    old = sign_link(claims(), KEY, "k1")
    new_key = b"n" * 32
    new = sign_link(claims(), new_key, "k2")
    rotated = {"k2": new_key, "k1": KEY}  # after a rotation: the previous key is kept
    assert verify_link(old, rotated, NOW).decision == "granted"
    assert verify_link(new, rotated, NOW).decision == "granted"
    with pytest.raises(LinkInvalid, match="unknown or retired key"):
        verify_link(old, {"k2": new_key}, NOW)  # the old key dropped out
    with pytest.raises(LinkInvalid, match="altered"):  # claiming another key's name
        verify_link(_with_header(old, {"alg": "HS256", "typ": "JWT", "kid": "k2"}), rotated, NOW)
