"""Published contracts, generated from the event models: one JSON Schema per event type and an
AsyncAPI document of the subjects. The files live in `schemas/` at the repository root.

Everything here is pure except `write_schema_files`. A test compares the committed files with
`render_schema_files(default_registry())` byte for byte, so the models stay the only source:
change a model, run `agentbus schemas export`, commit both.

File policy (`write_schema_files` / `check_schema_files`):

- `<type>.json` of every registered (current) type and `asyncapi.json` are generated.
- A file of an *older version* of a registered type (`agentbus.session.opened.v1.json` while
  v2 is current) is **retained** untouched: events of that version stay in the stream forever
  and are read through upcasters, so their schema remains the documentation of stored bytes.
  It can no longer be regenerated (the old model is gone), which is why it lives in git.
- A file whose type has *no registered model at all* (nor a newer version of it) is
  **orphaned**: it is left in place and reported, never deleted. Deleting it would erase the
  only description of events that may already sit in the audit stream; and a type vanishing
  from the registry means those events can no longer be decoded, which is a bug to fix (register
  the model again) or, for a type that was never published, a file to delete by hand. Either
  way a human decides, so `check_schema_files` reports orphans as drift.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentbus import __version__
from agentbus.errors import InvalidEvent
from agentbus.events.envelope import CloudEvent
from agentbus.events.registry import TYPE_PREFIX, DomainEvent, EventKind, EventRegistry
from agentbus.events.subjects import EVENTS_PREFIX, LIVE_PREFIX, MAX_TOKEN_LENGTH

Schema = dict[str, Any]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_BASE_URI = "https://agentbus.dev/schemas/"
ASYNCAPI_FILE = "asyncapi.json"
# The wire form of a structured-mode CloudEvent in JSON (CloudEvents JSON format, section 3).
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
# One subject token, as `agentbus.events.subjects.validate_token` accepts it.
TOKEN_PATTERN = f"^[A-Za-z0-9_-]{{1,{MAX_TOKEN_LENGTH}}}$"
EMBEDDED_NATS_HOST = "127.0.0.1:4222"

_LOCAL_REFS = "#/$defs/{model}"
_ASYNCAPI_REFS = "#/components/schemas/{model}"
_LIVE_CHANNEL = f"{LIVE_PREFIX}.run"
_LIVE_MESSAGE = f"{LIVE_PREFIX}.output"


def schema_file_name(kind: EventKind) -> str:
    """`agentbus.session.opened.v1.json`: where the schema of `kind` lives in `schemas/`."""
    return f"{kind.type}.json"


def event_schema(model: type[DomainEvent]) -> Schema:
    """JSON Schema (draft 2020-12) of a whole CloudEvent of `model`'s type.

    The envelope's attributes come from `CloudEvent`, with `type` fixed to the model's type
    string and `data` replaced by the model's own schema. Nested models of `data` land in the
    document's top-level `$defs`, so every `$ref` resolves inside the document.
    """
    schema, defs = _cloudevent_schema(model, _LOCAL_REFS)
    document: Schema = {
        "$schema": SCHEMA_DIALECT,
        "$id": f"{SCHEMA_BASE_URI}{schema_file_name(model.kind)}",
        **schema,
    }
    if defs:
        document["$defs"] = defs
    return document


def asyncapi_document(registry: EventRegistry) -> Schema:
    """AsyncAPI 3.0.0 description of agentbus's subjects, as seen by a subscribing service.

    One channel per registered event type (`evt.{workspace}.<aggregate>.{id}.<event>`) and one
    for the LIVE run output. Every operation is `receive`: services subscribe; events are only
    written through agentbus itself (validation, idempotency keys, concurrency expectations),
    so publishing to `evt.>` directly is not part of the contract.
    """
    channels: Schema = {}
    operations: Schema = {}
    messages: Schema = {}
    schemas: Schema = {}

    for model in registry.models:
        kind = model.kind
        channel_id = f"{EVENTS_PREFIX}.{kind.aggregate}.{kind.name}"
        payload, defs = _cloudevent_schema(model, _ASYNCAPI_REFS)
        _merge_defs(schemas, {kind.type: payload, **defs}, kind.type)
        messages[kind.type] = {
            "name": kind.type,
            "title": model.__name__,
            "summary": _summary(model),
            "payload": {"$ref": f"#/components/schemas/{kind.type}"},
            "correlationId": {"$ref": "#/components/correlationIds/correlationid"},
            "tags": [{"name": kind.aggregate}],
        }
        channels[channel_id] = {
            "address": f"{EVENTS_PREFIX}.{{workspace}}.{kind.aggregate}.{{id}}.{kind.name}",
            "title": f"{kind.aggregate} {kind.name}",
            "description": (
                f"Every `{kind.name}` event of a `{kind.aggregate}`, stored in stream EVENTS "
                f"(durable, the audit record). The current version is `{kind.type}`; events "
                "written under an older version keep their type on the wire and their schema "
                "in `schemas/`."
            ),
            "parameters": {
                "workspace": {"$ref": "#/components/parameters/workspace"},
                "id": {"$ref": "#/components/parameters/id"},
            },
            "messages": {kind.type: {"$ref": f"#/components/messages/{kind.type}"}},
        }
        operations[f"receive.{kind.aggregate}.{kind.name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Subscribe to `{kind.type}` events.",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{kind.type}"}],
        }

    schemas[_LIVE_MESSAGE] = {
        "type": "object",
        "title": "Run output",
        "description": "One piece of a running agent's output. The shape is not fixed yet.",
        "additionalProperties": True,
    }
    messages[_LIVE_MESSAGE] = {
        "name": _LIVE_MESSAGE,
        "title": "Run output",
        "summary": "A token delta or progress report of a running agent (non-durable).",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{_LIVE_MESSAGE}"},
    }
    channels[_LIVE_CHANNEL] = {
        "address": f"{LIVE_PREFIX}.{{workspace}}.run.{{id}}.{{kind}}",
        "title": "run output (LIVE)",
        "description": (
            "Non-durable run output: token deltas and progress of running agents, in stream "
            "LIVE with a short retention (about an hour). Joinable mid-run; not part of the "
            "audit record. Plain JSON, not CloudEvents."
        ),
        "parameters": {
            "workspace": {"$ref": "#/components/parameters/workspace"},
            "id": {"$ref": "#/components/parameters/id"},
            "kind": {"$ref": "#/components/parameters/kind"},
        },
        "messages": {_LIVE_MESSAGE: {"$ref": f"#/components/messages/{_LIVE_MESSAGE}"}},
    }
    operations[f"receive.{_LIVE_CHANNEL}"] = {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{_LIVE_CHANNEL}"},
        "summary": "Follow a run's output while it runs.",
        "messages": [{"$ref": f"#/channels/{_LIVE_CHANNEL}/messages/{_LIVE_MESSAGE}"}],
    }

    # AsyncAPI 3.0 parameters carry no schema, so the token rule is stated in words and, for
    # tools that want it, in the `x-pattern` extension.
    token_rule = f"One subject token: `{TOKEN_PATTERN}` (no dots, wildcards or whitespace)."
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "agentbus",
            "version": __version__,
            "description": (
                "Subjects of agentbus, an event-sourced message bus for AI-agent gateways, "
                "from the point of view of a service that subscribes to them. Durable events "
                "are CloudEvents 1.0 in structured JSON on `evt.<workspace>.<aggregate>.<id>."
                "<event>` (stream EVENTS); running agents' output is on `live.<workspace>.run."
                "<id>.<kind>` (stream LIVE). One JSON Schema per event type sits beside this "
                "file in `schemas/`."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": CLOUDEVENTS_CONTENT_TYPE,
        "servers": {
            "embedded": {
                "host": EMBEDDED_NATS_HOST,
                "protocol": "nats",
                "description": (
                    "The nats-server embedded by `agentbus up` at its default address "
                    "(loopback only). A cluster deployment has its own addresses."
                ),
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "parameters": {
                "workspace": {
                    "description": f"The workspace (tenant) the subject belongs to. {token_rule}",
                    "examples": ["acme"],
                    "x-pattern": TOKEN_PATTERN,
                },
                "id": {
                    "description": (
                        "Id of the aggregate instance (session id, run id, ...); the CloudEvents "
                        f"`subject` attribute is `<aggregate>/<id>`. {token_rule}"
                    ),
                    "examples": ["01J9ZQ4X8T6V3K2M1N0P9R8S7T"],
                    "x-pattern": TOKEN_PATTERN,
                },
                "kind": {
                    "description": (
                        "What a LIVE message carries, e.g. token deltas or progress (the set of "
                        f"kinds is not fixed yet). {token_rule}"
                    ),
                    "x-pattern": TOKEN_PATTERN,
                },
            },
            "correlationIds": {
                "correlationid": {
                    "description": "The CloudEvents `correlationid` extension: one conversation "
                    "or request across events.",
                    "location": "$message.payload#/correlationid",
                }
            },
        },
    }


def render_schema_files(registry: EventRegistry) -> dict[str, bytes]:
    """Every generated file of `schemas/`: name (relative to `schemas/`) -> exact bytes.

    JSON with sorted keys, 2-space indent and a trailing newline, so the bytes depend only on
    the models (and the pydantic version that renders them).
    """
    files = {schema_file_name(m.kind): _dump(event_schema(m)) for m in registry.models}
    files[ASYNCAPI_FILE] = _dump(asyncapi_document(registry))
    return files


@dataclass(frozen=True, slots=True)
class SchemaExport:
    """What `write_schema_files` did, file names relative to the directory.

    `retained`: older versions of registered types, kept as the record of stored events.
    `orphaned`: files of types no registered model reads; kept, reported, to be decided by a
    human (see the module docstring).
    """

    written: list[str]
    unchanged: list[str]
    retained: list[str]
    orphaned: list[str]


def write_schema_files(directory: Path, registry: EventRegistry) -> SchemaExport:
    """Bring `directory` in line with the models: write new or changed files, touch nothing else.

    Never deletes a file. Each file is replaced atomically, so a crash leaves old or new bytes,
    never half of either.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    unchanged: list[str] = []
    for name, content in sorted(render_schema_files(registry).items()):
        path = directory / name
        if path.is_file() and path.read_bytes() == content:
            unchanged.append(name)
            continue
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        written.append(name)
    retained, orphaned = _extra_files(directory, registry)
    return SchemaExport(
        written=written,
        unchanged=unchanged,
        retained=retained,
        orphaned=[name for name, _ in orphaned],
    )


def check_schema_files(directory: Path, registry: EventRegistry) -> list[str]:
    """How `directory` differs from what the models generate, one sentence per file.

    Empty when in sync. Retained older versions are not drift; orphaned files are.
    """
    problems: list[str] = []
    for name, content in sorted(render_schema_files(registry).items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing; run `agentbus schemas export`")
        elif path.read_bytes() != content:
            problems.append(
                f"{name}: differs from what the event models generate; "
                "run `agentbus schemas export`"
            )
    _, orphaned = _extra_files(directory, registry)
    problems.extend(f"{name}: unexpected; {why}" for name, why in orphaned)
    return problems


def _cloudevent_schema(model: type[DomainEvent], ref_template: str) -> tuple[Schema, Schema]:
    """The envelope schema of `model`'s type, and the definitions its `$ref`s point to."""
    kind = model.kind
    envelope = CloudEvent.model_json_schema(ref_template=ref_template)
    defs: Schema = envelope.pop("$defs", {})
    data = model.model_json_schema(ref_template=ref_template)
    _merge_defs(defs, data.pop("$defs", {}), kind.type)

    properties = envelope["properties"]
    properties["type"] = {
        "const": kind.type,
        "type": "string",
        "title": "Type",
        "description": properties["type"].get("description", "The event type."),
    }
    properties["data"] = data
    # CloudEvents requires `specversion` on the wire; the model merely defaults it.
    if "specversion" not in envelope["required"]:
        envelope["required"] = ["specversion", *envelope["required"]]
    envelope["title"] = kind.type
    envelope["description"] = (
        f"{_summary(model)}\n\n"
        f"A CloudEvents 1.0 event (structured JSON) of type `{kind.type}`, published on "
        f"`{EVENTS_PREFIX}.<workspace>.{kind.aggregate}.<id>.{kind.name}`. "
        f"`data` is the `{model.__name__}` payload."
    )
    return envelope, defs


def _summary(model: type[DomainEvent]) -> str:
    # `__doc__` and not `inspect.getdoc`: the latter would inherit `DomainEvent`'s docstring.
    doc = model.__dict__.get("__doc__")
    if doc:
        return inspect.cleandoc(doc)
    return f"The `{model.kind.name}` event of a `{model.kind.aggregate}`."


def _merge_defs(into: Schema, new: Schema, where: str) -> None:
    for name, schema in new.items():
        if name in into and into[name] != schema:
            raise ValueError(
                f"two different schemas named {name!r} (while adding {where}); "
                "rename one of the models"
            )
        into[name] = schema


def _dump(document: Schema) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _extra_files(
    directory: Path, registry: EventRegistry
) -> tuple[list[str], list[tuple[str, str]]]:
    """`agentbus.*.json` files that are not generated: retained, and orphaned with a reason."""
    if not directory.is_dir():
        return [], []
    current = {schema_file_name(m.kind) for m in registry.models}
    retained: list[str] = []
    orphaned: list[tuple[str, str]] = []
    for path in sorted(directory.glob(f"{TYPE_PREFIX}.*.json")):
        name = path.name
        if name in current:
            continue
        type_string = name.removesuffix(".json")
        try:
            kind = EventKind.parse(type_string)
            model = registry.model_for(type_string)
        except InvalidEvent:
            orphaned.append(
                (
                    name,
                    f"no registered event model reads {type_string!r}: if events of it were "
                    "ever published, register the model again (they are unreadable now); "
                    "otherwise delete the file",
                )
            )
            continue
        if kind.version < model.kind.version:
            retained.append(name)
        else:
            orphaned.append(
                (
                    name,
                    f"newer than the registered model {model.kind.type}; "
                    "delete it or register that version",
                )
            )
    return retained, orphaned
