"""Streams as data: `streams/*.toml` load, plan and apply idempotently, and destructive changes
are refused without force.

The session's nats-server is shared, so tests that apply specs there use their own stream names
and subjects; the real EVENTS and LIVE definitions are applied into a server of their own.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from rich.console import Console

from agentbus.errors import StoreUnavailable, StreamConfigError
from agentbus.runtime.embedded import EmbeddedNats, nats_server_binary
from agentbus.store.streams import (
    DestructiveStreamChange,
    FieldChange,
    StreamPlan,
    StreamSpec,
    apply_streams,
    check_plans,
    format_duration,
    is_destructive,
    load_stream_specs,
    parse_duration,
    plan_stream,
    plan_streams,
    render_plans,
    subject_covers,
    subjects_overlap,
)

# --- helpers -----------------------------------------------------------------------------------


def unique_spec(**fields: Any) -> StreamSpec:
    """A spec with a stream name and subjects of its own (the server is shared)."""
    token = secrets.token_hex(4)
    values: dict[str, Any] = {"name": f"T_{token}", "subjects": [f"t{token}.>"]}
    values.update(fields)
    return StreamSpec.model_validate(values)


def changed(spec: StreamSpec, **fields: Any) -> StreamSpec:
    """`spec` with some fields changed, validated like a file would be."""
    return StreamSpec.model_validate({**spec.model_dump(), **fields})


async def raw_info(nc: NATS, name: str) -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def stream_exists(nc: NATS, name: str) -> bool:
    return "error" not in await raw_info(nc, name)


def rendered(plans: list[StreamPlan]) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(render_plans(plans))
    return console.export_text()


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


# --- the files in streams/ ---------------------------------------------------------------------


def test_the_real_stream_files_define_events_and_live(repo_root: Path) -> None:
    events, live = load_stream_specs(repo_root / "streams")

    assert (events.name, events.subjects) == ("EVENTS", ["evt.>"])
    assert events.storage == "file"
    assert events.max_age == timedelta(0)
    assert events.allow_atomic
    assert events.allow_direct
    assert events.deny_delete
    assert events.deny_purge
    assert events.duplicate_window == timedelta(minutes=2)

    assert (live.name, live.subjects) == ("LIVE", ["live.>"])
    assert live.max_age == timedelta(hours=1)
    assert live.discard == "old"
    assert not live.deny_delete


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test's own: the real EVENTS/LIVE must not meet other tests."""
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_nc(own_nats: EmbeddedNats) -> AsyncIterator[NATS]:
    client = await nats.connect(own_nats.url, connect_timeout=2)
    yield client
    await client.close()


@pytest.mark.slow
async def test_the_real_streams_apply_and_a_second_apply_changes_nothing(
    own_nc: NATS, repo_root: Path
) -> None:
    specs = load_stream_specs(repo_root / "streams")

    preview = await apply_streams(own_nc, specs, dry_run=True)
    assert [(p.name, p.action) for p in preview] == [("EVENTS", "create"), ("LIVE", "create")]
    assert not await stream_exists(own_nc, "EVENTS")

    await apply_streams(own_nc, specs)
    again = await apply_streams(own_nc, specs)

    assert [(p.name, p.action, p.changes) for p in again] == [
        ("EVENTS", "unchanged", ()),
        ("LIVE", "unchanged", ()),
    ]
    events = (await raw_info(own_nc, "EVENTS"))["config"]
    assert events["allow_atomic"] is True
    assert events["deny_delete"] is True
    assert events["deny_purge"] is True
    assert events["max_age"] == 0
    live = (await raw_info(own_nc, "LIVE"))["config"]
    assert live["max_age"] == 3600 * 10**9
    assert live["storage"] == "file"


@pytest.mark.slow
async def test_the_applied_events_stream_takes_an_atomic_batch(
    own_nc: NATS, repo_root: Path
) -> None:
    await apply_streams(own_nc, load_stream_specs(repo_root / "streams"))
    batch = secrets.token_hex(8)
    subject = "evt.acme.run.r1.started"

    await own_nc.publish(
        subject, b"{}", headers={"Nats-Batch-Id": batch, "Nats-Batch-Sequence": "1"}
    )
    reply = await own_nc.request(
        subject,
        b"{}",
        timeout=5,
        headers={"Nats-Batch-Id": batch, "Nats-Batch-Sequence": "2", "Nats-Batch-Commit": "1"},
    )

    ack = json.loads(reply.data)
    assert (ack["stream"], ack["batch"], ack["count"]) == ("EVENTS", batch, 2)


# --- loading: bad input is named by file and field ---------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "BROKEN.toml", 'subjects = ["a.>"\n')

    with pytest.raises(StreamConfigError, match="invalid TOML") as caught:
        load_stream_specs(tmp_path)
    assert str(path) in str(caught.value)


def test_an_unknown_field_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "ODD.toml", 'subjects = ["odd.>"]\nmax_agee = "1h"\n')

    with pytest.raises(StreamConfigError, match="field 'max_agee': unknown field") as caught:
        load_stream_specs(tmp_path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('max_age = "1 hour"', "max_age"),
        ("max_age = 3600", "max_age"),
        ('max_age = "50ms"', "max_age"),
        ('duplicate_window = "0"', "duplicate_window"),
        ("max_msgs = 0", "max_msgs"),
        ('max_bytes = "8MB"', "max_bytes"),
        ("replicas = 7", "replicas"),
        ('storage = "disk"', "storage"),
        ("deny_delete = 1", "deny_delete"),
        ('subjects = ["a.>.b"]', "subjects"),
        ('subjects = ["a.>", "a.b"]', "subjects"),
        ("subjects = []", "subjects"),
    ],
)
def test_an_invalid_value_names_file_and_field(tmp_path: Path, line: str, field: str) -> None:
    text = line if line.startswith("subjects") else f'subjects = ["bad.>"]\n{line}'
    path = write(tmp_path, "BAD.toml", text + "\n")

    with pytest.raises(StreamConfigError, match=f"field '{field}'") as caught:
        load_stream_specs(tmp_path)
    assert str(path) in str(caught.value)


def test_a_duplicate_window_longer_than_max_age_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "W.toml", 'subjects = ["w.>"]\nmax_age = "1m"\nduplicate_window = "2m"\n')

    with pytest.raises(StreamConfigError, match="cannot be longer than max_age"):
        load_stream_specs(tmp_path)


def test_the_stream_name_must_match_the_file_name(tmp_path: Path) -> None:
    write(tmp_path, "EVENTS.toml", 'name = "LIVE"\nsubjects = ["evt.>"]\n')

    with pytest.raises(StreamConfigError, match=r"field 'name'.*EVENTS\.toml"):
        load_stream_specs(tmp_path)


def test_subjects_overlapping_across_files_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "A.toml", 'subjects = ["evt.>"]\n')
    write(tmp_path, "B.toml", 'subjects = ["evt.acme.*"]\n')

    with pytest.raises(StreamConfigError, match=r"B.toml: field 'subjects'.*overlaps.*A.toml"):
        load_stream_specs(tmp_path)


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StreamConfigError, match="no stream definitions"):
        load_stream_specs(tmp_path)


def test_omitted_fields_take_the_server_defaults(tmp_path: Path) -> None:
    write(tmp_path, "MIN.toml", 'subjects = ["min.>"]\n')

    (spec,) = load_stream_specs(tmp_path)

    assert spec.name == "MIN"
    assert spec.to_jetstream() | {"subjects": None} == {
        "name": "MIN",
        "subjects": None,
        "storage": "file",
        "retention": "limits",
        "num_replicas": 1,
        "max_age": 0,
        "duplicate_window": 120 * 10**9,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_msg_size": -1,
        "max_msgs_per_subject": -1,
        "discard": "old",
        "allow_direct": False,
        "allow_atomic": False,
        "allow_msg_ttl": False,
        "deny_delete": False,
        "deny_purge": False,
    }


# --- friendly values and subjects: pure --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", timedelta(0)),
        ("250ms", timedelta(milliseconds=250)),
        ("2m", timedelta(minutes=2)),
        ("1h30m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
    ],
)
def test_durations_read_and_print_the_same(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value
    assert format_duration(value) == text


def test_sizes_accept_binary_units() -> None:
    spec = unique_spec(max_bytes="1GiB", max_msg_size="8MiB")
    assert (spec.max_bytes, spec.max_msg_size) == (1 << 30, 8 << 20)


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("evt.>", "evt.acme.run.x.started", True),
        ("evt.*.run", "evt.acme.*", True),
        ("evt.>", "live.>", False),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b.c", False),
        ("a.>", "a", False),
    ],
)
def test_subject_overlap(first: str, second: str, overlap: bool) -> None:
    assert subjects_overlap(first, second) is overlap
    assert subjects_overlap(second, first) is overlap


def test_subject_cover() -> None:
    assert subject_covers("live.>", "live.*.run.*.*")
    assert not subject_covers("live.*.run.*.*", "live.>")
    assert subject_covers("a.*", "a.b")
    assert not subject_covers("a.b", "a.*")


# --- planning and destructiveness: pure --------------------------------------------------------

HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("field", "current", "desired", "destructive"),
    [
        ("storage", "file", "memory", True),
        ("retention", "limits", "interest", True),
        ("subjects", ["a.>", "b.>"], ["a.>"], True),
        ("subjects", ["a.>"], ["a.>", "b.>"], False),
        ("subjects", ["a.*.x"], ["a.>"], False),  # widened: nothing left out
        ("replicas", 3, 1, True),
        ("replicas", 1, 3, False),
        ("deny_delete", True, False, True),
        ("deny_purge", True, False, True),
        ("deny_purge", False, True, False),
        ("allow_msg_ttl", True, False, True),
        ("max_age", HOUR, 2 * HOUR, False),
        ("max_age", 2 * HOUR, HOUR, True),
        ("max_age", timedelta(0), HOUR, True),  # unlimited -> limited drops old messages
        ("max_age", HOUR, timedelta(0), False),
        ("max_msgs", -1, 1000, True),
        ("max_bytes", 1000, -1, False),
        ("max_msg_size", 1 << 20, 1024, False),  # applies to new messages only
        ("discard", "old", "new", False),
        ("allow_atomic", True, False, False),
        ("duplicate_window", HOUR, timedelta(minutes=2), False),
    ],
)
def test_what_counts_as_destructive(
    field: str, current: object, desired: object, destructive: bool
) -> None:
    assert is_destructive(field, current, desired) is destructive


def test_a_missing_stream_is_planned_for_creation_with_every_field() -> None:
    spec = unique_spec(max_age="1h")

    plan = plan_stream(spec, None)

    assert plan.action == "create"
    assert not plan.destructive
    fields = {change.field: change for change in plan.changes}
    assert fields["max_age"] == FieldChange("max_age", None, HOUR, destructive=False)
    assert set(fields) == set(StreamSpec.model_fields) - {"name"}


def test_the_servers_echo_of_a_spec_plans_as_unchanged() -> None:
    spec = unique_spec(subjects=["u1.>", "u2.>"], allow_atomic=False, description=None)
    echo = spec.to_jetstream()
    # What nats-server does to a config it stores: omits a false allow_atomic, adds its own
    # fields; a subject list in another order is the same set.
    del echo["allow_atomic"]
    echo |= {"compression": "none", "sealed": False, "metadata": {"_nats.ver": "2.15.1"}}
    echo["subjects"] = ["u2.>", "u1.>"]

    assert plan_stream(spec, echo) == StreamPlan(spec.name, "unchanged", ())


def test_only_the_changed_fields_are_planned() -> None:
    spec = unique_spec(max_age="1h")
    current = changed(spec, max_age="2h", deny_purge=True).to_jetstream()

    plan = plan_stream(spec, current)

    assert plan.action == "update"
    assert plan.changes == (
        FieldChange("max_age", 2 * HOUR, HOUR, destructive=True),
        FieldChange("deny_purge", True, False, destructive=True),
    )


def test_destructive_changes_are_refused_without_force_naming_each() -> None:
    spec = unique_spec(subjects=["k1.>"])
    current = changed(spec, subjects=["k1.>", "k2.>"], storage="memory").to_jetstream()
    plans = [plan_stream(spec, current)]

    with pytest.raises(DestructiveStreamChange) as caught:
        check_plans(plans, force=False)

    message = str(caught.value)
    assert f"{spec.name}.subjects: k1.>, k2.> -> k1.>" in message
    assert f"{spec.name}.storage: memory -> file (cannot change in place" in message
    assert caught.value.plans == tuple(plans)
    with pytest.raises(StreamConfigError, match="even with --force"):
        check_plans(plans, force=True)


def test_render_shows_actions_values_and_destructive_marks() -> None:
    spec = unique_spec(max_age="1h")
    current = changed(spec, max_age="2h", storage="memory").to_jetstream()
    plans = [
        plan_stream(spec, current),
        plan_stream(unique_spec(), None),
        plan_stream(spec, spec.to_jetstream()),
    ]

    text = rendered(plans)

    assert "update" in text
    assert "create" in text
    assert "unchanged" in text
    assert "destructive; cannot change in place" in text
    max_age_row = next(line for line in text.splitlines() if "max_age" in line)
    assert "2h" in max_age_row
    assert "1h" in max_age_row
    assert "destructive" in max_age_row
    assert "2 destructive change(s)" in text


# --- applying to a real server -----------------------------------------------------------------


async def test_create_then_reapply_is_unchanged(nc: NATS) -> None:
    spec = unique_spec(max_age="1h", allow_atomic=True, allow_direct=True, max_msg_size="1MiB")

    (created,) = await apply_streams(nc, [spec])
    (again,) = await apply_streams(nc, [spec])
    (planned,) = await plan_streams(nc, [spec])

    assert created.action == "create"
    assert again == planned == StreamPlan(spec.name, "unchanged", ())
    config = (await raw_info(nc, spec.name))["config"]
    assert config["allow_atomic"] is True
    assert config["max_age"] == 3600 * 10**9
    assert config["num_replicas"] == 1


async def test_a_longer_max_age_is_applied_without_force(nc: NATS) -> None:
    spec = unique_spec(max_age="1h")
    await apply_streams(nc, [spec])

    (plan,) = await apply_streams(nc, [changed(spec, max_age="2h")])

    assert plan.changes == (FieldChange("max_age", HOUR, 2 * HOUR, destructive=False),)
    assert (await raw_info(nc, spec.name))["config"]["max_age"] == 2 * 3600 * 10**9
    (after,) = await plan_streams(nc, [changed(spec, max_age="2h")])
    assert after.action == "unchanged"


async def test_a_shorter_max_age_needs_force(nc: NATS) -> None:
    spec = unique_spec(max_age="2h")
    await apply_streams(nc, [spec])
    shorter = changed(spec, max_age="1h")

    with pytest.raises(DestructiveStreamChange, match=r"max_age: 2h -> 1h"):
        await apply_streams(nc, [shorter])
    assert (await raw_info(nc, spec.name))["config"]["max_age"] == 2 * 3600 * 10**9

    await apply_streams(nc, [shorter], force=True)
    assert (await raw_info(nc, spec.name))["config"]["max_age"] == 3600 * 10**9


async def test_destructive_changes_are_refused_and_nothing_changes(nc: NATS) -> None:
    token = secrets.token_hex(4)
    spec = unique_spec(subjects=[f"d{token}.a.>", f"d{token}.b.>"])
    await apply_streams(nc, [spec])
    before = (await raw_info(nc, spec.name))["config"]
    # A new stream in the same apply must not be created either: refusal comes first.
    newcomer = unique_spec()
    worse = changed(spec, storage="memory", retention="interest", subjects=[f"d{token}.a.>"])

    with pytest.raises(DestructiveStreamChange) as caught:
        await apply_streams(nc, [newcomer, worse])

    message = str(caught.value)
    assert f"{spec.name}.storage: file -> memory" in message
    assert f"{spec.name}.retention: limits -> interest" in message
    assert f"{spec.name}.subjects: d{token}.a.>, d{token}.b.> -> d{token}.a.>" in message
    assert (await raw_info(nc, spec.name))["config"] == before
    assert not await stream_exists(nc, newcomer.name)


async def test_force_applies_what_the_server_can_change_in_place(nc: NATS) -> None:
    token = secrets.token_hex(4)
    spec = unique_spec(subjects=[f"f{token}.a.>", f"f{token}.b.>"])
    await apply_streams(nc, [spec])
    narrower = changed(spec, retention="interest", subjects=[f"f{token}.a.>"])

    (plan,) = await apply_streams(nc, [narrower], force=True)

    assert plan.destructive
    config = (await raw_info(nc, spec.name))["config"]
    assert (config["retention"], config["subjects"]) == ("interest", [f"f{token}.a.>"])


async def test_force_cannot_change_the_storage_type(nc: NATS) -> None:
    spec = unique_spec(deny_delete=True)
    await apply_streams(nc, [spec])
    before = (await raw_info(nc, spec.name))["config"]

    with pytest.raises(StreamConfigError, match="even with --force") as caught:
        await apply_streams(nc, [changed(spec, storage="memory", deny_delete=False)], force=True)

    assert "storage" in str(caught.value)
    assert "deny_delete" in str(caught.value)
    assert (await raw_info(nc, spec.name))["config"] == before


async def test_dry_run_changes_nothing(nc: NATS) -> None:
    spec = unique_spec(max_age="1h")
    (plan,) = await apply_streams(nc, [spec], dry_run=True)
    assert plan.action == "create"
    assert not await stream_exists(nc, spec.name)

    await apply_streams(nc, [spec])
    before = (await raw_info(nc, spec.name))["config"]
    (plan,) = await apply_streams(nc, [changed(spec, max_age="2h", storage="memory")], dry_run=True)

    assert plan.action == "update"
    assert plan.destructive  # shown, not raised: a dry run only previews
    assert (await raw_info(nc, spec.name))["config"] == before


async def test_an_update_keeps_settings_the_spec_does_not_manage(nc: NATS) -> None:
    spec = unique_spec(max_age="1h")
    body = spec.to_jetstream() | {"metadata": {"owner": "ops"}, "compression": "s2"}
    await nc.request(f"$JS.API.STREAM.CREATE.{spec.name}", json.dumps(body).encode(), timeout=5)

    await apply_streams(nc, [changed(spec, max_age="2h")])

    config = (await raw_info(nc, spec.name))["config"]
    assert config["max_age"] == 2 * 3600 * 10**9
    assert config["compression"] == "s2"
    assert config["metadata"]["owner"] == "ops"


async def test_a_server_refusal_carries_the_servers_reason(nc: NATS) -> None:
    spec = unique_spec(replicas=3)  # a single server cannot hold three replicas

    with pytest.raises(StreamConfigError, match=rf"create stream {spec.name}: replicas > 1"):
        await apply_streams(nc, [spec])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def nats_without_jetstream() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            if _listening(port):
                break
            time.sleep(0.02)
            if process.poll() is not None:
                pytest.fail("nats-server without JetStream did not start")
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow
async def test_without_jetstream_the_store_is_unavailable(nats_without_jetstream: str) -> None:
    client = await nats.connect(nats_without_jetstream, connect_timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match="JetStream"):
            await plan_streams(client, [unique_spec()], timeout=1)
    finally:
        await client.close()
