"""Resumable stream cursors: where an SSE client is in each stream it reads.

A cursor is opaque to clients. Inside it are, per JetStream stream, the stream's *epoch* (a
hash of its creation time: a re-created stream has another), and per *source* (one subject
filter on one stream) the last position the client received, 0 when it has received nothing
from that source yet.

It is signed with HMAC-SHA256 under a secret every gateway replica shares (JetStream KV), over
the cursor *and its scope*: the workspace, the endpoint and its id or filter. So any replica
accepts a cursor, nobody can forge one, and a cursor of another workspace, session, run or
filter fails verification like an altered one does: a `BadStreamCursor` (400), never data.

Pure: no I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from agentbus.errors import AgentbusError

VERSION = "c1"
MAX_LENGTH = 4096
"""Longest cursor accepted (a `Last-Event-ID` header of a few hundred bytes in practice)."""
_MAC_BYTES = 16
_KEY = re.compile(r"[a-z](:[A-Za-z0-9_-]{1,64})?")


class BadStreamCursor(AgentbusError):
    """A cursor that is malformed, altered, or belongs to another stream scope (400)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A decoded cursor: stream epochs by stream name, positions by source key."""

    epochs: Mapping[str, str]
    positions: Mapping[str, int]


def epoch_of(created: str) -> str:
    """A stream's epoch: a short hash of its `created` timestamp (from `STREAM.INFO`)."""
    digest = hashlib.blake2s(created.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()


class CursorCodec:
    """Signs and verifies cursors under one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a cursor secret needs at least 16 bytes")
        self._secret = secret

    def encode(self, scope: str, epochs: Mapping[str, str], positions: Mapping[str, int]) -> str:
        payload = orjson.dumps({"t": epochs, "p": positions})
        mac = self._mac(scope, payload)
        return f"{VERSION}.{_b64(payload)}.{_b64(mac)}"

    def decode(self, scope: str, token: str) -> Cursor:
        """The cursor in `token`, if it was signed here for `scope`; else `BadStreamCursor`."""
        if len(token) > MAX_LENGTH:
            raise BadStreamCursor(f"cursor longer than {MAX_LENGTH} characters")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise BadStreamCursor("malformed cursor")
        try:
            payload = _unb64(parts[1])
            mac = _unb64(parts[2])
        except (binascii.Error, ValueError):
            raise BadStreamCursor("malformed cursor") from None
        if not hmac.compare_digest(mac, self._mac(scope, payload)):
            raise BadStreamCursor(
                "this cursor does not belong to this stream (another workspace, endpoint, id "
                "or filter), or it was altered"
            )
        return _parse(payload)

    def _mac(self, scope: str, payload: bytes) -> bytes:
        return hmac.digest(self._secret, scope.encode() + b"\n" + payload, "sha256")[:_MAC_BYTES]


def _parse(payload: bytes) -> Cursor:
    """Structure check of a payload whose signature is valid (a secret rotation or a bug must
    still not crash a reader)."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadStreamCursor("malformed cursor") from None
    epochs = body.get("t") if isinstance(body, dict) else None
    positions = body.get("p") if isinstance(body, dict) else None
    if not isinstance(epochs, dict) or not isinstance(positions, dict):
        raise BadStreamCursor("malformed cursor")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in epochs.items()):
        raise BadStreamCursor("malformed cursor")
    for key, value in positions.items():
        if not _KEY.fullmatch(key) or type(value) is not int or value < 0:
            raise BadStreamCursor("malformed cursor")
    return Cursor(epochs, positions)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise ValueError("empty or non-ascii")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
