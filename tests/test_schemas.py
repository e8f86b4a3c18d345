"""The published contracts in `schemas/`: generated from the event models, never hand-edited,
and always in step with the models.

These tests need no servers. `jsonschema` is not a dependency, so the schemas are checked with a
small validator below that knows exactly the keywords pydantic emits and refuses any other
(it cannot silently pass a schema it does not understand); the tests marked with `jsonschema`
run the reference implementation as well when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import agentbus
from agentbus.events.catalog import default_registry
from agentbus.events.envelope import CloudEvent, EventContext, uuid7
from agentbus.events.registry import DomainEvent, EventKind, EventRegistry, Upcaster
from agentbus.events.schemas import (
    ASYNCAPI_FILE,
    SCHEMA_DIALECT,
    TOKEN_PATTERN,
    asyncapi_document,
    check_schema_files,
    event_schema,
    render_schema_files,
    write_schema_files,
)
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import encode_event

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
REGISTRY = default_registry()
MODELS = REGISTRY.models

# One valid `data` per registered type. Adding an event type means adding its example here
# (`test_every_type_has_an_example` says so).
EXAMPLE_DATA: dict[str, dict[str, Any]] = {
    "agentbus.workspace.created.v1": {"display_name": "Acme"},
    "agentbus.workspace.member_added.v1": {"user_id": "ada", "role": "member"},
    "agentbus.workspace.member_role_changed.v1": {"user_id": "ada", "role": "admin"},
    "agentbus.workspace.member_removed.v1": {"user_id": "ada"},
    "agentbus.workspace.redaction_mode_set.v1": {"mode": "keep"},
    "agentbus.user.created.v1": {"display_name": "Ada", "password_hash": "$argon2id$v=19$..."},
    "agentbus.user.password_changed.v1": {"password_hash": "$argon2id$v=19$..."},
    "agentbus.user.disabled.v1": {"reason": "left the company"},
    "agentbus.user.enabled.v1": {},
    "agentbus.apikey.issued.v1": {
        "name": "ci",
        "workspace": "acme",
        "role": "member",
        "secret_sha256": "0" * 64,
        "issued_by": "apikey:abc",
    },
    "agentbus.apikey.revoked.v1": {"by": "user:ada", "reason": "leaked"},
    "agentbus.privacy.subject_forgotten.v1": {
        "subject": "ada",
        "key_id": "0123456789abcdef",
        "by": "dpo",
        "reason": "GDPR art. 17 request",
    },
    "agentbus.session.opened.v1": {
        "channel": "web",
        "title": "Support",
        "agent": "helper",
        "concurrency": "enqueue",
    },
    "agentbus.session.closed.v1": {"reason": "done"},
    "agentbus.session.message_received.v1": {
        "message_id": "m1",
        "author": "ada",
        "text": "hello",
        "external_id": None,
    },
    "agentbus.session.message_sent.v1": {
        "message_id": "m2",
        "author": "helper",
        "text": "hi, how can I help?",
        "run_id": "r1",
    },
    "agentbus.session.run_assigned.v1": {
        "run_id": "r1",
        "input": "hello",
        "trigger_message_id": "m1",
    },
    "agentbus.session.run_enqueued.v1": {
        "run_id": "r2",
        "input": "and another thing",
        "trigger_message_id": "m3",
    },
    "agentbus.session.run_interrupted.v1": {"run_id": "r1"},
    "agentbus.session.run_released.v1": {"run_id": "r1"},
    "agentbus.run.queued.v1": {
        "agent": "echo",
        "executor": "echo",
        "input": "hello",
        "session_id": "s1",
        "trigger_message_id": "m1",
        "max_attempts": 3,
        "deadline_at": "2026-01-01T00:05:00Z",
    },
    "agentbus.run.started.v1": {"attempt": 1, "worker": "host:42:abc"},
    "agentbus.run.waiting_approval.v1": {"approval_id": "a1", "tool": "shell", "reason": "rm"},
    "agentbus.run.resumed.v1": {"approval_id": "a1", "decision": "granted"},
    "agentbus.run.succeeded.v1": {"attempt": 1, "output": "echo: hello"},
    "agentbus.run.failed.v1": {
        "attempt": 2,
        "error_class": "http_status",
        "message": "HTTP 400",
        "retryable": False,
    },
    "agentbus.run.retry_scheduled.v1": {
        "attempt": 2,
        "at": "2026-01-01T00:00:01Z",
        "error_class": "network",
        "message": "connection refused",
    },
    "agentbus.run.cancelled.v1": {"by": "ada", "reason": "changed my mind"},
    "agentbus.run.timed_out.v1": {"attempt": 1},
    "agentbus.run.usage_recorded.v1": {"model": "gpt", "tokens_in": 10, "tokens_out": 20},
    "agentbus.budget.set.v1": {
        "limit_tokens": 10_000,
        "limit_cost": None,
        "period_kind": "daily",
        "alert_at": 0.8,
        "by": "ada",
        "period": "2026-11-21",
        "period_used": 0,
        "period_reserved": 0,
        "balance": 10_000,
    },
    "agentbus.budget.period_started.v1": {
        "period": "2026-11-22",
        "period_kind": "daily",
        "limit_tokens": 10_000,
        "limit_cost": None,
        "alert_at": 0.8,
        "period_used": 0,
        "period_reserved": 0,
        "balance": 10_000,
        "earlier": [
            {
                "period": "2026-11-21",
                "limit_tokens": 10_000,
                "used": 9_000,
                "reserved": 1_000,
                "alerted": True,
                "exhausted": False,
            }
        ],
        "open_reservations": [
            {
                "reservation_id": "r1:1",
                "run_id": "r1",
                "attempt": 1,
                "tokens": 1_000,
                "period": "2026-11-21",
            }
        ],
    },
    "agentbus.budget.tokens_reserved.v1": {
        "reservation_id": "r1:1",
        "run_id": "r1",
        "attempt": 1,
        "tokens": 4096,
        "period": "2026-11",
        "period_used": 1000,
        "period_reserved": 4096,
        "balance": 4904,
    },
    "agentbus.budget.reservation_settled.v1": {
        "reservation_id": "r1:1",
        "run_id": "r1",
        "attempt": 1,
        "tokens": 4096,
        "used": 1200,
        "released": 2896,
        "overrun": 0,
        "period": "2026-11",
        "period_used": 2200,
        "period_reserved": 0,
        "balance": 7800,
    },
    "agentbus.budget.reservation_released.v1": {
        "reservation_id": "r1:2",
        "run_id": "r1",
        "attempt": 2,
        "tokens": 4096,
        "reason": "cancelled",
        "period": "2026-11",
        "period_used": 2200,
        "period_reserved": 0,
        "balance": 7800,
    },
    "agentbus.budget.alerted.v1": {
        "period": "2026-11",
        "used": 8000,
        "limit_tokens": 10_000,
        "alert_at": 0.8,
    },
    "agentbus.budget.exhausted.v1": {"period": "2026-11", "used": 10_000, "limit_tokens": 10_000},
    "agentbus.approval.requested.v1": {
        "run_id": "r1",
        "attempt": 1,
        "session_id": "s1",
        "tool": "shell",
        "arguments_digest": "a" * 64,
        "arguments_preview": '{"command":"ls"}',
        "reason": "list the files",
        "expires_at": "2026-01-01T01:00:00Z",
        "requested_by": "agent:helper",
    },
    "agentbus.approval.granted.v1": {
        "by": "user:ada",
        "reason": "fine",
        "jti": "Zx3c9Qk1",
        "rule": None,
    },
    "agentbus.approval.denied.v1": {
        "by": "rule:no-rm-rf",
        "reason": "destructive",
        "jti": None,
        "rule": "no-rm-rf",
    },
    "agentbus.approval.expired.v1": {"expires_at": "2026-01-01T01:00:00Z"},
    "agentbus.approval_rules.set.v1": {
        "rules": [
            {
                "name": "no-rm-rf",
                "tool": "shell",
                "arguments": [{"key": "command", "pattern": "\\brm\\s+-[a-z]*r"}],
                "effect": "deny",
                "reason": "destructive",
            },
            {"name": "reads", "tool": "fs_read*", "arguments": [], "effect": "allow"},
        ],
        "by": "user:ada",
    },
}


_ABSENT: Any = object()  # as a change: leave the attribute out


def example_event(model: type[DomainEvent], **changes: Any) -> dict[str, Any]:
    """A complete wire-form CloudEvent of `model`'s type, with `changes` applied on top."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "01937b2e-8f6a-7c3d-9e2f-0a1b2c3d4e5f",
        "source": "agentbus",
        "type": model.kind.type,
        "subject": f"{model.kind.aggregate}/s1",
        "time": "2025-01-02T03:04:05.678Z",
        "datacontenttype": "application/json",
        "data": EXAMPLE_DATA[model.kind.type],
        "workspace": "acme",
        "correlationid": "c1",
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not _ABSENT}


# Each makes a valid event invalid; the models must refuse it too (see `test_models_agree`).
MALFORMED: dict[str, dict[str, Any]] = {
    "extra data field": {"data": "EXTRA"},
    "unknown envelope attribute": {"colour": "red"},
    "no source": {"source": _ABSENT},
    "no data": {"data": _ABSENT},
    "empty id": {"id": ""},
    "workspace too long": {"workspace": "w" * 65},
    "wrong specversion": {"specversion": "0.3"},
    "no specversion": {"specversion": _ABSENT},
    "data not an object": {"data": ["hello"]},
}


def malformed_event(model: type[DomainEvent], case: str) -> dict[str, Any]:
    changes = dict(MALFORMED[case])
    if changes.get("data") == "EXTRA":
        changes["data"] = {**EXAMPLE_DATA[model.kind.type], "surprise": 1}
    return example_event(model, **changes)


# --- the committed files ---------------------------------------------------------------------


def test_committed_schemas_match_the_models() -> None:
    problems = check_schema_files(SCHEMAS_DIR, REGISTRY)
    assert not problems, (
        "schemas/ is out of date with the event models; run `agentbus schemas export` and "
        "commit the result:\n  " + "\n  ".join(problems)
    )


def test_one_schema_file_per_event_type_plus_asyncapi() -> None:
    files = render_schema_files(REGISTRY)
    assert sorted(files) == sorted([f"{m.kind.type}.json" for m in MODELS] + [ASYNCAPI_FILE])


def test_rendering_is_deterministic_sorted_and_newline_terminated() -> None:
    first, second = render_schema_files(REGISTRY), render_schema_files(REGISTRY)
    assert first == second
    for name, content in first.items():
        assert content.endswith(b"}\n"), name
        document = json.loads(content)
        expected = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert content.decode() == expected, name


# --- each event schema -----------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_event_schema_describes_the_whole_cloudevent(model: type[DomainEvent]) -> None:
    schema = event_schema(model)

    assert schema["$schema"] == SCHEMA_DIALECT == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://agentbus.dev/schemas/{model.kind.type}.json"
    assert schema["title"] == model.kind.type
    assert schema["description"]
    properties = schema["properties"]
    assert properties["type"]["const"] == model.kind.type
    assert properties["specversion"]["const"] == "1.0"
    assert {"specversion", "id", "source", "type", "subject", "time", "data", "workspace"} <= set(
        schema["required"]
    )
    assert set(properties) == set(CloudEvent.model_fields)
    assert schema["additionalProperties"] is False
    data_schema = model.model_json_schema()
    data_schema.pop("$defs", None)
    assert properties["data"] == data_schema


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_every_ref_resolves_inside_the_document(model: type[DomainEvent]) -> None:
    schema = event_schema(model)
    for ref in collect_refs(schema):
        resolve(schema, ref)


def test_every_type_has_an_example() -> None:
    missing = {m.kind.type for m in MODELS} - set(EXAMPLE_DATA)
    assert not missing, f"add an example to EXAMPLE_DATA in {__file__} for: {sorted(missing)}"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_an_example_event_validates(model: type[DomainEvent]) -> None:
    assert validate(example_event(model), event_schema(model)) == []


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_what_the_store_writes_validates(model: type[DomainEvent]) -> None:
    event = model.model_validate(EXAMPLE_DATA[model.kind.type])
    context = EventContext(actor="ada", correlationid="c1", causationid="x1")
    wire = encode_event(AggregateRef("acme", model.kind.aggregate, "s1"), event, uuid7(), context)
    assert validate(json.loads(wire), event_schema(model)) == []


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_a_malformed_event_does_not_validate(model: type[DomainEvent], case: str) -> None:
    assert validate(malformed_event(model, case), event_schema(model)) != []


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_an_event_of_another_type_does_not_validate(model: type[DomainEvent]) -> None:
    other = next(m for m in MODELS if m is not model)
    event = example_event(other)
    assert validate(event, event_schema(model)) != []


# CloudEvents requires `specversion` on the wire, so the schema does; the model only defaults it.
@pytest.mark.parametrize("case", sorted(set(MALFORMED) - {"no specversion"}))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.kind.type)
def test_models_agree(model: type[DomainEvent], case: str) -> None:
    """The models refuse what the schema refuses, and read what it accepts."""

    def read(raw: dict[str, Any]) -> DomainEvent:
        return REGISTRY.decode(raw["type"], CloudEvent.model_validate(raw).data)

    read(example_event(model))
    with pytest.raises((ValidationError, ValueError)):
        read(malformed_event(model, case))


# --- nested models, and versions -------------------------------------------------------------


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    size: int = Field(ge=0)


class FilesShared(DomainEvent):
    """Files were shared (a test model with nested models)."""

    kind: ClassVar[EventKind] = EventKind("testing", "files_shared", 1)

    files: list[Attachment]
    cover: Attachment | None = None


def test_nested_models_land_in_top_level_defs() -> None:
    schema = event_schema(FilesShared)
    assert set(schema["$defs"]) == {"Attachment"}
    assert "$defs" not in schema["properties"]["data"]
    refs = collect_refs(schema)
    assert refs == {"#/$defs/Attachment"}
    for ref in refs:
        resolve(schema, ref)
    event = {
        **example_event(MODELS[0]),
        "type": FilesShared.kind.type,
        "data": {"files": [{"name": "a.txt", "size": 3}], "cover": None},
    }
    assert validate(event, schema) == []
    event["data"] = {"files": [{"name": "a.txt", "size": -1}]}
    assert validate(event, schema) != []


def test_nested_models_land_in_asyncapi_components() -> None:
    document = asyncapi_document(EventRegistry([*MODELS, FilesShared]))
    assert "Attachment" in document["components"]["schemas"]
    for ref in collect_refs(document):
        resolve(document, ref)


def test_two_different_nested_models_with_one_name_are_refused() -> None:
    class Attachment(BaseModel):  # not the module's `Attachment`
        url: str

    class Other(DomainEvent):
        kind: ClassVar[EventKind] = EventKind("testing", "other", 1)

        thing: Attachment

    with pytest.raises(ValueError, match="Attachment"):
        asyncapi_document(EventRegistry([FilesShared, Other]))


# --- the AsyncAPI document -------------------------------------------------------------------


def test_asyncapi_has_a_channel_per_event_type() -> None:
    document = asyncapi_document(REGISTRY)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "agentbus"
    assert document["info"]["version"] == agentbus.__version__
    addresses = {c["address"]: c for c in document["channels"].values()}
    for model in MODELS:
        kind = model.kind
        channel = addresses[f"evt.{{workspace}}.{kind.aggregate}.{{id}}.{kind.name}"]
        message = resolve(document, channel["messages"][kind.type]["$ref"])
        payload = resolve(document, message["payload"]["$ref"])
        assert payload["properties"]["type"]["const"] == kind.type
        assert validate(example_event(model), payload, document) == []


def test_asyncapi_has_the_live_channel() -> None:
    document = asyncapi_document(REGISTRY)
    (live,) = (c for c in document["channels"].values() if c["address"].startswith("live."))
    assert live["address"] == "live.{workspace}.run.{id}.{kind}"
    assert "non-durable" in live["description"].lower()
    (message_ref,) = live["messages"].values()
    payload = resolve(document, resolve(document, message_ref["$ref"])["payload"]["$ref"])
    assert payload["type"] == "object"


def test_asyncapi_parameters_match_the_addresses() -> None:
    document = asyncapi_document(REGISTRY)
    for channel_id, channel in document["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert set(channel["parameters"]) == placeholders, channel_id
        for ref in channel["parameters"].values():
            parameter = resolve(document, ref["$ref"])
            assert parameter["description"]
            assert TOKEN_PATTERN in parameter["description"]
            assert parameter["x-pattern"] == TOKEN_PATTERN == "^[A-Za-z0-9_-]{1,64}$"


def test_asyncapi_operations_receive_from_their_channels() -> None:
    document = asyncapi_document(REGISTRY)
    assert len(document["operations"]) == len(document["channels"]) == len(MODELS) + 1
    for operation in document["operations"].values():
        assert operation["action"] == "receive"
        channel_ref = operation["channel"]["$ref"]
        resolve(document, channel_ref)
        for message in operation["messages"]:
            # AsyncAPI 3: an operation's messages are a subset of its channel's messages.
            assert message["$ref"].startswith(f"{channel_ref}/messages/")
            resolve(document, message["$ref"])


def test_asyncapi_server_is_the_embedded_nats() -> None:
    (server,) = asyncapi_document(REGISTRY)["servers"].values()
    assert server["protocol"] == "nats"
    assert server["host"] == "127.0.0.1:4222"
    assert "embedded" in server["description"]


def test_asyncapi_refs_resolve_and_component_schemas_do_not_rebase_them() -> None:
    document = asyncapi_document(REGISTRY)
    for ref in collect_refs(document):
        resolve(document, ref)
    # An `$id` inside a component schema would make its `#/...` refs point into itself.
    for schema in document["components"]["schemas"].values():
        assert "$id" not in schema
        assert "$schema" not in schema
    for key in ("channels", "operations"):
        for name in document[key]:
            assert re.fullmatch(r"[\w.\-]+", name), name


# --- writing and checking a schemas/ directory -----------------------------------------------


@pytest.fixture
def schemas_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, directory)
    return directory


def test_check_detects_a_modified_file(schemas_copy: Path) -> None:
    target = schemas_copy / "agentbus.session.opened.v1.json"
    target.write_text(target.read_text().replace('"web"', '"carrier-pigeon"'))
    problems = check_schema_files(schemas_copy, REGISTRY)
    assert len(problems) == 1
    assert problems[0].startswith("agentbus.session.opened.v1.json: differs")
    assert "agentbus schemas export" in problems[0]


def test_check_detects_a_missing_file(schemas_copy: Path) -> None:
    (schemas_copy / ASYNCAPI_FILE).unlink()
    problems = check_schema_files(schemas_copy, REGISTRY)
    assert problems == ["asyncapi.json: missing; run `agentbus schemas export`"]


def test_check_of_a_missing_directory_lists_every_file(tmp_path: Path) -> None:
    problems = check_schema_files(tmp_path / "nowhere", REGISTRY)
    assert len(problems) == len(render_schema_files(REGISTRY))


def test_write_creates_then_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    directory = tmp_path / "schemas"
    first = write_schema_files(directory, REGISTRY)
    assert sorted(first.written) == sorted(render_schema_files(REGISTRY))
    assert first.unchanged == first.retained == first.orphaned == []
    assert check_schema_files(directory, REGISTRY) == []

    second = write_schema_files(directory, REGISTRY)
    assert second.written == []
    assert sorted(second.unchanged) == sorted(first.written)
    assert not list(directory.glob(".*.tmp"))


def test_write_repairs_a_modified_file(schemas_copy: Path) -> None:
    (schemas_copy / "agentbus.session.closed.v1.json").write_text("{}\n")
    export = write_schema_files(schemas_copy, REGISTRY)
    assert export.written == ["agentbus.session.closed.v1.json"]
    assert check_schema_files(schemas_copy, REGISTRY) == []


class SessionOpenedV2(DomainEvent):
    """Version 2 of session opened: `agent` became required."""

    kind: ClassVar[EventKind] = EventKind("session", "opened", 2)

    channel: str
    agent: str


def test_older_versions_of_a_registered_type_are_retained(schemas_copy: Path) -> None:
    registry = EventRegistry(
        [m for m in MODELS if m.kind.type != "agentbus.session.opened.v1"] + [SessionOpenedV2],
        [
            Upcaster(
                "session", "opened", 1, lambda data: {**data, "agent": data.get("agent") or "?"}
            )
        ],
    )
    v1 = schemas_copy / "agentbus.session.opened.v1.json"
    v1_bytes = v1.read_bytes()

    export = write_schema_files(schemas_copy, registry)

    assert "agentbus.session.opened.v2.json" in export.written
    assert export.retained == ["agentbus.session.opened.v1.json"]
    assert export.orphaned == []
    assert v1.read_bytes() == v1_bytes
    assert check_schema_files(schemas_copy, registry) == []


def test_files_of_unregistered_types_are_kept_and_reported(schemas_copy: Path) -> None:
    orphans = ["agentbus.gone.thing.v1.json", "agentbus.session.opened.v7.json"]
    for name in orphans:
        (schemas_copy / name).write_text("{}\n")
    (schemas_copy / "README.txt").write_text("not ours\n")

    export = write_schema_files(schemas_copy, REGISTRY)

    assert export.orphaned == sorted(orphans)
    assert all((schemas_copy / name).exists() for name in orphans)
    problems = check_schema_files(schemas_copy, REGISTRY)
    assert [p.split(":")[0] for p in problems] == sorted(orphans)
    assert all("unexpected" in p for p in problems)


# --- the reference validator, when installed --------------------------------------------------


def test_schemas_are_valid_draft_2020_12_per_jsonschema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for model in MODELS:
        schema = event_schema(model)
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        assert not list(validator.iter_errors(example_event(model)))
        for case in MALFORMED:
            assert list(validator.iter_errors(malformed_event(model, case))), case
        event = model.model_validate(EXAMPLE_DATA[model.kind.type])
        ref = AggregateRef("acme", model.kind.aggregate, "s1")
        wire = encode_event(ref, event, uuid7(), EventContext.DEFAULT)
        assert not list(validator.iter_errors(json.loads(wire)))


# --- a strict validator for the subset of JSON Schema 2020-12 pydantic emits -----------------

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "default", "examples", "format"}
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(instance: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(instance, int) and not isinstance(instance, bool)
    if name == "number":
        return isinstance(instance, int | float) and not isinstance(instance, bool)
    return isinstance(instance, _TYPES[name])


def validate(instance: Any, schema: Any, root: Any = None, at: str = "") -> list[str]:
    """Errors of `instance` against `schema` (`[]`: valid). Fails on a keyword it does not know.

    `format` is an annotation, as 2020-12 specifies by default.
    """
    root = schema if root is None else root
    if schema is True:
        return []
    if schema is False:
        return [f"{at or '/'}: nothing is allowed here"]
    errors: list[str] = []
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            errors += validate(instance, resolve(root, value), root, at)
        elif key == "type":
            names = value if isinstance(value, list) else [value]
            if not any(_is_type(instance, n) for n in names):
                errors.append(f"{at}: not of type {value}")
        elif key == "const":
            if instance != value or type(instance) is not type(value):
                errors.append(f"{at}: not {value!r}")
        elif key == "enum":
            if instance not in value:
                errors.append(f"{at}: not one of {value}")
        elif key == "anyOf":
            if all(validate(instance, option, root, at) for option in value):
                errors.append(f"{at}: matches none of anyOf")
        elif key in ("minLength", "maxLength"):
            if isinstance(instance, str):
                ok = len(instance) >= value if key == "minLength" else len(instance) <= value
                if not ok:
                    errors.append(f"{at}: {key} {value}")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if _is_type(instance, "number"):
                ok = {
                    "minimum": instance >= value,
                    "maximum": instance <= value,
                    "exclusiveMinimum": instance > value,
                    "exclusiveMaximum": instance < value,
                }[key]
                if not ok:
                    errors.append(f"{at}: {key} {value}")
        elif key == "pattern":
            if isinstance(instance, str) and not re.search(value, instance):
                errors.append(f"{at}: does not match {value}")
        elif key == "required":
            if isinstance(instance, dict):
                errors += [f"{at}/{name}: required" for name in value if name not in instance]
        elif key == "properties":
            if isinstance(instance, dict):
                for name, sub in value.items():
                    if name in instance:
                        errors += validate(instance[name], sub, root, f"{at}/{name}")
        elif key == "additionalProperties":
            if isinstance(instance, dict):
                known = set(schema.get("properties", {}))
                for name in set(instance) - known:
                    errors += validate(instance[name], value, root, f"{at}/{name}")
        elif key == "items":
            if isinstance(instance, list):
                for i, item in enumerate(instance):
                    errors += validate(item, value, root, f"{at}/{i}")
        elif key in ("minItems", "maxItems"):
            if isinstance(instance, list):
                ok = len(instance) >= value if key == "minItems" else len(instance) <= value
                if not ok:
                    errors.append(f"{at}: {key} {value}")
        else:
            raise AssertionError(f"test validator does not know keyword {key!r}; extend it")
    return errors


def collect_refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        refs = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            refs |= collect_refs(value)
        return refs
    if isinstance(node, list):
        return set().union(*(collect_refs(v) for v in node)) if node else set()
    return set()


def resolve(document: Any, ref: str) -> Any:
    """Follow a local JSON Pointer reference (`#/a/b`); anything else is a failure."""
    assert ref.startswith("#/"), f"{ref!r} is not a reference inside the document"
    node = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref!r} does not resolve"
        assert token in node, f"{ref!r} does not resolve"
        node = node[token]
    return node
