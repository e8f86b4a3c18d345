"""JetStream streams as data: the definitions in `streams/*.toml`, and applying them.

Read top to bottom: the friendly value types (durations, sizes), the `StreamSpec` model and its
loader, the pure planning core (what differs, what is destructive, what nats-server cannot change
in place), the rendering of a plan, and at the end the thin async shell that talks to the
JetStream API.

The JetStream API is used raw (`$JS.API.STREAM.INFO|CREATE|UPDATE.<name>`, JSON bodies) because
the plan must compare exactly what the server stores, not what a client library's model makes
of it. Facts checked against nats-server 2.15.1:

- the server echoes `allow_atomic` only when true (the key is omitted when false); every other
  managed field comes back as sent, durations in nanoseconds, replicas as `num_replicas`;
- it normalises `0` limits to `-1`, replicas `0` to `1`, a `0` duplicate window to 2 min and an
  empty description to none, so those inputs are refused here: otherwise a repeated apply would
  never report "unchanged";
- it refuses to update `storage`, `retention` to or from `workqueue`, and to turn off
  `deny_delete`, `deny_purge` or `allow_msg_ttl` (err_code 10052). limits <-> interest is allowed.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import nats.errors
import orjson
from nats.aio.client import Client
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from agentbus.errors import StoreUnavailable, StreamConfigError

# --- friendly values ---------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)")
_SIZE_UNITS = {"TiB": 1 << 40, "GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}
_MIN_WINDOW = timedelta(milliseconds=100)  # nats-server refuses anything shorter


def parse_duration(value: object) -> timedelta:
    """`"90s"`, `"2m"`, `"1h30m"`, `"7d"`, `"250ms"`; `"0"` means none / unlimited."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f'a duration is a string such as "2m", "1h" or "0" (unlimited), not {value!r}'
        )
    text = value.strip()
    if text == "0":
        return timedelta(0)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f'{value!r} is not a duration: use digits with units d, h, m, s, ms ("2m", "1h30m"),'
            ' or "0" for unlimited'
        )
    return sum((int(n) * _DURATION_UNITS[u] for n, u in parts), timedelta(0))


def format_duration(value: timedelta) -> str:
    """The inverse of `parse_duration`: `timedelta(minutes=90)` -> `"1h30m"`."""
    remaining = value
    parts = []
    for unit, size in _DURATION_UNITS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0"


def parse_size(value: object) -> int:
    """A byte count: an integer (-1: unlimited) or a string such as `"8MiB"`, `"1GiB"`."""
    if isinstance(value, bool):
        raise ValueError(f"a size is an integer or a string such as '8MiB', not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(match[1]) * _SIZE_UNITS[match[2]]
    raise ValueError(
        f"{value!r} is not a size: use an integer (-1: unlimited) or digits with B, KiB, MiB, "
        "GiB or TiB (e.g. '8MiB')"
    )


def format_size(value: int) -> str:
    """`8388608` -> `"8MiB"`; -1 -> `"unlimited"`."""
    if value < 0:
        return "unlimited"
    for unit, size in _SIZE_UNITS.items():
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Size = Annotated[int, BeforeValidator(parse_size)]


# --- the spec ----------------------------------------------------------------------------------

_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


def _check_limit(value: int) -> int:
    # 0 is normalised to -1 by the server: refuse it so the diff stays stable.
    if value == 0 or value < -1:
        raise ValueError("must be -1 (unlimited) or a positive number")
    return value


class StreamSpec(BaseModel):
    """One JetStream stream as agentbus declares it. Field names are the friendly ones used in
    `streams/*.toml`; `to_jetstream()` gives the JetStream API's JSON.

    Defaults equal nats-server's, so an omitted field means "the server default"; the files in
    `streams/` spell every field out anyway, so a reader sees the whole contract.
    """

    # strict: TOML has real types, so `true` or `1.5` where an integer belongs is a mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    description: str | None = None
    subjects: list[str]
    storage: Literal["file", "memory"] = "file"
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    replicas: int = Field(default=1, ge=1, le=5)
    max_age: Duration = timedelta(0)
    duplicate_window: Duration = timedelta(minutes=2)
    max_msgs: int = -1
    max_bytes: Size = -1
    max_msg_size: Size = -1
    max_msgs_per_subject: int = -1
    discard: Literal["old", "new"] = "old"
    allow_direct: bool = False
    allow_atomic: bool = False
    allow_msg_ttl: bool = False
    deny_delete: bool = False
    deny_purge: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _STREAM_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a stream name: 1-64 letters, digits, '_' or '-'")
        return value

    @field_validator("description")
    @classmethod
    def _description(cls, value: str | None) -> str | None:
        return value or None  # the server drops an empty description

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one subject is needed")
        for subject in value:
            _check_subject(subject)
        for i, first in enumerate(value):
            for second in value[i + 1 :]:
                if subjects_overlap(first, second):
                    raise ValueError(f"subjects {first!r} and {second!r} overlap")
        return value

    @field_validator("max_msgs", "max_bytes", "max_msg_size", "max_msgs_per_subject")
    @classmethod
    def _limits(cls, value: int) -> int:
        return _check_limit(value)

    @field_validator("max_age")
    @classmethod
    def _max_age(cls, value: timedelta) -> timedelta:
        if value and value < _MIN_WINDOW:
            raise ValueError('must be "0" (unlimited) or at least 100ms')
        return value

    @field_validator("duplicate_window")
    @classmethod
    def _duplicate_window(cls, value: timedelta) -> timedelta:
        if value < _MIN_WINDOW:
            raise ValueError("must be at least 100ms (the server turns 0 into its 2m default)")
        return value

    @model_validator(mode="after")
    def _window_within_age(self) -> StreamSpec:
        if self.max_age and self.duplicate_window > self.max_age:
            raise ValueError(
                f"duplicate_window ({format_duration(self.duplicate_window)}) cannot be longer "
                f"than max_age ({format_duration(self.max_age)})"
            )
        return self

    def to_jetstream(self) -> dict[str, Any]:
        """The JetStream API stream config (`$JS.API.STREAM.CREATE` body): durations in ns."""
        config: dict[str, Any] = {
            "name": self.name,
            "subjects": list(self.subjects),
            "storage": self.storage,
            "retention": self.retention,
            "num_replicas": self.replicas,
            "max_age": _nanoseconds(self.max_age),
            "duplicate_window": _nanoseconds(self.duplicate_window),
            "max_msgs": self.max_msgs,
            "max_bytes": self.max_bytes,
            "max_msg_size": self.max_msg_size,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "discard": self.discard,
            "allow_direct": self.allow_direct,
            "allow_atomic": self.allow_atomic,
            "allow_msg_ttl": self.allow_msg_ttl,
            "deny_delete": self.deny_delete,
            "deny_purge": self.deny_purge,
        }
        if self.description is not None:
            config["description"] = self.description
        return config


def _nanoseconds(value: timedelta) -> int:
    return value // timedelta(microseconds=1) * 1000


def _check_subject(subject: str) -> None:
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1:
            continue
        if token == "*" or _SUBJECT_TOKEN.fullmatch(token):
            continue
        raise ValueError(
            f"{subject!r} is not a subject filter: dot-separated non-empty tokens, '*' for one "
            "token, '>' only as the last token"
        )


def subjects_overlap(first: str, second: str) -> bool:
    """True if some subject matches both filters (`evt.>` and `evt.acme.*` overlap)."""
    a, b = first.split("."), second.split(".")
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(a) == len(b)


def subject_covers(wide: str, narrow: str) -> bool:
    """True if every subject matching `narrow` also matches `wide` (`evt.>` covers `evt.*.x`)."""
    a, b = wide.split("."), narrow.split(".")
    for i, x in enumerate(a):
        if x == ">":
            return len(b) > i
        if i >= len(b) or b[i] == ">" or (x != "*" and (x != b[i] or b[i] == "*")):
            return False
    return len(a) == len(b)


def load_stream_specs(directory: Path) -> list[StreamSpec]:
    """Every `*.toml` in `directory`, sorted by file name, as validated specs.

    A file's stream name defaults to the file's stem and, if given, must equal it. Raises
    `StreamConfigError` naming the file and field on invalid TOML, unknown or invalid fields,
    a directory without definitions, a name that differs from the file's, or subjects
    overlapping across streams (nats-server refuses those too, but only halfway through an apply).
    """
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise StreamConfigError(f"{directory}: no stream definitions (*.toml) found")
    specs = [_load_file(path) for path in files]
    # Names are unique already: each must equal its file's stem.
    for i, (path, spec) in enumerate(zip(files, specs, strict=True)):
        for other_path, other in zip(files[:i], specs[:i], strict=True):
            for subject in spec.subjects:
                for other_subject in other.subjects:
                    if subjects_overlap(subject, other_subject):
                        raise StreamConfigError(
                            f"{path}: field 'subjects': {subject!r} overlaps {other_subject!r} "
                            f"of stream {other.name!r} ({other_path.name}); a subject can "
                            "belong to one stream only"
                        )
    return specs


def _load_file(path: Path) -> StreamSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StreamConfigError(f"{path}: invalid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamConfigError(f"{path}: cannot read: {exc}") from exc
    name = data.setdefault("name", path.stem)
    if name != path.stem:
        raise StreamConfigError(
            f"{path}: field 'name': {name!r} must match the file name ({path.stem}.toml)"
        )
    try:
        return StreamSpec.model_validate(data)
    except ValidationError as exc:
        raise StreamConfigError(f"{path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(file)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field (known: {', '.join(StreamSpec.model_fields)})"
        problems.append(f"field {where!r}: {message}")
    return "; ".join(problems)


# --- planning: pure ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    """One managed field that differs; values are in `StreamSpec` terms (durations as
    `timedelta`, subjects as a list). `current` is None when the stream is being created."""

    field: str
    current: object
    desired: object
    destructive: bool

    @property
    def in_place_refusal(self) -> str | None:
        """Why nats-server cannot apply this change to an existing stream, or None if it can."""
        return _in_place_refusal(self.field, self.current, self.desired)


@dataclass(frozen=True)
class StreamPlan:
    """What applying one spec does: create the stream, update some fields, or nothing."""

    name: str
    action: Literal["create", "update", "unchanged"]
    changes: tuple[FieldChange, ...]

    @property
    def destructive(self) -> bool:
        """True if any change could lose data or protection (needs force)."""
        return any(change.destructive for change in self.changes)


_MANAGED = tuple(name for name in StreamSpec.model_fields if name != "name")
# Limits under which messages are removed: tightening one drops stored messages at once.
_UNLIMITED = {"max_age": timedelta(0), "max_msgs": -1, "max_bytes": -1, "max_msgs_per_subject": -1}


def managed_values(config: Mapping[str, Any]) -> dict[str, object]:
    """The fields a spec manages, read from a raw JetStream stream config, in `StreamSpec` terms.

    Applied to both sides of a comparison (`spec.to_jetstream()` and the server's echo), so the
    server's habit of omitting false `allow_atomic` or an empty description cannot show up as a
    difference.
    """
    return {
        "description": config.get("description") or None,
        "subjects": list(config.get("subjects") or []),
        "storage": config.get("storage", "file"),
        "retention": config.get("retention", "limits"),
        "replicas": config.get("num_replicas", 1),
        "max_age": timedelta(microseconds=config.get("max_age", 0) // 1000),
        "duplicate_window": timedelta(microseconds=config.get("duplicate_window", 0) // 1000),
        "max_msgs": config.get("max_msgs", -1),
        "max_bytes": config.get("max_bytes", -1),
        "max_msg_size": config.get("max_msg_size", -1),
        "max_msgs_per_subject": config.get("max_msgs_per_subject", -1),
        "discard": config.get("discard", "old"),
        "allow_direct": bool(config.get("allow_direct", False)),
        "allow_atomic": bool(config.get("allow_atomic", False)),
        "allow_msg_ttl": bool(config.get("allow_msg_ttl", False)),
        "deny_delete": bool(config.get("deny_delete", False)),
        "deny_purge": bool(config.get("deny_purge", False)),
    }


def is_destructive(field: str, current: object, desired: object) -> bool:
    """Whether changing `field` from `current` to `desired` on an existing stream could lose
    stored messages or the audit protection: a new storage type or retention policy, a subject
    removed (and not covered by a remaining one), fewer replicas, `deny_delete`, `deny_purge` or
    `allow_msg_ttl` turned off, or a tighter retention limit (`max_age`, `max_msgs`,
    `max_bytes`, `max_msgs_per_subject`), which makes the server drop messages at once."""
    if field in ("storage", "retention"):
        return current != desired
    if field == "subjects":
        # Removing a subject is harmless only if a remaining one still covers it.
        kept = _strings(desired)
        return any(not any(subject_covers(new, old) for new in kept) for old in _strings(current))
    if field == "replicas":
        return _int(desired) < _int(current)
    if field in ("deny_delete", "deny_purge", "allow_msg_ttl"):
        return current is True and desired is False
    if field in _UNLIMITED:
        return _tighter(desired, current, _UNLIMITED[field])
    return False


def _in_place_refusal(field: str, current: object, desired: object) -> str | None:
    if current is None:
        return None  # creating: anything goes
    if field == "storage" and current != desired:
        return "the storage type of a stream cannot change"
    if field == "retention" and current != desired and "workqueue" in (current, desired):
        return "retention cannot change to or from workqueue"
    if field in ("deny_delete", "deny_purge", "allow_msg_ttl") and current is True and not desired:
        return f"{field} cannot be turned off once on"
    return None


def _tighter(desired: object, current: object, unlimited: object) -> bool:
    if desired == unlimited:
        return False
    if current == unlimited:
        return True
    return bool(desired < current)  # type: ignore[operator]  # same-typed int or timedelta


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def plan_stream(spec: StreamSpec, current: Mapping[str, Any] | None) -> StreamPlan:
    """Compare `spec` with the stream's current raw config (None: it does not exist).

    Only the fields a spec manages are compared; subjects compare as a set.
    """
    desired = managed_values(spec.to_jetstream())
    if current is None:
        changes = tuple(
            FieldChange(name, None, desired[name], destructive=False) for name in _MANAGED
        )
        return StreamPlan(spec.name, "create", changes)
    have = managed_values(current)
    changes = tuple(
        FieldChange(
            name, have[name], desired[name], is_destructive(name, have[name], desired[name])
        )
        for name in _MANAGED
        if not _same(name, have[name], desired[name])
    )
    return StreamPlan(spec.name, "update" if changes else "unchanged", changes)


def _same(field: str, current: object, desired: object) -> bool:
    if field == "subjects":
        return set(_strings(current)) == set(_strings(desired))
    return current == desired


def check_plans(plans: Sequence[StreamPlan], *, force: bool) -> None:
    """Raise if `plans` may not be applied: `DestructiveStreamChange` for destructive changes
    without `force`; `StreamConfigError` for changes nats-server cannot make in place (even with
    `force`: agentbus never deletes a stream to re-create it)."""
    destructive = [(p.name, c) for p in plans for c in p.changes if c.destructive]
    impossible = [(name, c) for name, c in destructive if c.in_place_refusal]
    if destructive and not force:
        raise DestructiveStreamChange(plans, destructive)
    if impossible:
        lines = "\n".join(f"  {_describe_change(n, c)}" for n, c in impossible)
        raise StreamConfigError(
            "nats-server cannot apply these changes to an existing stream, even with --force:\n"
            f"{lines}\nMove the data to a new stream deliberately, or delete the stream yourself "
            "(`nats stream rm <name>`) if its data is disposable; agentbus never deletes a stream."
        )


class DestructiveStreamChange(StreamConfigError):
    """Applying would be destructive and force was not given. `plans` holds the full plan (to
    render), `changes` every destructive (stream, change) pair, all named in the message."""

    def __init__(
        self, plans: Sequence[StreamPlan], changes: Sequence[tuple[str, FieldChange]]
    ) -> None:
        self.plans = tuple(plans)
        self.changes = tuple(changes)
        lines = "\n".join(f"  {_describe_change(name, change)}" for name, change in changes)
        super().__init__(
            f"refusing {len(changes)} destructive stream change(s) without --force:\n{lines}"
        )


def _describe_change(stream: str, change: FieldChange) -> str:
    text = (
        f"{stream}.{change.field}: {format_value(change.field, change.current)} -> "
        f"{format_value(change.field, change.desired)}"
    )
    refusal = change.in_place_refusal
    return f"{text} (cannot change in place: {refusal})" if refusal else text


# --- rendering ---------------------------------------------------------------------------------


def format_value(field: str, value: object) -> str:
    """A field value as the TOML files spell it (`"2m"`, `"8MiB"`, `unlimited`, `-`: none)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, timedelta):
        return "unlimited" if field == "max_age" and not value else format_duration(value)
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if isinstance(value, int) and field in ("max_bytes", "max_msg_size"):
        return format_size(value)
    if isinstance(value, int) and value == -1:
        return "unlimited"
    return str(value)


_ACTION_STYLE = {"create": "green", "update": "yellow", "unchanged": "dim"}


def render_plans(plans: Sequence[StreamPlan]) -> RenderableType:
    """A readable diff of `plans` for a terminal: one block per stream with its action and each
    changed field `current -> desired`; destructive changes are marked (and those nats-server
    cannot make in place say so), followed by a one-line summary."""
    table = Table(title="JetStream streams", title_justify="left")
    table.add_column("stream", style="bold", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("field", no_wrap=True)
    table.add_column("current", overflow="fold")
    table.add_column("desired", overflow="fold")
    table.add_column("note", style="bold red", overflow="fold")
    for plan in plans:
        action = Text(plan.action, style=_ACTION_STYLE[plan.action])
        if not plan.changes:
            table.add_row(Text(plan.name), action, end_section=True)
        for i, change in enumerate(plan.changes):
            note = ""
            if change.in_place_refusal:
                note = "destructive; cannot change in place"
            elif change.destructive:
                note = "destructive"
            # Text, not str: a description with "[...]" must not be read as rich markup.
            table.add_row(
                Text(plan.name if i == 0 else ""),
                action if i == 0 else "",
                Text(change.field),
                Text(format_value(change.field, change.current)),
                Text(format_value(change.field, change.desired)),
                Text(note),
                end_section=i == len(plan.changes) - 1,
            )
    return Group(table, Text(_summary(plans)))


def _summary(plans: Sequence[StreamPlan]) -> str:
    counts = {action: sum(p.action == action for p in plans) for action in _ACTION_STYLE}
    text = ", ".join(
        f"{n} unchanged" if a == "unchanged" else f"{n} to {a}" for a, n in counts.items() if n
    )
    destructive = sum(c.destructive for p in plans for c in p.changes)
    if destructive:
        text += f"; {destructive} destructive change(s): refused without --force"
    return f"{len(plans)} stream(s): {text or 'none'}"


# --- the shell: JetStream API requests ---------------------------------------------------------

_API = "$JS.API"
_NOT_FOUND = 10059


async def _request(
    nc: Client, subject: str, body: Mapping[str, Any] | None, timeout: float
) -> dict[str, Any]:
    payload = orjson.dumps(body) if body is not None else b""
    try:
        reply = await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise StoreUnavailable(
            f"no JetStream answered {subject}: is JetStream enabled on the NATS server?"
        ) from exc
    except TimeoutError as exc:  # nats.errors.TimeoutError is one
        raise StoreUnavailable(f"JetStream did not answer {subject} within {timeout:g}s") from exc
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
    ) as exc:
        raise StoreUnavailable(f"NATS connection unusable for {subject}: {exc!r}") from exc
    try:
        answer = orjson.loads(reply.data)
    except orjson.JSONDecodeError as exc:
        raise StoreUnavailable(f"JetStream answered {subject} with invalid JSON") from exc
    if not isinstance(answer, dict):
        raise StoreUnavailable(f"JetStream answered {subject} with {answer!r}")
    return answer


def _api_error(stream: str, verb: str, answer: Mapping[str, Any]) -> StreamConfigError:
    error = answer["error"]
    return StreamConfigError(
        f"nats-server refused to {verb} stream {stream}: {error.get('description')} "
        f"(err_code {error.get('err_code')})"
    )


async def _current_configs(
    nc: Client, names: Iterable[str], timeout: float
) -> dict[str, dict[str, Any] | None]:
    configs: dict[str, dict[str, Any] | None] = {}
    for name in names:
        answer = await _request(nc, f"{_API}.STREAM.INFO.{name}", None, timeout)
        error = answer.get("error")
        if error is not None and error.get("err_code") == _NOT_FOUND:
            configs[name] = None
        elif error is not None:
            raise _api_error(name, "read", answer)
        else:
            configs[name] = answer["config"]
    return configs


async def plan_streams(
    nc: Client, specs: Sequence[StreamSpec], timeout: float = 5.0
) -> list[StreamPlan]:
    """Read each stream's current config (`$JS.API.STREAM.INFO.<name>`) and plan every spec.

    Changes nothing. Raises `StoreUnavailable` if JetStream does not answer in `timeout`.
    """
    configs = await _current_configs(nc, (spec.name for spec in specs), timeout)
    return [plan_stream(spec, configs[spec.name]) for spec in specs]


async def apply_streams(
    nc: Client,
    specs: Sequence[StreamSpec],
    *,
    dry_run: bool = False,
    force: bool = False,
    timeout: float = 5.0,
) -> list[StreamPlan]:
    """Create or update the streams so they match `specs`; returns the plans (what was done).

    Idempotent: applying twice in a row reports every stream "unchanged" the second time.
    Before touching anything it raises `DestructiveStreamChange` (a `StreamConfigError`) naming
    every destructive change unless `force`, and `StreamConfigError` for changes nats-server
    cannot make in place. `dry_run` only plans: it never raises for destructive changes, so the
    caller can show them. A refusal by the server becomes `StreamConfigError` with the server's
    description; no answer within `timeout` becomes `StoreUnavailable`. Fields a spec does not
    manage (metadata, compression, sources...) are kept as they are on update. Streams that
    exist on the server but not in `specs` are left alone.
    """
    configs = await _current_configs(nc, (spec.name for spec in specs), timeout)
    plans = [plan_stream(spec, configs[spec.name]) for spec in specs]
    if dry_run:
        return plans
    check_plans(plans, force=force)
    for spec, plan in zip(specs, plans, strict=True):
        current = configs[spec.name]
        if plan.action == "create":
            verb, body = "CREATE", spec.to_jetstream()
        elif plan.action == "update" and current is not None:
            verb, body = "UPDATE", update_body(current, spec)
        else:
            continue
        answer = await _request(nc, f"{_API}.STREAM.{verb}.{spec.name}", body, timeout)
        if "error" in answer:
            raise _api_error(spec.name, verb.lower(), answer)
    return plans


def update_body(current: Mapping[str, Any], spec: StreamSpec) -> dict[str, Any]:
    """The `$JS.API.STREAM.UPDATE` body: the current config with the managed fields replaced.

    An update replaces the whole config, so unmanaged settings are carried over rather than
    reset to defaults.
    """
    body = {**current, **spec.to_jetstream()}
    if spec.description is None:
        body.pop("description", None)
    return body
