"""Personal data in events, and the event that records a data subject's erasure.

An event type that carries personal data says so with a `personal` class attribute: which of
its string fields are personal, and which field names the data subject they belong to (None:
the aggregate's id is the subject, as for a user). The event store seals those fields with the
subject's key at append (`agentbus.audit.sealing`); `agentbus audit forget` destroys the key
and appends `SubjectForgotten` (`docs/erasure.md`).

The declaration belongs to the *type string*: a stored event is opened by the declaration of
the type it was written as. When a personal type gets a new version, keep the old version's
declaration readable too (see `personal_types`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

from agentbus.events.registry import DomainEvent, EventKind


@dataclass(frozen=True, slots=True)
class Personal:
    """Which fields of an event type are personal data, and whose.

    `fields`: string fields sealed with the subject's key (None values are left alone).
    `subject`: the field whose value names the data subject; None when the subject is the
    aggregate's id. The subject field itself is *not* sealed: it is how the key is found, and
    how `forget` finds the subject's rows. Use pseudonymous ids for it (docs/erasure.md).
    """

    fields: tuple[str, ...]
    subject: str | None = None

    def subject_of(self, data: Mapping[str, object], aggregate_id: str) -> str | None:
        """The data subject of one event's data (None: nobody, nothing to seal)."""
        if self.subject is None:
            return aggregate_id
        value = data.get(self.subject)
        return value if isinstance(value, str) and value else None


def personal_types(models: Iterable[type[DomainEvent]]) -> dict[str, Personal]:
    """Type string -> its declaration, for every model that declares personal fields."""
    found: dict[str, Personal] = {}
    for model in models:
        personal = getattr(model, "personal", None)
        if isinstance(personal, Personal):
            found[model.kind.type] = personal
    return found


def subject_digest(workspace: str, subject: str) -> str:
    """The SHA-256 (hex) naming a data subject of a workspace: its key's name in the key bucket
    and its `privacy` aggregate's id. Any subject string gives a valid KV key and subject token.
    """
    return hashlib.sha256(f"{workspace}\n{subject}".encode()).hexdigest()


class SubjectForgotten(DomainEvent):
    """A data subject's key was destroyed: their sealed fields read as `[erased]` from now on.

    Lives on `evt.<workspace>.privacy.<digest>.subject_forgotten`, in the workspace whose
    subject was forgotten (`digest`: SHA-256 of workspace and subject, see `subject_digest`).
    Read models that copied the subject's personal fields erase them when they see it."""

    kind: ClassVar[EventKind] = EventKind("privacy", "subject_forgotten", 1)

    subject: str = Field(min_length=1, max_length=200, description="the data subject forgotten")
    key_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{16}$",
        description="the destroyed key (None: no key was left, e.g. a repeated forget)",
    )
    by: str = Field(min_length=1, max_length=200, description="who asked for the erasure")
    reason: str | None = Field(default=None, max_length=500)
