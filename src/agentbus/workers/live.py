"""Live output of a running run: token deltas and progress on the LIVE stream, coalesced.

Subjects `live.<workspace>.run.<id>.<kind>` (kind: `delta`, `progress`). Deltas are buffered and
published at most every `coalesce` seconds (~50 ms), so a fast model does not become thousands
of messages. LIVE keeps an hour of output, so a client can join a run mid-flight and replay it
from its start. Payload: JSON `{"run_id", "attempt", "seq", "type", "text" | "kind"+"data"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from nats.aio.client import Client as NATS

from agentbus.domain.decider import DomainError
from agentbus.domain.handling import Loaded
from agentbus.domain.run import RecordUsage, RunCommand, RunState
from agentbus.events.subjects import LIVE_PREFIX
from agentbus.executors.executor import ApprovalDecision
from agentbus.workers.approvals import ApprovalGate

log = structlog.get_logger("agentbus.live")


class LiveOutput:
    """A `RunOutput` that publishes to the LIVE stream and records usage on the run."""

    def __init__(
        self,
        nc: NATS,
        run: Loaded[RunCommand, RunState],
        attempt: int,
        *,
        coalesce: float = 0.05,
        approvals: ApprovalGate | None = None,
    ) -> None:
        self._nc = nc
        self._approvals = approvals
        self._loaded = run
        self._run = run.ref
        self._attempt = attempt
        self._coalesce = coalesce
        self._buffer: list[str] = []
        self._seq = 0
        self._flush_task: asyncio.Task[None] | None = None
        self._prefix = f"{LIVE_PREFIX}.{run.ref.workspace}.run.{run.ref.id}"
        self.text = ""
        """Everything streamed so far (the reply as the client sees it)."""
        self.tokens = 0
        """Tokens (in + out) reported through `usage` so far: what the budget is charged."""

    async def delta(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        self.text += text
        if self._flush_task is None:
            self._flush_task = asyncio.create_task(self._flush_later())

    async def progress(self, kind: str, data: Mapping[str, Any]) -> None:
        await self.flush()
        await self._publish("progress", {"kind": kind, "data": dict(data)})

    async def usage(self, model: str, tokens_in: int, tokens_out: int) -> None:
        self.tokens += tokens_in + tokens_out  # spent, whether or not the run still records it
        try:
            await self._loaded.handle(RecordUsage(self._attempt, model, tokens_in, tokens_out))
        except DomainError as exc:  # the run ended meanwhile (cancelled, taken over)
            log.info("usage not recorded", run=self._run.id, reason=str(exc))

    async def request_approval(
        self, tool: str, arguments: Mapping[str, Any], reason: str | None
    ) -> ApprovalDecision:
        """See `RunOutput.request_approval` and `agentbus.workers.approvals.ApprovalGate`."""
        if self._approvals is None:
            raise RuntimeError("this output was made without an approval gate")
        await self.flush()
        return await self._approvals.request(tool, arguments, reason, self.progress)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._coalesce)
        self._flush_task = None
        await self._send_buffer()

    async def flush(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self._flush_task = None
        await self._send_buffer()

    async def close(self) -> None:
        await self.flush()

    async def _send_buffer(self) -> None:
        if self._buffer:
            text, self._buffer = "".join(self._buffer), []
            await self._publish("delta", {"text": text})

    async def _publish(self, kind: str, body: dict[str, Any]) -> None:
        self._seq += 1
        payload = {
            "run_id": self._run.id,
            "attempt": self._attempt,
            "seq": self._seq,
            "type": kind,
            **body,
        }
        try:
            await self._nc.publish(f"{self._prefix}.{kind}", orjson.dumps(payload))
        except Exception as exc:  # live output is best effort; the durable result is not
            log.warning("live output dropped", run=self._run.id, error=str(exc))
