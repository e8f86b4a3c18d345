"""The contract between the run worker and an executor.

The worker calls `execute(request, output)` in a task of its own. The executor streams what it
produces through `output` (deltas, progress, usage) and returns the final text. It signals a
failure by raising `ExecutorError` with a class and whether a retry could help. The worker
cancels the task on a cancel, a deadline or a lost lease: executors must let
`asyncio.CancelledError` through and release what they hold (connections, child processes) in
`finally` blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agentbus.errors import AgentbusError
from agentbus.events.run import ErrorClass


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: Literal["user", "assistant", "system"]
    text: str


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Everything an executor may use to run one attempt of a run."""

    workspace: str
    run_id: str
    attempt: int
    agent: str
    input: str
    session_id: str | None = None
    history: tuple[ChatTurn, ...] = ()
    """Earlier turns of the session, oldest first (may be empty)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The agent's executor options (model, URL, command, ...)."""
    max_tokens: int | None = None
    """The tokens reserved from the budget for this attempt (in + out; the agent's
    `max_tokens`): an executor that can cap a model's output passes it on."""


@dataclass(frozen=True, slots=True)
class ApprovalDecision:
    """The answer to `RunOutput.request_approval`: may the tool call go ahead?"""

    approval_id: str
    decision: Literal["granted", "denied", "expired"]
    by: str | None = None
    """Who decided: a person (`apikey:...`, `user:...`, a chat author) or `rule:<name>`."""
    reason: str | None = None
    rule: str | None = None

    @property
    def granted(self) -> bool:
        return self.decision == "granted"

    def explain(self) -> str:
        """Why, in words an agent (or a person) can be told: `denied by ada: too risky`."""
        if self.decision == "expired":
            return f"nobody approved it in time ({self.reason})" if self.reason else "expired"
        why = f": {self.reason}" if self.reason else ""
        return f"{self.decision} by {self.by}{why}"


class RunOutput(Protocol):
    """Where an executor streams to while it runs (the LIVE stream, coalesced)."""

    async def delta(self, text: str) -> None:
        """A piece of the reply as it is produced (tokens, words)."""

    async def progress(self, kind: str, data: Mapping[str, Any]) -> None:
        """A step that is not reply text: a tool call, a todo update, ..."""

    async def usage(self, model: str, tokens_in: int, tokens_out: int) -> None:
        """Tokens spent (recorded durably on the run)."""

    async def request_approval(
        self, tool: str, arguments: Mapping[str, Any], reason: str | None
    ) -> ApprovalDecision:
        """Ask before calling `tool` with `arguments` (a JSON object). The workspace's rules
        may decide at once; otherwise the run waits (`waiting_approval`) until a person grants
        or denies, or the approval expires. Only `granted` means go ahead; on anything else
        tell the model why (`ApprovalDecision.explain`)."""
        ...


class ExecutorError(AgentbusError):
    """An attempt failed. `error_class` lands in the failure event; `retryable` decides whether
    the run is retried (if attempts are left)."""

    def __init__(self, error_class: ErrorClass, message: str, *, retryable: bool) -> None:
        self.error_class: ErrorClass = error_class
        self.retryable = retryable
        super().__init__(message)


class Executor(Protocol):
    name: str

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        """Run one attempt; return the final assistant text."""
        ...
