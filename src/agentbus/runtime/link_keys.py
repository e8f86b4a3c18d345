"""The keys that sign approval links, shared by every replica and kept across restarts.

They live in the JetStream KV bucket of the shared secrets (`agentbus_secrets`), entry
`approval_link_keys`: JSON `{"current": <kid>, "keys": [{"kid", "key" (base64), "created_at"},
...]}`, newest first. The first replica to need a key creates it. `rotate_link_key` puts a new
current key in front and keeps the `keep - 1` previous ones for verification, so links already
sent keep working until they expire (or until their key drops out); every change is a
compare-and-set on the entry's revision, so concurrent rotations cannot lose a key.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agentbus.errors import AgentbusError
from agentbus.runtime.secrets import BUCKET

ENTRY = "approval_link_keys"
KEEP = 3


@dataclass(frozen=True, slots=True)
class LinkKeys:
    current: str
    keys: Mapping[str, bytes]
    """Every key a link may be signed with, by kid (the current one included)."""

    @property
    def signing_key(self) -> bytes:
        return self.keys[self.current]


async def link_keys(nc: NATS) -> LinkKeys:
    """The keyring (created, once, if there is none yet)."""
    kv = await _bucket(nc)
    for _ in range(10):
        try:
            entry = await kv.get(ENTRY)
            if entry.value:
                return _decode(entry.value)
        except KeyNotFoundError:
            pass
        try:
            await kv.create(ENTRY, _encode([_new_key()]))
        except KeyWrongLastSequenceError:
            continue  # another replica created it first: read theirs
    raise AgentbusError("the approval link keys could not be read")


async def rotate_link_key(nc: NATS, keep: int = KEEP) -> LinkKeys:
    """Make a new key current; keep the `keep - 1` newest previous keys for verification
    (`keep=1`: links signed before stop working at once, e.g. after a leak)."""
    if keep < 1:
        raise ValueError("keep at least the new key")
    kv = await _bucket(nc)
    await link_keys(nc)  # exists
    for _ in range(10):
        entry = await kv.get(ENTRY)
        assert entry.value is not None
        assert entry.revision is not None
        previous = orjson.loads(entry.value)["keys"]
        value = _encode([_new_key(), *previous][:keep])
        try:
            await kv.update(ENTRY, value, last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return _decode(value)
    raise AgentbusError("the approval link keys kept changing; try again")


async def _bucket(nc: NATS) -> KeyValue:
    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=BUCKET, history=1, description="agentbus: shared secrets"
        )


def _new_key() -> dict[str, str]:
    return {
        "kid": secrets.token_hex(6),
        "key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "created_at": datetime.now(UTC).isoformat(),
    }


def _encode(keys: list[dict[str, str]]) -> bytes:
    return orjson.dumps({"current": keys[0]["kid"], "keys": keys})


def _decode(raw: bytes) -> LinkKeys:
    data = orjson.loads(raw)
    keys = {item["kid"]: base64.b64decode(item["key"]) for item in data["keys"]}
    return LinkKeys(data["current"], keys)
