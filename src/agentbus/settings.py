"""The one settings object. Read once at the edge (CLI), then passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentbus.audit.redaction import (
    DEFAULT_NATIONAL_IDS,
    KINDS,
    Redactor,
    check_national_ids,
    redactor,
)


class AgentConfig(BaseModel):
    """An agent: which executor runs it, with which options (model, URL, command, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["echo", "openai", "http", "command"]
    options: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int = Field(default=3, ge=1, le=100)
    timeout: float = Field(default=300.0, gt=0, description="Seconds before a run times out.")
    max_tokens: int = Field(
        default=4096,
        ge=1,
        description="Most tokens (in + out) one model call may use: reserved from the budget "
        "before each call (one call per attempt).",
    )
    approval_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a tool call waits for a person's approval before it expires "
        "(never past the run's own timeout).",
    )


SUBJECT_KEY_CACHE = 10_000
"""Default of `Settings.subject_key_cache` (docs/erasure.md)."""


class Settings(BaseSettings):
    """Every knob of agentbus, from `AGENTBUS_*` environment variables.

    No `nats_url` / `database_url` means the embedded servers started by `agentbus up`.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_", extra="ignore", frozen=True)

    nats_url: str | None = Field(
        default=None, description="External NATS URL; unset means the embedded nats-server."
    )
    database_url: str | None = Field(
        default=None,
        description="External Postgres URL (postgresql://...); unset means embedded pgserver.",
    )
    data_dir: Path = Field(
        default=Path(".agentbus"), description="Where embedded servers keep their data."
    )
    host: str = Field(default="127.0.0.1", description="HTTP bind address (loopback by default).")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port.")
    nats_port: int = Field(
        default=4222, ge=0, le=65535, description="Port of the embedded nats-server (loopback)."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: readable on a terminal, JSON otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    store_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds an append or read waits for JetStream before StoreUnavailable.",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to wait for NATS / Postgres at start."
    )

    agents: dict[str, AgentConfig] = Field(
        default_factory=lambda: {"echo": AgentConfig(executor="echo")},
        description='Agents by name, as JSON: {"helper": {"executor": "openai", "options": '
        '{"base_url": "...", "model": "..."}}}',
    )
    worker_concurrency: int = Field(default=16, ge=1, le=1000, description="Runs per worker.")
    workspace_run_limit: int = Field(
        default=0, ge=0, description="Concurrent runs per workspace (0: no limit)."
    )
    workspace_run_limits: dict[str, int] = Field(
        default_factory=dict, description="Per-workspace overrides of workspace_run_limit."
    )
    run_lease: float = Field(
        default=30.0, gt=0, description="Seconds a worker holds a run without renewing."
    )
    sse_ping_interval: float = Field(
        default=15.0, gt=0, description="Seconds between SSE `: ping` comments while idle."
    )
    sse_retry_ms: int = Field(
        default=3000, ge=0, description="The SSE `retry:` sent on connect (milliseconds)."
    )
    sse_buffer_events: int = Field(
        default=1000,
        ge=2,
        description="Events an SSE connection may hold unwritten; past it the client is too "
        "slow and is disconnected (it resumes from its cursor).",
    )
    sse_buffer_bytes: int = Field(
        default=1024 * 1024, ge=4096, description="The same bound in bytes of event data."
    )
    subject_key_cache: int = Field(
        default=SUBJECT_KEY_CACHE,
        ge=1024,
        description="Data subjects' keys a process keeps in memory (about 3 KB each), least "
        "recently used pushed out first and read from the key bucket again when next needed.",
    )
    redaction_national_ids: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_NATIONAL_IDS),
        description='National-id patterns masked in inbound text, as JSON {"name": "regex"} '
        "(replaces the shipped us_ssn and uk_nino).",
    )
    redaction_kinds: tuple[str, ...] = Field(
        default=KINDS,
        description="What redaction looks for in inbound text (JSON list; default: every kind).",
    )

    @field_validator("redaction_national_ids")
    @classmethod
    def _national_ids_compile(cls, value: dict[str, str]) -> dict[str, str]:
        return check_national_ids(value)

    @field_validator("redaction_kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown redaction kinds {unknown}; known: {', '.join(KINDS)}")
        return value

    @field_validator("nats_url", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def redactor(self) -> Redactor:
        """The compiled redaction of inbound text for these settings (one per process)."""
        return redactor(tuple(self.redaction_national_ids.items()), self.redaction_kinds)

    @property
    def embedded(self) -> bool:
        """True when at least one server must be started by agentbus itself."""
        return self.nats_url is None or self.database_url is None
