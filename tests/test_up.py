"""`agentbus up` as a user runs it: a real process with embedded nats-server and Postgres."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from agentbus.audit.erasure import open_sealed_store
from agentbus.events import AggregateRef
from agentbus.events.catalog import default_registry
from agentbus.events.session import SessionOpened
from agentbus.projections.catalog import all_projections
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.settings import Settings
from agentbus.store import NO_EVENTS, EventStore

from .conftest import connect, eventually

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agentbus(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "agentbus", *args]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    env["AGENTBUS_LOG_FORMAT"] = "json"
    return env


def processes_using(data_dir: Path) -> list[psutil.Process]:
    """nats-server / postgres processes whose command line names `data_dir`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(str(data_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class Up:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.nats_port = free_port()
        self.env = {**clean_env(), **(env or {})}
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            agentbus(
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--nats-port",
                str(self.nats_port),
            ),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, stderr = self.process.communicate()
                raise AssertionError(f"agentbus up exited early:\n{stderr}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("agentbus up did not become ready within 60 s")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        assert self.process is not None
        self.process.send_signal(sig)
        _, stderr = self.process.communicate(timeout=30)
        return self.process.returncode, stderr


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    instance = Up(tmp_path / "data")
    yield instance
    if instance.process is not None and instance.process.poll() is None:
        instance.process.kill()
        instance.process.wait()


async def test_up_serves_keeps_events_across_restarts_and_leaves_no_process(up: Up) -> None:
    up.start()
    ready = httpx.get(f"{up.base}/readyz").json()
    assert ready["status"] == "ready"
    assert set(ready["checks"]) == {"nats", "stream:EVENTS", "stream:LIVE", "postgres"}
    assert httpx.get(f"{up.base}/healthz").json() == {"status": "ok"}
    assert processes_using(up.data_dir), "embedded servers should run under the data dir"

    client = await connect(f"nats://127.0.0.1:{up.nats_port}")
    ref = AggregateRef("smoke", "session", "s1")
    try:
        store = EventStore(client, default_registry())
        written = await store.append(ref, [SessionOpened(channel="web")], expect=NO_EVENTS)
    finally:
        await client.close()

    code, stderr = up.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "agentbus stopped" in stderr
    assert "system API key (shown once" in stderr
    key = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("ab_"))
    login = re.search(r"log in as admin with password (\w+) \(workspace demo; shown once\)", stderr)
    assert login is not None, stderr
    assert processes_using(up.data_dir) == []

    up.start()  # same data dir, same ports
    me = httpx.get(f"{up.base}/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status_code == 200
    assert me.json()["kind"] == "apikey"
    # The first start's web chat login works after a restart: the page, the cookie, the demo
    # workspace with the echo agent.
    assert "<title>agentbus chat</title>" in httpx.get(f"{up.base}/").text
    async with httpx.AsyncClient(base_url=up.base) as browser:
        logged_in = await browser.post(
            "/v1/auth/login", json={"user": "admin", "password": login[1]}
        )
        assert logged_in.status_code == 204
        demo = (await browser.get("/v1/workspaces/demo")).json()
        assert demo["your_role"] == "owner"
        assert demo["agents"] == ["echo"]
    client = await connect(f"nats://127.0.0.1:{up.nats_port}")
    try:
        history = await EventStore(client, default_registry()).load(ref)
    finally:
        await client.close()
    assert [e.id for e in history.events] == list(written.event_ids)

    code, stderr = up.stop(signal.SIGINT)  # Ctrl-C
    assert code == 0, stderr
    assert "system API key" not in stderr  # printed once, on the first start only
    assert processes_using(up.data_dir) == []


async def test_up_on_external_servers_starts_neither_and_leaves_both_running(
    tmp_path: Path, database_url: str
) -> None:
    # The URLs of a deployment's own NATS and Postgres: `up` applies the streams and the
    # migrations there and runs every role, with no embedded server of its own.
    nats_server = EmbeddedNats(tmp_path / "external-nats", port=0)
    nats_server.start()
    external = Up(
        tmp_path / "data",
        env={"AGENTBUS_NATS_URL": nats_server.url, "AGENTBUS_DATABASE_URL": database_url},
    )
    try:
        external.start()
        ready = httpx.get(f"{external.base}/readyz").json()
        assert ready["status"] == "ready", ready
        assert external.process is not None
        servers = [p for p in processes_using(external.data_dir) if p.pid != external.process.pid]
        assert servers == [], "no embedded server"
        client = await connect(nats_server.url)
        try:
            for stream in ("EVENTS", "LIVE"):
                assert (await client.jetstream().stream_info(stream)).config.name == stream
        finally:
            await client.close()

        # The migrated read models on the external database, every projection live.
        expected = {p.name for p in all_projections()}
        admin = await asyncpg.connect(database_url)
        try:

            async def all_live() -> bool:
                rows = await admin.fetch(
                    "SELECT projection FROM projection_generations WHERE status = 'live'"
                )
                return {row["projection"] for row in rows} == expected

            await eventually(all_live, "every projection live", timeout=30)
        finally:
            await admin.close()

        code, stderr = external.stop(signal.SIGINT)
        assert code == 0, stderr
        assert "agentbus stopped" in stderr
        key = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("ab_"))
        assert [path.name for path in external.data_dir.iterdir()] == ["agentbus.lock"]

        # Everything lives in the servers, not the data dir: another data dir on the same
        # servers (another replica, or a new machine) knows the first start's key and prints
        # none of its own.
        external = Up(tmp_path / "another-data", env=external.env)
        external.start()
        me = httpx.get(f"{external.base}/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert me.status_code == 200, me.text
        code, stderr = external.stop(signal.SIGTERM)
        assert code == 0, stderr
        assert "system API key" not in stderr
        assert nats_server.process is not None
        assert nats_server.process.poll() is None  # stopped by no one but this test
    finally:
        if external.process is not None and external.process.poll() is None:
            external.process.kill()
            external.process.wait()
        nats_server.stop()


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agentbus(*args),
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_busy_http_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("up", "--data-dir", str(tmp_path / "d"), "--port", str(port))
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"127.0.0.1:{port} is busy" in line
    assert "Traceback" not in result.stderr


def test_busy_nats_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        nats_port = busy.getsockname()[1]
        result = run_cli(
            "up",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(free_port()),
            "--nats-port",
            str(nats_port),
        )
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"NATS port 127.0.0.1:{nats_port} is busy" in line
    assert processes_using(tmp_path / "d") == []


def test_unusable_data_dir_is_a_one_line_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("up", "--data-dir", str(not_a_dir), "--port", str(free_port()))
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "is not a directory" in line

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        # root ignores permissions; a path under a regular file is unusable for anyone
        target = not_a_dir / "sub" if os.geteuid() == 0 else read_only / "sub"
        result = run_cli("up", "--data-dir", str(target), "--port", str(free_port()))
    finally:
        read_only.chmod(0o700)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "is not usable" in line or "not a directory" in line


async def test_projection_commands_against_a_running_up(up: Up) -> None:
    up.start()
    client = await connect(f"nats://127.0.0.1:{up.nats_port}")
    try:
        store = EventStore(client, default_registry())
        for n in range(5):
            await store.append(
                AggregateRef("ops", "session", f"s{n}"),
                [SessionOpened(channel="web")],
                expect=NO_EVENTS,
            )
    finally:
        await client.close()
    env = {"AGENTBUS_NATS_PORT": str(up.nats_port)}
    deadline = time.monotonic() + 20
    while True:
        status = run_cli("projections", "status", "--data-dir", str(up.data_dir), env=env)
        assert status.returncode == 0, status.stderr
        if "running" in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "sessions" in status.stdout
    assert "running" in status.stdout

    metrics = httpx.get(f"{up.base}/metrics").text
    assert 'agentbus_projection_position{projection="sessions",generation="1"' in metrics
    assert 'state="running"} 1' in metrics

    rebuild = run_cli("projections", "rebuild", "sessions", "--data-dir", str(up.data_dir), env=env)
    assert rebuild.returncode == 0, rebuild.stderr
    assert "generation 2 is live" in rebuild.stdout
    listed = run_cli("projections", "dlq", "list", "--data-dir", str(up.data_dir), env=env)
    assert "no dead letters" in listed.stdout
    code, _ = up.stop()
    assert code == 0
    assert processes_using(up.data_dir) == []


async def test_chat_with_the_echo_agent_under_up(up: Up) -> None:
    """The issue's "done when": a chat message to a session with the echo agent produces a
    streamed reply and a stored outbound message under `agentbus up`."""
    up.start()
    env = {"AGENTBUS_NATS_PORT": str(up.nats_port)}
    result = run_cli("chat", "hello agent world", "--session", "e2e", env=env)
    assert result.returncode == 0, result.stderr
    assert "echo: hello agent world" in result.stdout
    assert "stored in session demo/e2e" in result.stdout

    client = await connect(f"nats://127.0.0.1:{up.nats_port}")
    session = AggregateRef("demo", "session", "e2e")
    try:
        stored = (await EventStore(client, default_registry()).load(session)).events
        store = await open_sealed_store(client, Settings())
        events = (await store.load(session)).events
        live = [e async for e in store.read(subjects=["evt.demo.run.>"])]
        assert store.sealer is not None
        await store.sealer.close()
    finally:
        await client.close()
    names = [e.event.kind.name for e in events]
    assert names[:4] == ["opened", "message_received", "run_assigned", "message_sent"]
    assert events[3].event.text == "echo: hello agent world"  # type: ignore[attr-defined]
    # stored sealed with the key of the person it answers (docs/erasure.md)
    assert stored[3].event.text.startswith("sealed:v1:")  # type: ignore[attr-defined]
    assert [e.event.kind.name for e in live] == ["queued", "started", "usage_recorded", "succeeded"]
    # the projections caught up: the run and both messages are in the read models
    deadline = time.monotonic() + 20
    while True:
        status = run_cli("projections", "status", "--data-dir", str(up.data_dir), env=env)
        lines = [line for line in status.stdout.splitlines() if "running" in line]
        if len(lines) == len(all_projections()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(lines) == len(all_projections()), status.stdout
    code, _ = up.stop()
    assert code == 0


def test_second_up_on_the_same_data_dir_is_refused(up: Up) -> None:
    up.start()
    result = run_cli(
        "up",
        "--data-dir",
        str(up.data_dir),
        "--port",
        str(free_port()),
        "--nats-port",
        str(free_port()),
    )
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "in use by another agentbus" in line
    # The same command again (same port too): still the data dir, the cause, not the port.
    again = run_cli("up", "--data-dir", str(up.data_dir), "--port", str(up.port))
    assert again.returncode == 1
    [line] = error_lines(again.stderr)
    assert "in use by another agentbus" in line
    code, _ = up.stop()
    assert code == 0
