"""Inbound human text as it may be stored: masked by the workspace's redaction mode before any
event is built from it (see docs/redaction.md).

The mode comes from the workspace aggregate cached by `Identities` (dropped on every workspace
event), so a post reads no stream; the detectors are compiled once per process from settings.
"""

from __future__ import annotations

import structlog
from fastapi import Request

from agentbus.audit.redaction import Redactor
from agentbus.gateway.auth import Identities
from agentbus.gateway.deps import identities, platform

log = structlog.get_logger("agentbus.redaction")


async def inbound_text(request: Request, workspace: str, text: str, *, max_length: int) -> str:
    """`text` as the workspace stores it: masked (`mask`, the default) or as sent (`keep`).
    Masks can make it longer: it is then cut at `max_length` (never inside a mask)."""
    redactor = platform(request).settings.redactor
    return await masked_text(
        identities(request), redactor, workspace, text, max_length=max_length, path=request.url.path
    )


async def masked_text(
    ids: Identities, redactor: Redactor, workspace: str, text: str, *, max_length: int, path: str
) -> str:
    """`inbound_text` without a request (the fast path has none): `path` is only logged."""
    if await ids.redaction(workspace) == "keep":
        return text
    redacted = redactor.redact(text, max_length=max_length)
    if redacted.masked:
        log.info(
            "inbound text redacted",
            workspace=workspace,
            path=path,
            found={f.kind: f.count for f in redacted.findings},
            truncated=redacted.truncated,
        )
    return redacted.text
