"""The operator commands against the session's real servers (external URLs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from agentbus.domain.handling import load
from agentbus.domain.identity import API_KEY, USER
from agentbus.domain.workspace import WORKSPACE
from agentbus.events import AggregateRef
from agentbus.events.catalog import default_registry
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.store import EventStore

from .conftest import connect
from .test_up import free_port


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agentbus", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("up", "serve", "streams", "db", "schemas", "version"):
        assert command in result.stdout
    up_help = cli("up", "--help").stdout
    for option in ("--data-dir", "--host", "--port", "--nats-port"):
        assert option in up_help


def test_streams_apply_dry_run_then_apply_then_unchanged(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    env = {"AGENTBUS_NATS_URL": server.url}
    try:
        dry = cli("streams", "apply", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        assert "create" in dry.stdout
        assert "nothing changed" in dry.stdout

        applied = cli("streams", "apply", env=env)
        assert applied.returncode == 0, applied.stderr
        assert "2 changed" in applied.stdout

        again = cli("streams", "apply", env=env)
        assert again.returncode == 0, again.stderr
        assert "0 changed, 2 unchanged" in again.stdout
    finally:
        server.stop()


def test_streams_apply_without_nats_is_a_clear_error() -> None:
    result = cli(
        "streams",
        "apply",
        env={
            "AGENTBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "AGENTBUS_CONNECT_TIMEOUT": "1",
        },
    )
    assert result.returncode == 1
    assert "error: cannot connect to NATS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_db_upgrade_against_an_external_database(database_url: str) -> None:
    first = cli("db", "upgrade", env={"AGENTBUS_DATABASE_URL": database_url})
    assert first.returncode == 0, first.stderr
    assert "database migrated: empty ->" in first.stdout
    second = cli("db", "upgrade", env={"AGENTBUS_DATABASE_URL": database_url})
    assert "up to date" in second.stdout
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM projection_generations") == 0
    finally:
        await conn.close()


def test_schemas_export_check_passes_on_the_committed_files() -> None:
    result = cli("schemas", "export", "--check")
    assert result.returncode == 0, result.stdout
    assert "match the event models" in result.stdout


def test_schemas_export_check_fails_on_drift(tmp_path: Path) -> None:
    cli("schemas", "export", "--dir", str(tmp_path))
    victim = next(tmp_path.glob("agentbus.session.opened.v1.json"))
    victim.write_text("{}\n")
    result = cli("schemas", "export", "--check", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "agentbus schemas export" in result.stdout


def test_serve_needs_external_urls() -> None:
    result = cli("serve", "--role", "gateway")
    assert result.returncode == 2
    assert "AGENTBUS_NATS_URL" in result.stderr


def test_serve_rejects_an_unknown_role() -> None:
    result = cli(
        "serve",
        "--role",
        "janitor",
        env={"AGENTBUS_NATS_URL": "nats://x:1", "AGENTBUS_DATABASE_URL": "postgresql://x"},
    )
    assert result.returncode == 2
    assert "unknown role 'janitor'" in result.stderr


@pytest.mark.slow
async def test_serve_gateway_against_external_servers(tmp_path: Path, database_url: str) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    env = {"AGENTBUS_NATS_URL": server.url, "AGENTBUS_DATABASE_URL": database_url}
    port = free_port()
    process: subprocess.Popen[str] | None = None
    try:
        assert cli("streams", "apply", env=env).returncode == 0
        assert cli("db", "upgrade", env=env).returncode == 0
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTBUS_")}
        process = subprocess.Popen(
            [sys.executable, "-m", "agentbus", "serve", "--role", "gateway", "--port", str(port)],
            env={**full_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200
        # Readiness follows the dependencies: NATS gone -> 503 with the reason.
        server.stop()
        time.sleep(0.5)
        not_ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert not_ready.status_code == 503
        assert not_ready.headers["content-type"].startswith("application/problem+json")
        assert "nats" in not_ready.json()["detail"]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
        assert process.returncode == 0
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        server.stop()


async def test_admin_commands(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    env = {"AGENTBUS_NATS_URL": server.url}
    try:
        assert cli("streams", "apply", env=env).returncode == 0
        init = cli("admin", "init", env=env)
        assert init.returncode == 0, init.stderr
        assert "ab_" in init.stdout
        assert "already bootstrapped" in cli("admin", "init", env=env).stdout
        assert (
            cli("admin", "user", "create", "ada", "--password", "long-enough", env=env).returncode
            == 0
        )
        short = cli("admin", "user", "create", "bob", "--password", "short", env=env)
        assert short.returncode == 2
        created = cli("admin", "workspace", "create", "acme", "--owner", "ada", env=env)
        assert created.returncode == 0, created.stderr
        bad = cli("admin", "workspace", "create", "Not_Valid!", env=env)
        assert bad.returncode == 1
        assert "workspace id" in bad.stderr
        issued = cli("admin", "apikey", "issue", "acme", "--role", "viewer", env=env)
        key_id = issued.stdout.split("API key ")[1].split(" ")[0]
        assert cli("admin", "apikey", "revoke", key_id, env=env).returncode == 0
        assert cli("admin", "user", "disable", "ada", env=env).returncode == 0
        assert (
            cli(
                "admin", "budget", "set", "acme", "--tokens", "5000", "--period", "daily", env=env
            ).returncode
            == 0
        )
        client = await connect(server.url)
        try:
            store = EventStore(client, default_registry())
            workspace, _ = await load(store, WORKSPACE, AggregateRef("acme", "workspace", "acme"))
            user, _ = await load(store, USER, AggregateRef("_system", "user", "ada"))
            key, _ = await load(store, API_KEY, AggregateRef("_system", "apikey", key_id))
        finally:
            await client.close()
        assert workspace.members == {"ada": "owner"}
        assert user.disabled
        assert (key.workspace, key.role, key.revoked) == ("acme", "viewer", True)
    finally:
        server.stop()
