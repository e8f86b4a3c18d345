"""A per-workspace cap on concurrent runs: a counting semaphore in a JetStream KV bucket.

Key `<workspace>` holds the ids of the runs holding a slot; every change is a compare-and-set
on the key's revision, so concurrent workers serialise without a lock server. Slots are
acquired when a worker claims a run and released when the run ends. Both are idempotent (a
takeover re-acquires the slot its run already holds; releasing twice is harmless), and a run
that ended while its worker was dead is released when its queue item comes back.

This is coordination state, not history: the audit record of every run stays on EVENTS.
"""

from __future__ import annotations

import orjson
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agentbus.errors import AgentbusError

BUCKET = "agentbus_run_slots"
_ATTEMPTS = 20


class CapacityFull(AgentbusError):
    def __init__(self, workspace: str, limit: int) -> None:
        super().__init__(f"workspace {workspace} already runs {limit} runs (its limit)")


class RunSlots:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._nc.jetstream()
            try:
                self._kv = await js.key_value(BUCKET)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(
                    bucket=BUCKET, history=1, description="agentbus: runs holding a slot"
                )
        return self._kv

    async def acquire(self, workspace: str, run_id: str, limit: int) -> None:
        """Take a slot for `run_id` (kept if it has one); `CapacityFull` when none is free."""
        await self._change(workspace, run_id, limit=limit, add=True)

    async def release(self, workspace: str, run_id: str) -> None:
        await self._change(workspace, run_id, limit=0, add=False)

    async def holders(self, workspace: str) -> list[str]:
        kv = await self._bucket()
        try:
            entry = await kv.get(workspace)
        except KeyNotFoundError:
            return []
        return list(orjson.loads(entry.value or b"[]"))

    async def _change(self, workspace: str, run_id: str, *, limit: int, add: bool) -> None:
        kv = await self._bucket()
        for _ in range(_ATTEMPTS):
            try:
                entry = await kv.get(workspace)
                holders: list[str] = list(orjson.loads(entry.value or b"[]"))
                revision: int | None = entry.revision
            except KeyNotFoundError:
                holders, revision = [], None
            if add:
                if run_id in holders:
                    return
                if len(holders) >= limit:
                    raise CapacityFull(workspace, limit)
                holders.append(run_id)
            else:
                if run_id not in holders:
                    return
                holders.remove(run_id)
            value = orjson.dumps(holders)
            try:
                if revision is None:
                    await kv.create(workspace, value)
                else:
                    await kv.update(workspace, value, last=revision)
                return
            except (KeyWrongLastSequenceError, Exception) as exc:
                if not _is_cas_conflict(exc):
                    raise
        raise AgentbusError(f"run slots of {workspace} kept changing; try again")


def _is_cas_conflict(exc: Exception) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    text = str(exc)
    return "wrong last sequence" in text or "key exists" in text
