"""Erasure by crypto-shredding: the subject keys, their per-process cache, and `forget`.

Keys live in the JetStream KV bucket `agentbus_subject_keys` (one value per data subject, named
by `subject_digest(workspace, subject)`; history 1; created on first use by whichever process
needs it first). Forgetting a subject overwrites its key's message on disk (JetStream's secure
message delete), purges the key (the purge marker tells every process's watcher at once), then
appends `SubjectForgotten` so read models drop what they copied.

Every process keeps the keys it used last in memory, at most `cached_keys` of them (each costs
about 3 KB once used: the cipher's context); a key pushed out is read from the bucket again when
next needed. A watcher on the bucket drops a forgotten key from the cache as soon as the purge is
stored (measured in docs/erasure.md); as a backstop, a cached key older than `recheck` seconds is
read from the bucket again before the event store uses it on its async paths (append, load,
read, get, pages).

The pure part (the sealed format, AES-GCM, which fields) is `agentbus.audit.sealing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import APIError, BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from agentbus.audit.sealing import (
    KEY_IDS_IN_PAYLOAD,
    SEALED_MARK,
    SubjectKey,
    open_data,
    sealed_key_id,
)
from agentbus.errors import StoreUnavailable, StreamNotFound, SubjectKeyUnavailable
from agentbus.events.catalog import default_registry
from agentbus.events.envelope import CloudEvent, EventContext
from agentbus.events.privacy import Personal, SubjectForgotten, personal_types, subject_digest
from agentbus.events.registry import DomainEvent, EventRegistry
from agentbus.events.subjects import EVENTS_PREFIX, LIVE_PREFIX, LIVE_STREAM, AggregateRef
from agentbus.settings import SUBJECT_KEY_CACHE, Settings
from agentbus.store.eventstore import EventStore

BUCKET: Final = "agentbus_subject_keys"
KEYS_STREAM: Final = f"KV_{BUCKET}"
DEFAULT_RECHECK: Final = 60.0
"""Seconds a cached key is used on the async paths before it is read from the bucket again."""
DEFAULT_SETTLE: Final = 1.0
"""Seconds `forget` waits between destroying a key and appending `SubjectForgotten`, so that
every process's watcher has dropped the key (measured: milliseconds; docs/erasure.md)."""
_KV_OP: Final = "KV-Operation"
_MARKER: Final = "Nats-Marker-Reason"
_TRANSPORT_ERRORS = (NatsTimeout, asyncio.TimeoutError, NoRespondersError, ConnectionClosedError)

log = structlog.get_logger("agentbus.erasure")


@dataclass(frozen=True, slots=True)
class _Cached:
    key: SubjectKey
    loaded_at: float


@dataclass(slots=True)
class _Reading:
    """A read of a subject's key in flight: told when the subject is forgotten meanwhile."""

    purged: bool = False


class Sealer:
    """Seals personal fields at append and opens them at read, for one process.

    Build it with `await Sealer.open(nc, registry)` and pass it to `EventStore(sealer=...)`;
    `close()` stops its watcher."""

    def __init__(
        self,
        nc: NATS,
        registry: EventRegistry,
        *,
        recheck: float = DEFAULT_RECHECK,
        timeout: float = 5.0,
        cached_keys: int = SUBJECT_KEY_CACHE,
    ) -> None:
        if cached_keys < 1:
            raise ValueError(f"a sealer caches at least one key, got cached_keys={cached_keys}")
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._timeout = timeout
        self._recheck = recheck
        self._max = cached_keys
        self.personal: dict[str, Personal] = personal_types(registry.models)
        """Type string -> its personal fields: the only types the store seals or opens."""
        self._by_model = {registry.model_for(t): p for t, p in self.personal.items()}
        self._kv: KeyValue | None = None
        self._watcher: Subscription | None = None
        self._by_digest: OrderedDict[str, _Cached] = OrderedDict()
        """Digest -> its subject's key, least recently used first (at most `_max`)."""
        self._keys: dict[str, SubjectKey | None] = {}
        """Key id -> its key, or None: destroyed. What `open_data` reads: the keys of
        `_by_digest` and the ids of `_destroyed`; an id in neither is loaded when needed."""
        self._digest_of: dict[str, str] = {}
        """Key id -> its digest, for the keys of `_by_digest`."""
        self._destroyed: OrderedDict[str, None] = OrderedDict()
        """Ids of keys known destroyed, oldest first (at most `_max`)."""
        self._reading: dict[str, list[_Reading]] = {}
        """Digest -> the reads of its key in flight."""
        self._loading: dict[str, asyncio.Task[SubjectKey | None]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    async def open(
        cls,
        nc: NATS,
        registry: EventRegistry,
        *,
        recheck: float = DEFAULT_RECHECK,
        timeout: float = 5.0,
        cached_keys: int = SUBJECT_KEY_CACHE,
    ) -> Sealer:
        """A sealer whose bucket exists (created if needed) and whose watcher runs."""
        sealer = cls(nc, registry, recheck=recheck, timeout=timeout, cached_keys=cached_keys)
        await sealer.start()
        return sealer

    async def start(self) -> None:
        try:
            self._kv = await _keys_bucket(self._js)
            # Only changes from now on: keys are loaded on demand, after this subscribes, so
            # a purge is either seen here or already visible to the load.
            self._watcher = await self._js.subscribe(
                f"$KV.{BUCKET}.>",
                stream=KEYS_STREAM,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW,
                idle_heartbeat=5.0,
                cb=self._on_change,
            )
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable(f"cannot open the subject key bucket {BUCKET}") from exc

    async def close(self) -> None:
        for task in [*self._background, *self._loading.values()]:
            task.cancel()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.unsubscribe()
            self._watcher = None

    @property
    def cached_keys(self) -> int:
        """Subjects whose key this process holds in memory."""
        return len(self._by_digest)

    # ------------------------------------------------------------------ append

    def _subjects(
        self, ref: AggregateRef, events: Sequence[DomainEvent]
    ) -> list[tuple[int, Personal, str]]:
        """The events with personal fields to seal: (index, declaration, data subject)."""
        found: list[tuple[int, Personal, str]] = []
        for index, event in enumerate(events):
            personal = self._by_model.get(type(event))
            if personal is not None:
                subject = personal.subject_of(event.__dict__, ref.id)
                if subject is not None:
                    found.append((index, personal, subject))
        return found

    async def seals_for(
        self, ref: AggregateRef, events: Sequence[DomainEvent]
    ) -> list[tuple[Personal, SubjectKey] | None] | None:
        """Per event, what to seal it with; None when no event has personal fields (no work)."""
        found = self._subjects(ref, events)
        if not found:
            return None
        plan: list[tuple[Personal, SubjectKey] | None] = [None] * len(events)
        for index, personal, subject in found:
            plan[index] = (personal, await self.key_for(ref.workspace, subject))
        return plan

    def cached_seals(
        self, ref: AggregateRef, events: Sequence[DomainEvent]
    ) -> list[tuple[Personal, SubjectKey] | None] | None:
        """`seals_for` without awaiting, when every key needed is cached and fresh (the
        common case: no coroutine per append). Raises `KeyError` when one is not."""
        found = self._subjects(ref, events)
        if not found:
            return None
        plan: list[tuple[Personal, SubjectKey] | None] = [None] * len(events)
        for index, personal, subject in found:
            digest = _digest(ref.workspace, subject)
            cached = self._by_digest[digest]
            if time.monotonic() - cached.loaded_at >= self._recheck:
                raise KeyError(subject)
            self._by_digest.move_to_end(digest)
            plan[index] = (personal, cached.key)
        return plan

    async def key_for(self, workspace: str, subject: str) -> SubjectKey:
        """The subject's key, created (race-safely: one wins, all use it) on first use."""
        digest = _digest(workspace, subject)
        cached = self._by_digest.get(digest)
        if cached is not None and time.monotonic() - cached.loaded_at < self._recheck:
            self._by_digest.move_to_end(digest)
            return cached.key
        for _ in range(3):
            key = await self._load(digest, create=True)
            if key is not None:
                return key
        raise StoreUnavailable(f"the key of a subject of {workspace} keeps being forgotten")

    # ------------------------------------------------------------------ read

    def ready(self, payload: bytes) -> bool:
        """Whether `open_envelope` has what a raw event needs (no `prepare` to await): true at
        once for an event without sealed fields (one substring search)."""
        if SEALED_MARK not in payload:
            return True
        now = time.monotonic()
        for found in KEY_IDS_IN_PAYLOAD.findall(payload):
            key_id = found.decode()
            if key_id not in self._keys:
                return False
            if self._keys[key_id] is None:
                continue  # destroyed
            digest = self._digest_of[key_id]
            cached = self._by_digest[digest]
            if now - cached.loaded_at >= self._recheck:
                return False
            self._by_digest.move_to_end(digest)
        return True

    async def prepare(self, payload: bytes) -> None:
        """Make sure the keys of a raw event's sealed fields are loaded (or known destroyed),
        so `open_envelope` will not miss. Costs one substring search for unsealed events."""
        if SEALED_MARK not in payload:
            return
        now = time.monotonic()
        for found in KEY_IDS_IN_PAYLOAD.findall(payload):
            key_id = found.decode()
            if key_id in self._keys:
                if self._keys[key_id] is None:
                    continue  # destroyed
                cached = self._digest_of[key_id]
                if now - self._by_digest[cached].loaded_at < self._recheck:
                    self._by_digest.move_to_end(cached)
                    continue
            digest = _digest_of_payload(payload, self.personal)
            if digest is None:
                return  # not a personal type: whatever looked sealed is plain text
            await self._resolve(key_id, digest)

    def open_envelope(self, envelope: CloudEvent) -> None:
        """Open the sealed personal fields of `envelope.data` in place (`[erased]` for a
        destroyed key). Raises `SubjectKeyUnavailable` (and starts loading the key) when the
        key was never loaded in this process: call `prepare` first to avoid that."""
        personal = self.personal[envelope.type]
        try:
            open_data(personal, self._keys, envelope.id, envelope.data)
        except SubjectKeyUnavailable:
            subject = personal.subject_of(envelope.data, envelope.subject.partition("/")[2])
            if subject is not None:
                digest = subject_digest(envelope.workspace, subject)
                self._in_background(self._resolve_all(personal, dict(envelope.data), digest))
            raise

    # ------------------------------------------------------------------ forget

    async def forget_key(self, workspace: str, subject: str) -> ForgetStep:
        """Destroy the subject's key: overwrite its message on disk, then purge it (every
        process's watcher drops it). Idempotent."""
        digest = subject_digest(workspace, subject)
        current = await self._stored(digest)
        if current is None or current.key is None:
            return ForgetStep(None, current.purged_at if current else None)
        js_api = f"$JS.API.STREAM.MSG.DELETE.{KEYS_STREAM}"
        reply = await self._request(js_api, orjson.dumps({"seq": current.seq}))
        if "error" in reply and reply["error"].get("err_code") != 10037:  # 10037: no message
            raise StoreUnavailable(f"erasing the key failed: {reply['error']}")
        assert self._kv is not None
        try:
            await self._kv.purge(digest)
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable("purging the key did not answer; forget again") from exc
        self._drop(digest)
        return ForgetStep(current.key.key_id, None)

    async def stored_key_id(self, workspace: str, subject: str) -> str | None:
        """The id of the subject's key as the bucket holds it now (None: no key)."""
        stored = await self._stored(subject_digest(workspace, subject))
        return stored.key.key_id if stored is not None and stored.key is not None else None

    # ------------------------------------------------------------------ internals

    async def _resolve(self, key_id: str, digest: str) -> None:
        key = await self._load(digest, create=False)
        if key is None or key.key_id != key_id:
            # The bucket's key for this subject is another one (or none): this one is gone.
            # Sound because a key is only ever replaced after its purge, and every event is
            # appended after its key was stored (and the bucket is read from its leader).
            self._mark_destroyed(key_id)

    async def _resolve_all(self, personal: Personal, data: dict[str, Any], digest: str) -> None:
        try:
            for field in personal.fields:
                key_id = sealed_key_id(data.get(field))
                if key_id is not None and key_id not in self._keys:
                    await self._resolve(key_id, digest)
        except StoreUnavailable as exc:  # the next decode tries again
            log.warning("loading a subject key failed", error=str(exc))

    async def _load(self, digest: str, *, create: bool) -> SubjectKey | None:
        """The subject's key from the bucket (created when `create`), cached. One load per
        digest at a time in this process."""
        task = self._loading.get(digest)
        if task is None or task.done():
            task = asyncio.ensure_future(self._read_key(digest, create=create))
            self._loading[digest] = task
            task.add_done_callback(functools.partial(self._loaded, digest))
        key = await asyncio.shield(task)
        if key is None and create:
            key = await self._read_key(digest, create=True)
        return key

    def _loaded(self, digest: str, task: asyncio.Task[SubjectKey | None]) -> None:
        if self._loading.get(digest) is task:
            del self._loading[digest]

    async def _read_key(self, digest: str, *, create: bool) -> SubjectKey | None:
        reading = _Reading()
        self._reading.setdefault(digest, []).append(reading)
        try:
            return await self._read_key_watched(digest, reading, create=create)
        finally:
            readings = self._reading[digest]
            readings.remove(reading)
            if not readings:
                del self._reading[digest]

    async def _read_key_watched(
        self, digest: str, reading: _Reading, *, create: bool
    ) -> SubjectKey | None:
        stored = await self._stored(digest)
        if (stored is None or stored.key is None) and create:
            assert self._kv is not None
            try:
                await self._kv.create(digest, SubjectKey.generate())
            except KeyWrongLastSequenceError:
                pass  # another process created it first: use theirs
            except _TRANSPORT_ERRORS as exc:
                raise StoreUnavailable("creating a subject key did not answer") from exc
            stored = await self._stored(digest)
        if reading.purged:
            return None  # forgotten while this was reading: the caller decides what next
        if stored is None or stored.key is None:
            self._drop(digest)
            return None
        self._remember(digest, stored.key)
        return stored.key

    async def _stored(self, digest: str) -> _Stored | None:
        """The bucket's last message for `digest`, from the stream leader (not a direct get:
        a replica that lags could miss a key that was just created)."""
        try:
            msg = await self._js.get_msg(KEYS_STREAM, subject=f"$KV.{BUCKET}.{digest}")
        except NotFoundError:
            return None
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable("reading a subject key did not answer") from exc
        headers = msg.headers or {}
        if headers.get(_KV_OP) or headers.get(_MARKER):  # a purge (or delete) marker
            return _Stored(None, msg.seq or 0, msg.time)
        assert msg.data is not None
        return _Stored(SubjectKey.from_stored(msg.data), msg.seq or 0, None)

    def _remember(self, digest: str, key: SubjectKey, *, heard: bool = False) -> None:
        """Cache `key` as the most recently used. A key only `heard` from the watcher (created
        elsewhere, not used here yet) is cached as the least recently used, and only while
        there is room: keys created anywhere in the cluster never push out the keys this
        process uses. It moves up when used."""
        cold = heard and digest not in self._by_digest
        if cold and len(self._by_digest) >= self._max:
            return  # read from the bucket if this process ever needs it
        old = self._by_digest.pop(digest, None)
        if old is not None and old.key.key_id != key.key_id:
            self._mark_destroyed(old.key.key_id)
        self._by_digest[digest] = _Cached(key, time.monotonic())
        if cold:
            self._by_digest.move_to_end(digest, last=False)
        self._keys[key.key_id] = key
        self._digest_of[key.key_id] = digest
        while len(self._by_digest) > self._max:  # pushed out: read again when next needed
            _, pushed = self._by_digest.popitem(last=False)
            del self._keys[pushed.key.key_id], self._digest_of[pushed.key.key_id]

    def _drop(self, digest: str) -> None:
        old = self._by_digest.pop(digest, None)
        if old is not None:
            self._mark_destroyed(old.key.key_id)

    def _mark_destroyed(self, key_id: str) -> None:
        digest = self._digest_of.pop(key_id, None)
        if digest is not None:  # the subject's cached key until now
            self._by_digest.pop(digest, None)
        self._keys[key_id] = None
        self._destroyed[key_id] = None
        self._destroyed.move_to_end(key_id)
        while len(self._destroyed) > self._max:
            oldest, _ = self._destroyed.popitem(last=False)
            if self._keys.get(oldest, False) is None:
                del self._keys[oldest]

    async def _on_change(self, msg: Msg) -> None:
        digest = msg.subject.rpartition(".")[2]
        headers = msg.headers or {}
        if headers.get(_KV_OP) or headers.get(_MARKER):
            for reading in self._reading.get(digest, ()):
                reading.purged = True
            self._drop(digest)
            return
        try:
            # Saves a reader of this subject's first events a round trip.
            self._remember(digest, SubjectKey.from_stored(msg.data), heard=True)
        except ValueError:
            log.warning("ignored a malformed subject key", digest=digest)

    async def _request(self, subject: str, payload: bytes) -> dict[str, Any]:
        try:
            reply = await self._nc.request(subject, payload, timeout=self._timeout)
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnavailable(f"{subject} did not answer") from exc
        answer: dict[str, Any] = orjson.loads(reply.data)
        return answer

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@dataclass(frozen=True, slots=True)
class _Stored:
    key: SubjectKey | None
    """None: a purge marker (the key was destroyed)."""
    seq: int
    purged_at: datetime | None


@dataclass(frozen=True, slots=True)
class ForgetStep:
    destroyed: str | None
    """The id of the key destroyed now (None: there was none)."""
    purged_at: datetime | None
    """When the key had been destroyed before (None: never, or just now)."""


@functools.lru_cache(maxsize=SUBJECT_KEY_CACHE)
def _digest(workspace: str, subject: str) -> str:
    """`subject_digest`, remembered for the subjects used last (a SHA-256 per append saved)."""
    return subject_digest(workspace, subject)


def _digest_of_payload(payload: bytes, personal: dict[str, Personal]) -> str | None:
    """The subject digest of a raw CloudEvent of a personal type (None: not one)."""
    try:
        doc = orjson.loads(payload)
        declared = personal.get(doc["type"])
        if declared is None:
            return None
        subject = declared.subject_of(doc["data"], str(doc["subject"]).partition("/")[2])
        workspace = doc["workspace"]
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None
    if subject is None or not isinstance(workspace, str):
        return None
    return subject_digest(workspace, subject)


async def _keys_bucket(js: Any) -> KeyValue:
    """The key bucket, created on first use with secure erase possible: unlike a KV bucket
    made by `create_key_value`, its stream allows message delete, which JetStream does by
    overwriting the message on disk (a purge alone leaves the bytes in the block file)."""
    try:
        return await js.key_value(BUCKET)  # type: ignore[no-any-return]
    except BucketNotFoundError:
        pass
    replicas = 1
    with contextlib.suppress(Exception):  # as many replicas as the events they open
        replicas = (await js.stream_info("EVENTS")).config.num_replicas or 1
    config = api.StreamConfig(
        name=KEYS_STREAM,
        description="agentbus: one key per data subject (docs/erasure.md)",
        subjects=[f"$KV.{BUCKET}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_consumers=-1,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        allow_direct=False,
        deny_delete=False,
        duplicate_window=120.0,
    )
    try:
        await js.add_stream(config)
    except APIError as exc:  # another process created it first
        log.debug("key bucket exists", detail=str(exc))
    return await js.key_value(BUCKET)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- forget


Outcome = Literal["destroyed", "completed", "already_forgotten", "unknown"]


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What `forget` did."""

    outcome: Outcome
    key_id: str | None
    """The key destroyed now (`destroyed`), else None."""
    position: int | None
    """The position of the `SubjectForgotten` appended now, else None."""
    forgotten_at: datetime | None = None
    """When it had been forgotten before (`already_forgotten`)."""
    live_purged: int = 0
    """Messages of the subject's runs' live output removed from LIVE (`purge_live_output`)."""


async def forget(
    store: EventStore,
    sealer: Sealer,
    workspace: str,
    subject: str,
    *,
    by: str,
    reason: str | None = None,
    settle: float = DEFAULT_SETTLE,
) -> Forgotten:
    """Forget a data subject of a workspace: destroy their key, wait `settle` seconds for every
    process to drop it, then append `SubjectForgotten` (read models erase their copies).

    Idempotent: a subject without a key is `unknown` (never sealed) or `already_forgotten`
    (nothing appended); a key destroyed by a `forget` that stopped before its event is
    `completed` (the event is appended now)."""
    ref = AggregateRef(workspace, "privacy", subject_digest(workspace, subject))
    event_ = SubjectForgotten(subject=subject, key_id=None, by=by, reason=reason)
    step = await sealer.forget_key(workspace, subject)
    if step.destroyed is None:
        if step.purged_at is None:
            return Forgotten("unknown", None, None)
        history = await store.load(ref)
        last = history.events[-1] if history.events else None
        if last is not None and last.time >= step.purged_at:
            # A forget stopped after its event, before or during the purge: finish that too.
            purged = await purge_live_output(store, workspace, subject)
            return Forgotten("already_forgotten", None, None, last.time, purged)
        outcome: Outcome = "completed"
    else:
        outcome = "destroyed"
        event_ = event_.model_copy(update={"key_id": step.destroyed})
        await asyncio.sleep(settle)
    context = EventContext(source="agentbus/audit", actor=by)
    result = await store.append(ref, [event_], context=context)
    purged = await purge_live_output(store, workspace, subject)
    return Forgotten(outcome, step.destroyed, result.last_position, live_purged=purged)


async def purge_live_output(
    store: EventStore, workspace: str, subject: str, *, stream: str = LIVE_STREAM
) -> int:
    """Remove from LIVE the output of every run of `subject` that still has some there (token
    deltas and progress, which repeat the run's input and answer in clear, kept for LIVE's
    `max_age`); how many messages were removed.

    The runs are found from LIVE itself (the run ids its subjects name in the workspace), and
    each run's author from its `queued` event, where the author is in clear: no time window
    to guess, whatever the age of a run still writing. No LIVE stream: nothing to purge."""
    live = store.on_stream(stream)
    try:
        streamed = await live.subjects(f"{LIVE_PREFIX}.{workspace}.run.*.*")
    except StreamNotFound:
        return 0
    runs = {subject_.split(".")[3] for subject_ in streamed}
    theirs = []
    for run_id in sorted(runs):
        queued = await store.last_on(f"{EVENTS_PREFIX}.{workspace}.run.{run_id}.queued")
        if queued is not None and orjson.loads(queued).get("data", {}).get("author") == subject:
            theirs.append(run_id)
    purged = 0
    for run_id in theirs:
        purged += await live.purge(f"{LIVE_PREFIX}.{workspace}.run.{run_id}.>")
    if theirs:
        log.info("live output purged", workspace=workspace, runs=len(theirs), messages=purged)
    return purged


async def open_sealed_store(nc: NATS, settings: Settings) -> EventStore:
    """The event store as agentbus's roles and commands use it: every event type, personal
    fields sealed at append and opened at read (the key bucket is created if needed), with
    the settings' store timeout and key cache bound."""
    registry = default_registry()
    timeout = settings.store_timeout
    sealer = await Sealer.open(
        nc, registry, timeout=timeout, cached_keys=settings.subject_key_cache
    )
    return EventStore(nc, registry, timeout=timeout, sealer=sealer)
