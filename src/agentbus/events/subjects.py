"""Subjects: where an event lives on JetStream.

Durable events: `evt.<workspace>.<aggregate>.<id>.<event>`. Every token is validated before
anything is published: a dot, a wildcard, whitespace, an empty or over-long token is refused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from agentbus.errors import InvalidEvent

EVENTS_PREFIX = "evt"
LIVE_PREFIX = "live"
LIVE_STREAM = "LIVE"
"""The stream of running agents' output: `live.<workspace>.run.<id>.<kind>` (streams/LIVE.toml)."""
MAX_TOKEN_LENGTH = 64

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def validate_token(value: str, what: str) -> str:
    """Return `value` if it can stand as one subject token, else raise `InvalidEvent`."""
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"{what} must be a non-empty string")
    if len(value) > MAX_TOKEN_LENGTH:
        raise InvalidEvent(f"{what} is {len(value)} characters long; at most {MAX_TOKEN_LENGTH}")
    if not _TOKEN.fullmatch(value):
        raise InvalidEvent(
            f"{what} {value!r} may only contain letters, digits, '_' and '-' "
            "(no dots, wildcards or whitespace)"
        )
    return value


def validate_name(value: str, what: str) -> str:
    """Aggregate kinds and event names: lowercase snake case."""
    if not _NAME.fullmatch(value) or len(value) > MAX_TOKEN_LENGTH:
        raise InvalidEvent(f"{what} {value!r} must be lowercase snake_case")
    return value


@dataclass(frozen=True, slots=True)
class AggregateRef:
    """One aggregate instance: `run 01J... in workspace acme`. Validated on construction."""

    workspace: str
    kind: str
    id: str
    filter: str = field(init=False, repr=False, compare=False)
    """The subject filter matching every event of this aggregate."""
    path: str = field(init=False, repr=False, compare=False)
    """The CloudEvents `subject` attribute: `<aggregate>/<id>`."""

    def __post_init__(self) -> None:
        validate_token(self.workspace, "workspace")
        validate_name(self.kind, "aggregate kind")
        validate_token(self.id, f"{self.kind} id")
        # Made once (every append writes both; refs on hot paths are cached).
        object.__setattr__(
            self, "filter", f"{EVENTS_PREFIX}.{self.workspace}.{self.kind}.{self.id}.*"
        )
        object.__setattr__(self, "path", f"{self.kind}/{self.id}")

    def subject(self, event_name: str) -> str:
        return f"{EVENTS_PREFIX}.{self.workspace}.{self.kind}.{self.id}.{event_name}"

    @classmethod
    def from_subject(cls, subject: str) -> AggregateRef:
        head, dot, _ = subject.rpartition(".")
        ref = _ref_of_prefix(head) if dot else None
        if ref is None:
            raise InvalidEvent(f"{subject!r} is not an event subject evt.<ws>.<kind>.<id>.<event>")
        return ref


@functools.lru_cache(maxsize=4096)
def _ref_of_prefix(prefix: str) -> AggregateRef | None:
    """The aggregate of subjects `<prefix>.<event>` (None if `prefix` is not evt.<ws>.<kind>.
    <id>), cached: every event read asks for its aggregate, and an aggregate's events share the
    prefix (refs are frozen, so sharing one is safe). Invalid tokens raise (exceptions are not
    cached); the cache is bounded."""
    parts = prefix.split(".")
    if len(parts) != 4 or parts[0] != EVENTS_PREFIX:
        return None
    return AggregateRef(parts[1], parts[2], parts[3])


def workspace_filter(workspace: str, kind: str = "*") -> str:
    """Every event of a workspace (optionally one aggregate kind)."""
    validate_token(workspace, "workspace")
    if kind != "*":
        validate_name(kind, "aggregate kind")
    return f"{EVENTS_PREFIX}.{workspace}.{kind}.>"
