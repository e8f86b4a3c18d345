"""Inbound human text as it may be stored: masked by the workspace's redaction mode before any
event is built from it (see docs/redaction.md).

The mode comes from the workspace aggregate cached by `Identities` (dropped on every workspace
event), so a post reads no stream; the detectors are compiled once per process from settings.
"""

from __future__ import annotations

import structlog
from fastapi import Request

from agentbus.gateway.deps import identities, platform

log = structlog.get_logger("agentbus.redaction")


async def inbound_text(request: Request, workspace: str, text: str, *, max_length: int) -> str:
    """`text` as the workspace stores it: masked (`mask`, the default) or as sent (`keep`).
    Masks can make it longer: it is then cut at `max_length` (never inside a mask)."""
    if await identities(request).redaction(workspace) == "keep":
        return text
    redacted = platform(request).settings.redactor.redact(text, max_length=max_length)
    if redacted.masked:
        log.info(
            "inbound text redacted",
            workspace=workspace,
            path=request.url.path,
            found={f.kind: f.count for f in redacted.findings},
            truncated=redacted.truncated,
        )
    return redacted.text
