"""Events of the approval aggregates.

- `approval/<id>`: one request of a run to use a tool, and its one decision:
  `requested -> granted | denied | expired`. A decision made by a rule (no human asked) is an
  event too, appended with the request, with the rule as its actor (`rule`, `by = rule:<name>`).
- `approval_rules/workspace`: the workspace's rules (allow / deny / ask by tool name pattern and
  argument matchers), replaced as a whole by `set`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentbus.events.privacy import Personal
from agentbus.events.registry import DomainEvent, EventKind

Decision = Literal["granted", "denied"]
"""What a person (or a rule) can decide."""
Outcome = Literal["granted", "denied", "expired"]
"""How an approval ends."""
Effect = Literal["allow", "deny", "ask"]
"""What a rule does with a tool call it matches."""

_ID = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
_ACTOR = Field(min_length=1, max_length=200)
_REASON = Field(default=None, max_length=2000)
MAX_RULES = 100


class ApprovalRequested(DomainEvent):
    """A run asks to use a tool with these arguments, until `expires_at`."""

    kind: ClassVar[EventKind] = EventKind("approval", "requested", 1)
    # A tool's arguments (and the agent's reason) are built from the run's input: sealed with
    # its author's key (docs/erasure.md).
    personal: ClassVar[Personal] = Personal(
        fields=("arguments_preview", "reason"), subject="author"
    )

    run_id: str = _ID
    attempt: int = Field(ge=1)
    session_id: str | None = Field(default=None, max_length=64)
    tool: str = Field(min_length=1, max_length=200)
    arguments_digest: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the arguments as canonical JSON (sorted keys): what is approved",
    )
    arguments_preview: str = Field(
        max_length=2000, description="the start of the arguments as JSON, for the person deciding"
    )
    reason: str | None = _REASON
    expires_at: datetime
    requested_by: str = _ACTOR
    author: str | None = Field(
        default=None,
        max_length=200,
        description="whose input the run works on (the data subject of the sealed fields)",
    )


class ApprovalGranted(DomainEvent):
    """The tool call may go ahead. `rule`: decided by that rule, not by a person; `jti`: decided
    through the signed link with this id (each link works once)."""

    kind: ClassVar[EventKind] = EventKind("approval", "granted", 1)

    by: str = _ACTOR
    reason: str | None = _REASON
    jti: str | None = Field(default=None, max_length=64)
    rule: str | None = Field(default=None, max_length=100)


class ApprovalDenied(DomainEvent):
    """The tool call must not happen; `reason` is what the agent is told."""

    kind: ClassVar[EventKind] = EventKind("approval", "denied", 1)

    by: str = _ACTOR
    reason: str | None = _REASON
    jti: str | None = Field(default=None, max_length=64)
    rule: str | None = Field(default=None, max_length=100)


class ApprovalExpired(DomainEvent):
    """Nobody decided before `expires_at`: the tool call fails."""

    kind: ClassVar[EventKind] = EventKind("approval", "expired", 1)

    expires_at: datetime


# ---------------------------------------------------------------------------- rules


class ArgumentMatcher(BaseModel):
    """Matches when the tool call's argument `key` (top level of its JSON object) exists and
    the regular expression `pattern` is found in it (`re.search`; a non-string value is
    matched as its JSON text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=100, examples=["command"])
    pattern: str = Field(min_length=1, max_length=500, examples=[r"\brm\s+-[a-zA-Z]*[rf]"])

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


class ApprovalRule(BaseModel):
    """One rule: a tool call whose name matches `tool` (a glob: `shell`, `fs_*`, `*`) and all
    of whose `arguments` matchers match is allowed, denied, or needs a person (`ask`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    tool: str = Field(min_length=1, max_length=200, examples=["shell"])
    arguments: tuple[ArgumentMatcher, ...] = Field(default=(), max_length=10)
    effect: Effect
    reason: str | None = Field(
        default=None, max_length=500, description="told to the agent when the rule denies"
    )


class ApprovalRulesSet(DomainEvent):
    """The workspace's rules, in order (the first matching rule decides; none: ask)."""

    kind: ClassVar[EventKind] = EventKind("approval_rules", "set", 1)

    rules: tuple[ApprovalRule, ...] = Field(max_length=MAX_RULES)
    by: str = _ACTOR
