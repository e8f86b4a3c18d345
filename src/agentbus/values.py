"""`value`: immutable value objects for what is built on every request or event.

A `@dataclass(frozen=True)` is immutable at run time because its `__init__` sets each field
through `object.__setattr__`, one call per field: 0.9 µs for seven fields, where a plain slots
dataclass takes 0.2 µs. A `value` class is frozen where this project checks immutability, in
the type checker: `dataclass_transform(frozen_default=True)` makes `mypy --strict` refuse an
assignment to a field, exactly as for a frozen dataclass. At run time it is a plain slots
dataclass, compared and hashed by its fields as a frozen one is.

Only for objects built on the hot paths (the gateway's post of a message builds eight: see
`http_ingest` in docs/benchmarks.md); everything else stays `@dataclass(frozen=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def value(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True, slots=True)` for the type checker, cheap to build."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
