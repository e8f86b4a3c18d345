"""Page cursors for listings ordered by (time, id), newest first: opaque to clients, checked
on the way back in (a cursor from another listing, or not ours at all, is a `BadCursor`)."""

from __future__ import annotations

import base64
from datetime import datetime

import orjson

from agentbus.errors import AgentbusError


class BadCursor(AgentbusError):
    """A pagination cursor that this server did not hand out (or for another listing)."""


def encode_cursor(kind: str, at: datetime, last_id: str) -> str:
    raw = orjson.dumps([kind, at.isoformat(), last_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> tuple[datetime, str]:
    """The (time, id) a page cursor points after."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise BadCursor("malformed cursor") from None
    if not isinstance(values, list) or len(values) != 3 or values[0] != kind:
        raise BadCursor("this cursor belongs to another listing")
    try:
        return datetime.fromisoformat(str(values[1])), str(values[2])
    except ValueError:
        raise BadCursor("malformed cursor") from None
