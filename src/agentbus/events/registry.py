"""Typed domain events, and the registry from a CloudEvents type string to its model.

A domain event is a pydantic model with `extra="forbid"` and a `kind` naming its aggregate,
its name and its version: `EventKind("run", "started", 1)` has the type string
`agentbus.run.started.v1` and lives on subject `evt.<ws>.run.<id>.started`.

Old versions stay readable forever: an `Upcaster` turns the data of version n into the data of
version n+1, and the registry chains them up to the model it knows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from agentbus.errors import InvalidEvent, UnknownEventType
from agentbus.events.subjects import validate_name

TYPE_PREFIX = "agentbus"
_TYPE = re.compile(r"agentbus\.([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)\.v([0-9]+)")


@dataclass(frozen=True, slots=True)
class EventKind:
    aggregate: str
    name: str
    version: int
    type: str = field(init=False, repr=False, compare=False)
    """The CloudEvents type, `agentbus.<aggregate>.<name>.v<version>` (made once: every
    append writes it)."""

    def __post_init__(self) -> None:
        validate_name(self.aggregate, "aggregate kind")
        validate_name(self.name, "event name")
        if self.version < 1:
            raise ValueError(f"event version must be >= 1, got {self.version}")
        type_ = f"{TYPE_PREFIX}.{self.aggregate}.{self.name}.v{self.version}"
        object.__setattr__(self, "type", type_)

    @classmethod
    def parse(cls, type_string: str) -> EventKind:
        return _parse_kind(type_string)


@functools.lru_cache(maxsize=1024)
def _parse_kind(type_string: str) -> EventKind:
    """`EventKind.parse`, cached: a pure function of an immutable string, called for every
    event read. Malformed strings raise (exceptions are not cached); the cache is bounded."""
    match = _TYPE.fullmatch(type_string)
    if match is None:
        raise UnknownEventType(
            f"{type_string!r} is not an agentbus event type (agentbus.<aggregate>.<name>.v<n>)"
        )
    return EventKind(match[1], match[2], int(match[3]))


class DomainEvent(BaseModel):
    """Base of every event payload. Subclasses set `kind` and declare their fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[EventKind]


Data = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Upcaster:
    """Reads `agentbus.<aggregate>.<name>.v<from_version>` data as version `from_version + 1`."""

    aggregate: str
    name: str
    from_version: int
    upcast: Callable[[Data], Data]


class EventRegistry:
    """Which model reads which type string. Built explicitly from a list of models."""

    def __init__(
        self, events: Iterable[type[DomainEvent]], upcasters: Iterable[Upcaster] = ()
    ) -> None:
        self._models: dict[tuple[str, str], type[DomainEvent]] = {}
        for model in events:
            key = (model.kind.aggregate, model.kind.name)
            if key in self._models:
                raise ValueError(f"two models registered for {model.kind.aggregate}.{key[1]}")
            self._models[key] = model
        self._upcasters = {(u.aggregate, u.name, u.from_version): u for u in upcasters}

    @property
    def models(self) -> list[type[DomainEvent]]:
        return sorted(self._models.values(), key=lambda m: m.kind.type)

    def model_for(self, type_string: str) -> type[DomainEvent]:
        """The current model that reads `type_string` (after upcasting)."""
        kind = EventKind.parse(type_string)
        model = self._models.get((kind.aggregate, kind.name))
        if model is None:
            raise UnknownEventType(f"no event model registered for {type_string!r}")
        return model

    def decode(self, type_string: str, data: Data) -> DomainEvent:
        """Validate `data` of `type_string` into its current model, upcasting old versions."""
        kind = EventKind.parse(type_string)
        model = self.model_for(type_string)
        version = kind.version
        if version > model.kind.version:
            raise UnknownEventType(
                f"{type_string!r} is newer than this build knows ({model.kind.type}); upgrade"
            )
        while version < model.kind.version:
            upcaster = self._upcasters.get((kind.aggregate, kind.name, version))
            if upcaster is None:
                raise UnknownEventType(
                    f"no upcaster from {type_string!r} v{version} to v{version + 1}"
                )
            data = upcaster.upcast(data)
            version += 1
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidEvent(f"{type_string} data is invalid: {exc}") from exc
