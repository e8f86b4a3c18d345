"""The one settings object and the one logging setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from agentbus.logs import configure_logging
from agentbus.settings import Settings


def test_settings_read_agentbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_NATS_URL", "nats://10.0.0.1:4222")
    monkeypatch.setenv("AGENTBUS_DATABASE_URL", "postgresql://db/agentbus")
    monkeypatch.setenv("AGENTBUS_PORT", "9000")
    monkeypatch.setenv("AGENTBUS_DATA_DIR", "/var/lib/agentbus")
    settings = Settings()
    assert settings.nats_url == "nats://10.0.0.1:4222"
    assert settings.database_url == "postgresql://db/agentbus"
    assert settings.port == 9000
    assert settings.data_dir == Path("/var/lib/agentbus")
    assert not settings.embedded


def test_defaults_are_embedded_and_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AGENTBUS_NATS_URL", "AGENTBUS_DATABASE_URL", "AGENTBUS_HOST", "AGENTBUS_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGENTBUS_NATS_URL", "")  # empty means unset
    settings = Settings()
    assert settings.embedded
    assert settings.nats_url is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.data_dir == Path(".agentbus")


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_PORT", "eighty")
    with pytest.raises(ValueError, match="port"):
        Settings()
    monkeypatch.setenv("AGENTBUS_PORT", "8080")
    monkeypatch.setenv("AGENTBUS_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()


def test_json_logs_carry_context_vars(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    log = structlog.get_logger("test")
    with structlog.contextvars.bound_contextvars(workspace="acme", trace_id="abc123"):
        log.info("run started", run_id="r1")
    log.debug("hidden at info level")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1
    [line] = lines
    assert line["event"] == "run started"
    assert (line["workspace"], line["trace_id"], line["run_id"]) == ("acme", "abc123", "r1")
    assert line["level"] == "info"
    assert "timestamp" in line


def test_console_logs_are_readable(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "info")
    structlog.get_logger("test").warning("disk almost full", free="1G")
    err = capsys.readouterr().err
    assert "disk almost full" in err
    assert "free" in err
    assert not err.lstrip().startswith("{")


def test_every_setting_is_documented_in_operations() -> None:
    """docs/operations.md lists every `AGENTBUS_*` variable the settings object reads."""
    table = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    missing = [
        f"AGENTBUS_{name.upper()}"
        for name in Settings.model_fields
        if f"`AGENTBUS_{name.upper()}`" not in table
    ]
    assert missing == []
