"""Secrets that every replica must share and that must survive restarts (the session cookie
key, ...): kept in the JetStream KV bucket `agentbus_secrets`, created on first use. The first
replica to need a secret creates it; every other replica reads the same value."""

from __future__ import annotations

import secrets

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

BUCKET = "agentbus_secrets"


async def shared_secret(nc: NATS, name: str, size: int = 32) -> bytes:
    """The secret called `name` (created at random, once, if it does not exist yet)."""
    js = nc.jetstream()
    try:
        kv = await js.key_value(BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(
            bucket=BUCKET, history=1, description="agentbus: shared secrets"
        )
    try:
        entry = await kv.get(name)
        if entry.value:
            return bytes(entry.value)
    except KeyNotFoundError:
        pass
    try:
        await kv.create(name, secrets.token_bytes(size))
    except (KeyWrongLastSequenceError, Exception) as exc:  # another replica won the race
        if "wrong last sequence" not in str(exc) and "key exists" not in str(exc):
            raise
    entry = await kv.get(name)
    assert entry.value is not None
    return bytes(entry.value)
