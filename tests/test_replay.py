"""Replay and export for auditors (docs/replay.md): every filter alone and combined, through
`agentbus replay` and `GET /v1/workspaces/{ws}/events`, against the real nats-server; resuming
from a cursor (or a file cut by Ctrl-C or a crash) gives no gap and no duplicate; bad filters
answer clearly; another workspace's events never appear.

The oracle for every filter is independent of the code under test: a plain read of the whole
workspace (`store.read` over `evt.<ws>.>`), filtered in Python."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner, Result

from agentbus.audit.replay import (
    InvalidReplayFilter,
    NotAnExport,
    ReplayFilter,
    ReplayRange,
    ResumePoint,
    replay_range,
    resume_point,
)
from agentbus.cli.main import app
from agentbus.events.catalog import default_registry
from agentbus.events.run import RunQueued, RunStarted
from agentbus.events.session import MessageReceived, SessionClosed, SessionOpened
from agentbus.events.subjects import AggregateRef
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.settings import Settings
from agentbus.store import EventStore, RecordedEvent
from tests.conftest import gateway_in_process

from .test_gateway import Api, problem

OPENED = "agentbus.session.opened.v1"
RECEIVED = "agentbus.session.message_received.v1"
CLOSED = "agentbus.session.closed.v1"
QUEUED = "agentbus.run.queued.v1"
STARTED = "agentbus.run.started.v1"


# ---------------------------------------------------------------------------- the history


@dataclass(frozen=True)
class Seeded:
    """A workspace's history in two phases, with a time between them."""

    workspace: str
    middle: datetime
    """After every event of the first phase, before every event of the second."""
    first_phase_end: int
    """The last position of the first phase."""


def message(n: int) -> MessageReceived:
    return MessageReceived(message_id=f"m{n}", author="ada", text=f"hello {n}")


async def seed(store: EventStore, workspace: str) -> Seeded:
    """Sessions s1 and s2, run r1 (phase one); more on s1 and r1, run r2 (phase two); and the
    same ids in a neighbouring workspace, which must never show."""
    s1, s2 = AggregateRef(workspace, "session", "s1"), AggregateRef(workspace, "session", "s2")
    r1, r2 = AggregateRef(workspace, "run", "r1"), AggregateRef(workspace, "run", "r2")
    queued = RunQueued(agent="echo", executor="echo", input="x")
    await store.append(s1, [SessionOpened(channel="api"), message(1), message(2)])
    await store.append(s2, [SessionOpened(channel="web"), message(3)])
    phase_one = await store.append(r1, [queued])
    neighbour = f"{workspace}x"
    await store.append(AggregateRef(neighbour, "session", "s1"), [SessionOpened(channel="api")])
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await store.append(r1, [RunStarted(attempt=1, worker="w")])
    await store.append(s1, [message(4), SessionClosed(reason="done")])
    await store.append(AggregateRef(neighbour, "run", "r1"), [queued])
    await store.append(r2, [queued, RunStarted(attempt=1, worker="w")])
    return Seeded(workspace, middle, phase_one.last_position)


async def everything(store: EventStore, workspace: str) -> list[RecordedEvent]:
    """The oracle: every event of the workspace, by a plain read."""
    return [e async for e in store.read(subjects=[f"evt.{workspace}.>"])]


def expected(
    history: Sequence[RecordedEvent], keep: Callable[[RecordedEvent], bool]
) -> list[tuple[int, str]]:
    return [(e.position, e.type) for e in history if keep(e)]


def filter_cases(seeded: Seeded) -> list[tuple[list[str], dict[str, str], Any]]:
    """(CLI options, API query, predicate) for each filter alone and in combination."""
    split = seeded.first_phase_end
    middle = seeded.middle.isoformat()

    def ref(e: RecordedEvent) -> AggregateRef:
        return e.ref

    return [
        ([], {}, lambda e: True),
        (["--aggregate", "run"], {"aggregate": "run"}, lambda e: ref(e).kind == "run"),
        (
            ["--aggregate", "session", "--id", "s1"],
            {"aggregate": "session", "id": "s1"},
            lambda e: ref(e).kind == "session" and ref(e).id == "s1",
        ),
        (["--type", RECEIVED], {"types": RECEIVED}, lambda e: e.type == RECEIVED),
        (
            ["--type", OPENED, "--type", STARTED],
            {"types": f"{OPENED},{STARTED}"},
            lambda e: e.type in (OPENED, STARTED),
        ),
        (["--to-position", str(split)], {"to_position": str(split)}, lambda e: e.position <= split),
        (
            ["--from-position", str(split)],
            {"from_position": str(split)},
            lambda e: e.position >= split,
        ),
        (["--since", middle], {"since": middle}, lambda e: e.position > split),
        (["--until", middle], {"until": middle}, lambda e: e.position <= split),
        (
            ["--aggregate", "session", "--id", "s1", "--type", RECEIVED, "--since", middle],
            {"aggregate": "session", "id": "s1", "types": RECEIVED, "since": middle},
            lambda e: ref(e).id == "s1" and e.type == RECEIVED and e.position > split,
        ),
        (
            ["--aggregate", "run", "--type", QUEUED, "--until", middle],
            {"aggregate": "run", "types": QUEUED, "until": middle},
            lambda e: e.type == QUEUED and e.position <= split,
        ),
        (
            ["--type", OPENED, "--type", CLOSED, "--from-position", str(split - 2)],
            {"types": f"{OPENED},{CLOSED}", "from_position": str(split - 2)},
            lambda e: e.type in (OPENED, CLOSED) and e.position >= split - 2,
        ),
    ]


# ---------------------------------------------------------------------------- pure core


def test_filters_become_the_narrowest_subject_filters() -> None:
    assert ReplayFilter(workspace="acme").subjects() == ["evt.acme.>"]
    assert ReplayFilter().subjects() == ["evt.*.>"]
    assert ReplayFilter(workspace="acme", aggregate="run").subjects() == ["evt.acme.run.>"]
    assert ReplayFilter(workspace="acme", aggregate="run", id="r1").subjects() == [
        "evt.acme.run.r1.*"
    ]
    by_type = ReplayFilter(workspace="acme", types=(OPENED, STARTED, OPENED))
    assert by_type.types == (OPENED, STARTED)
    assert by_type.subjects() == ["evt.acme.session.*.opened", "evt.acme.run.*.started"]
    one = ReplayFilter(workspace="acme", aggregate="session", id="s1", types=(RECEIVED,))
    assert one.subjects() == ["evt.acme.session.s1.message_received"]
    # two versions of one event share a subject: one filter, the version checked per event
    versions = ReplayFilter(types=(OPENED, "agentbus.session.opened.v2"))
    assert versions.subjects() == ["evt.*.session.*.opened"]
    assert versions.matches(OPENED)
    assert not versions.matches("agentbus.session.opened.v3")
    assert ReplayFilter().matches(CLOSED)


@pytest.mark.parametrize(
    ("arguments", "field", "words"),
    [
        ({"workspace": "a.b"}, "workspace", "may only contain"),
        ({"workspace": "*"}, "workspace", "may only contain"),
        ({"workspace": "x" * 65}, "workspace", "at most 64"),
        ({"aggregate": "Run"}, "aggregate", "snake_case"),
        ({"aggregate": "nosuch"}, "aggregate", "unknown kind"),
        ({"id": "r1"}, "id", "aggregate kind"),
        ({"aggregate": "run", "id": "r>"}, "id", "may only contain"),
        ({"types": ["run.started"]}, "types", "not an agentbus event type"),
        ({"types": ["agentbus.run.nosuch.v1"]}, "types", "no event model"),
        ({"types": ["agentbus.run.started.v9"]}, "types", "newer than this build"),
        ({"aggregate": "session", "types": [STARTED]}, "types", "is a run event"),
        ({"types": [f"agentbus.run.e{n}.v1" for n in range(65)]}, "types", "at most 64"),
        ({"from_position": 0}, "from_position", "start at 1"),
        ({"from_position": 5, "to_position": 4}, "to_position", "before"),
        (
            {"since": datetime(2025, 1, 2, tzinfo=UTC), "until": datetime(2025, 1, 1, tzinfo=UTC)},
            "until",
            "not after",
        ),
    ],
)
def test_invalid_filters_name_the_field(arguments: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidReplayFilter) as caught:
        ReplayFilter.create(registry=default_registry(), **arguments)
    assert caught.value.field == field
    assert words in caught.value.message


def test_naive_times_are_utc() -> None:
    naive = ReplayFilter(since=datetime(2025, 6, 1, 12), until=datetime(2025, 6, 1, 13))
    assert naive.since == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert naive.until == datetime(2025, 6, 1, 13, tzinfo=UTC)


def test_the_range_combines_cursor_positions_and_times() -> None:
    def span(
        after: int = 0, since_at: int | None = None, until_at: int | None = None, **kw: Any
    ) -> ReplayRange:
        return replay_range(
            ReplayFilter(**kw),
            after=after,
            stream_last=100,
            since_position=since_at,
            until_position=until_at,
        )

    assert span() == ReplayRange(1, 100, bounded=False)
    assert span(after=40) == ReplayRange(41, 100, bounded=False)
    assert span(after=40, from_position=60) == ReplayRange(60, 100, bounded=False)
    assert span(after=70, from_position=60, to_position=80) == ReplayRange(71, 80, bounded=True)
    assert span(to_position=500) == ReplayRange(1, 100, bounded=False)  # not reached yet
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    hour: dict[str, Any] = {"since": moment, "until": moment + timedelta(hours=1)}
    assert span(since_at=30, until_at=50, **hour) == ReplayRange(30, 49, bounded=True)
    assert span(after=35, since_at=30, until_at=50, **hour) == ReplayRange(36, 49, bounded=True)
    # nothing stored at or after `since` yet: empty; nor after `until`: up to the stream's end
    assert span(**hour).empty
    assert span(since_at=7, since=moment) == ReplayRange(7, 100, bounded=False)
    assert span(until_at=None, until=moment) == ReplayRange(1, 100, bounded=False)
    with pytest.raises(InvalidReplayFilter, match="after"):
        span(after=-1)


def test_resume_point_reads_the_last_whole_line_and_cuts_a_torn_one() -> None:
    one = b'{"id":"a","position":7}\n'
    two = b'{"id":"b","position":9}\n'
    assert resume_point(b"", 0) == ResumePoint(0, 0)
    assert resume_point(one + two, 0) == ResumePoint(9, len(one + two))
    torn = one + two + b'{"id":"c","posi'
    assert resume_point(torn, 0) == ResumePoint(9, len(one + two))
    assert resume_point(b'{"id":"c"', 0) == ResumePoint(0, 0)  # only a torn line
    # a tail that starts mid-file must hold a whole line, or a longer one is needed
    assert resume_point(b'"position":7}\n', 100) is None
    assert resume_point(b"7}\n" + two, 100) == ResumePoint(9, 100 + 3 + len(two))
    with pytest.raises(NotAnExport):
        resume_point(b'{"id":"a"}\n', 0)
    with pytest.raises(NotAnExport):
        resume_point(b"not json\n", 0)


# ---------------------------------------------------------------------------- the CLI


async def run_cli(url: str, *args: str) -> Result:
    """`agentbus replay ARGS` in-process (Typer's runner, on a thread: the command runs its own
    event loop), against the session's nats-server."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, ["replay", *args], env={"AGENTBUS_NATS_URL": url}
    )


def lines_of(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line]


def cursor_of(stderr: str) -> int:
    line = next(line for line in stderr.splitlines() if line.startswith("next: "))
    return int(line.rsplit("--after ", 1)[1])


async def test_cli_every_filter_alone_and_combined(
    store: EventStore, workspace: str, nats_server: EmbeddedNats
) -> None:
    seeded = await seed(store, workspace)
    history = await everything(store, workspace)
    assert len(history) == 11
    raw = {e.position: e.data async for e in store.read_raw(subjects=[f"evt.{workspace}.>"])}
    for options, _, keep in filter_cases(seeded):
        result = await run_cli(nats_server.url, "--workspace", workspace, *options)
        assert result.exit_code == 0, (options, result.stderr)
        exported = lines_of(result.stdout)
        want = expected(history, keep)
        assert want, options  # every case selects something
        assert [(e["position"], e["type"]) for e in exported] == want, options
        assert {e["workspace"] for e in exported} == {workspace}
        # each line is the stored JSON, byte for byte, plus `position`
        for line, (position, _) in zip(result.stdout.splitlines(), want, strict=True):
            assert line.encode() == raw[position][:-1] + b',"position":%d}' % position
        assert cursor_of(result.stderr) >= want[-1][0]


async def test_cli_limit_and_after_page_through_with_no_gap_or_duplicate(
    store: EventStore, workspace: str, nats_server: EmbeddedNats
) -> None:
    await seed(store, workspace)
    want = [e.position for e in await everything(store, workspace)]
    got: list[int] = []
    after = 0
    for _ in range(20):
        result = await run_cli(
            nats_server.url, "-w", workspace, "--limit", "3", "--after", str(after)
        )
        assert result.exit_code == 0, result.stderr
        page = [line["position"] for line in lines_of(result.stdout)]
        got += page
        after = cursor_of(result.stderr)
        assert f"--workspace {workspace} --limit 3 --after {after}" in result.stderr
        if not page:
            break
    assert got == want
    # filtered: the cursor moves past events the filter skipped, and continuing finds nothing
    last = await run_cli(nats_server.url, "-w", workspace, "--type", OPENED)
    assert [line["type"] for line in lines_of(last.stdout)] == [OPENED, OPENED]
    assert cursor_of(last.stderr) >= want[-1]


async def test_cli_output_file_append_and_resume(
    store: EventStore, workspace: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    seeded = await seed(store, workspace)
    want = [e.position for e in await everything(store, workspace)]
    out = tmp_path / "acme.jsonl"
    first = await run_cli(
        nats_server.url, "-w", workspace, "--until", seeded.middle.isoformat(), "-o", str(out)
    )
    assert first.exit_code == 0, first.stderr
    assert "complete: every matching event through position" in first.stderr
    assert first.stdout == ""
    again = await run_cli(nats_server.url, "-w", workspace, "-o", str(out))
    assert again.exit_code == 1
    assert "exists" in again.stderr
    assert "--append" in again.stderr
    cursor = cursor_of(first.stderr)
    rest = await run_cli(
        nats_server.url, "-w", workspace, "-o", str(out), "--append", "--after", str(cursor)
    )
    assert rest.exit_code == 0, rest.stderr
    assert [line["position"] for line in lines_of(out.read_text())] == want

    # --resume: the file's last line is the cursor; a torn last line (crash mid-write) goes
    resumed = tmp_path / "resumed.jsonl"
    with resumed.open("wb") as handle:
        head = out.read_bytes().splitlines(keepends=True)
        handle.write(b"".join(head[:4]) + head[4][:17])
    result = await run_cli(nats_server.url, "-w", workspace, "--resume", str(resumed))
    assert result.exit_code == 0, result.stderr
    assert resumed.read_bytes() == out.read_bytes()
    nothing = await run_cli(nats_server.url, "-w", workspace, "--resume", str(resumed))
    assert "0 events written" in nothing.stderr
    assert resumed.read_bytes() == out.read_bytes()
    fresh = tmp_path / "fresh.jsonl"
    created = await run_cli(nats_server.url, "-w", workspace, "--resume", str(fresh))
    assert fresh.read_bytes() == out.read_bytes(), created.stderr


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--id", "s1"], "--id: needs the aggregate kind"),
        (["--aggregate", "sessions"], "--aggregate: unknown kind 'sessions'"),
        (["--type", "opened"], "--type: 'opened' is not an agentbus event type"),
        (["--aggregate", "run", "--type", OPENED], "--type: agentbus.session.opened.v1 is a"),
        (["--workspace", "a.b"], "--workspace: 'a.b' may only contain"),
        (["--from-position", "0"], "--from-position: positions start at 1"),
        (["--from-position", "9", "--to-position", "3"], "--to-position: 3 is before"),
        (["--since", "yesterday"], "--since: 'yesterday' is not an ISO 8601 time"),
        (["--since", "2025-02-01", "--until", "2025-01-01"], "--until:"),
        (["--after", "-1"], "--after: a cursor is a position >= 0"),
        (["--limit", "0"], "--limit: must be at least 1"),
        (["--append"], "--append needs --output"),
        (["--resume", "x.jsonl", "--after", "3"], "--resume FILE continues FILE"),
    ],
)
def test_cli_bad_options_are_one_clear_line(options: list[str], words: str) -> None:
    result = CliRunner().invoke(app, ["replay", *options], env={"AGENTBUS_NATS_URL": "nats://x"})
    assert result.exit_code == 1
    assert words in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")


def test_cli_resume_refuses_a_file_that_is_not_an_export(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("dear diary\n")
    result = CliRunner().invoke(
        app, ["replay", "--resume", str(notes)], env={"AGENTBUS_NATS_URL": "nats://x"}
    )
    assert result.exit_code == 1
    assert "cannot resume" in result.stderr
    assert "not an agentbus replay export" in result.stderr
    assert notes.read_text() == "dear diary\n"


def test_cli_without_nats_is_a_clear_error() -> None:
    result = CliRunner().invoke(
        app,
        ["replay", "-w", "acme"],
        env={"AGENTBUS_NATS_URL": "nats://127.0.0.1:1", "AGENTBUS_CONNECT_TIMEOUT": "1"},
    )
    assert result.exit_code == 1
    assert "cannot connect to NATS" in result.stderr


def replay_process(url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    env["AGENTBUS_NATS_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "agentbus", "replay", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def big_history(store: EventStore, workspace: str, sessions: int) -> list[int]:
    positions: list[int] = []
    for n in range(sessions):
        ref = AggregateRef(workspace, "session", f"s{n}")
        result = await store.append(
            ref, [SessionOpened(channel="api")] + [message(i) for i in range(999)]
        )
        positions += result.positions
    return positions


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
async def test_an_interrupted_export_continues_with_no_gap_or_duplicate(
    store: EventStore, workspace: str, nats_server: EmbeddedNats, tmp_path: Path, sig: int
) -> None:
    """Ctrl-C prints the cursor (exit 130); a kill -9 leaves a file whose last whole line is
    one. Either way, continuing gives exactly the history."""
    want = await big_history(store, workspace, 40)
    out = tmp_path / "export.jsonl"
    process = replay_process(nats_server.url, "-w", workspace, "-o", str(out))
    deadline = time.monotonic() + 30
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        text = stderr.decode()
        assert "interrupted: " in text
        cursor = cursor_of(text)
        written = [line["position"] for line in lines_of(out.read_text())]
        assert written[-1] == cursor
        rest = await run_cli(
            nats_server.url, "-w", workspace, "-o", str(out), "--append", "--after", str(cursor)
        )
    else:
        assert process.returncode == -signal.SIGKILL
        rest = await run_cli(nats_server.url, "-w", workspace, "--resume", str(out))
    assert rest.exit_code == 0, rest.stderr
    positions = [line["position"] for line in lines_of(out.read_text())]
    continued = int(rest.stderr.split(" event")[0].replace(",", ""))
    assert 0 < continued < len(positions)  # the first run was cut mid-way, and wrote some
    assert positions == want


# ---------------------------------------------------------------------------- the API


@pytest.fixture
async def api(private_store: EventStore, database_url: str) -> AsyncIterator[Api]:
    """The gateway on a nats-server of its own, without workers: nothing reacts to the seeded
    events, so the history stays what the test wrote."""
    async with gateway_in_process(private_store, database_url, Settings()) as gateway:
        yield Api(gateway.client, gateway.system_key, private_store, gateway.platform.engine)


async def test_api_every_filter_alone_and_combined(api: Api) -> None:
    owner = await api.workspace("acme")
    auditor = await api.key("acme", owner, "auditor")
    seeded = await seed(api.store, "acme")
    history = await everything(api.store, "acme")
    for _, query, keep in filter_cases(seeded):
        want = expected(history, keep)
        got = await api.call("GET", "/v1/workspaces/acme/events", auditor, params=query)
        assert got.status_code == 200, (query, got.text)
        page = got.json()
        assert list(zip(page["positions"], [e["type"] for e in page["events"]], strict=True)) == (
            want
        ), query
        assert {e["workspace"] for e in page["events"]} <= {"acme"}
        assert page["next_after"] >= want[-1][0]
        lines = await api.call(
            "GET", "/v1/workspaces/acme/events", auditor, params={**query, "format": "jsonl"}
        )
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        assert [(e["position"], e["type"]) for e in lines_of(lines.text)] == want, query


async def test_api_jsonl_export_resumes_with_no_gap_or_duplicate(api: Api) -> None:
    owner = await api.workspace("acme")
    auditor = await api.key("acme", owner, "auditor")
    await seed(api.store, "acme")
    want = [e.position for e in await everything(api.store, "acme")]
    headers = {"Accept": "application/x-ndjson"}
    whole = await api.call("GET", "/v1/workspaces/acme/events", auditor, headers=headers)
    assert [line["position"] for line in lines_of(whole.text)] == want
    through = int(whole.headers["agentbus-through"])
    assert through >= want[-1]
    got: list[int] = []
    after = 0
    while True:
        part = await api.call(
            "GET",
            "/v1/workspaces/acme/events",
            auditor,
            params={"after": after, "limit": 4},
            headers=headers,
        )
        positions = [line["position"] for line in lines_of(part.text)]
        got += positions
        if len(positions) < 4:
            break
        after = positions[-1]
    assert got == want
    # and the JSON pages, by next_after
    paged: list[int] = []
    after = 0
    for _ in range(20):
        page = (
            await api.call(
                "GET", "/v1/workspaces/acme/events", auditor, params={"after": after, "limit": 3}
            )
        ).json()
        paged += page["positions"]
        if not page["positions"]:
            break
        after = page["next_after"]
    assert paged == want
    done = await api.call(
        "GET", "/v1/workspaces/acme/events", auditor, params={"after": through}, headers=headers
    )
    assert done.text == ""


async def test_api_bad_filters_are_problems_naming_the_parameter(api: Api) -> None:
    owner = await api.workspace("acme")
    auditor = await api.key("acme", owner, "auditor")
    cases = [
        ({"id": "s1"}, "query.id"),
        ({"aggregate": "nosuch"}, "query.aggregate"),
        ({"aggregate": "run", "id": "a.b"}, "query.id"),
        ({"types": "agentbus.run.nosuch.v1"}, "query.types"),
        ({"aggregate": "session", "types": STARTED}, "query.types"),
        ({"from_position": "9", "to_position": "3"}, "query.to_position"),
        ({"from_position": "0"}, "query.from_position"),
        ({"since": "2025-02-01T00:00:00Z", "until": "2025-01-01T00:00:00Z"}, "query.until"),
        ({"since": "yesterday"}, "query.since"),
        ({"limit": "5000"}, "query.limit"),
        ({"format": "xml"}, "query.format"),
    ]
    for query, location in cases:
        body = problem(
            await api.call("GET", "/v1/workspaces/acme/events", auditor, params=query), 422
        )
        assert [e["location"] for e in body["errors"]] == [location], query
    # a JSON Lines export may be longer than a page
    lines = await api.call(
        "GET", "/v1/workspaces/acme/events", auditor, params={"limit": 5000, "format": "jsonl"}
    )
    assert lines.status_code == 200


async def test_api_only_auditors_and_only_their_workspace(api: Api) -> None:
    acme = await api.workspace("acme")
    globex = await api.workspace("globex")
    viewer = await api.key("acme", acme, "viewer")
    auditor = await api.key("acme", acme, "auditor")
    await seed(api.store, "globex")
    problem(await api.call("GET", "/v1/workspaces/acme/events", viewer), 403)
    problem(await api.call("GET", "/v1/workspaces/globex/events?format=jsonl", auditor), 404)
    problem(await api.call("GET", "/v1/workspaces/acme/events"), 401)
    # globex's ids, asked for through acme's path: nothing of globex
    for query in ({}, {"aggregate": "session", "id": "s1"}, {"types": RECEIVED}):
        page = (await api.call("GET", "/v1/workspaces/acme/events", auditor, params=query)).json()
        assert all(e["workspace"] == "acme" for e in page["events"])
        assert not any(e["subject"] == "session/s1" for e in page["events"])
        lines = await api.call(
            "GET", "/v1/workspaces/acme/events", auditor, params={**query, "format": "jsonl"}
        )
        assert all(e["workspace"] == "acme" for e in lines_of(lines.text))
    mine = await api.call("GET", "/v1/workspaces/globex/events?format=jsonl", globex)
    assert {e["workspace"] for e in lines_of(mine.text)} == {"globex"}
