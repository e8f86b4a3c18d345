"""The SSE bridge on a real uvicorn server over real NATS and Postgres, read by a minimal SSE
client (httpx streaming) that behaves as a browser's EventSource does: it counts complete
events only and resumes with `Last-Event-ID`.

Exactness under 200 random disconnects, first connection by query parameter, foreign and
altered cursors (400, never data), `reset` behind retention and after a stream was re-created,
a run joined mid-run, a session with its runs on one connection, slow clients, pings, headers,
roles."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from nats.aio.client import Client as NATS

from agentbus.cli.admin import bootstrap
from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.events.catalog import default_registry
from agentbus.events.session import MessageReceived, SessionOpened
from agentbus.events.subjects import AggregateRef
from agentbus.gateway.app import create_app
from agentbus.gateway.sse import end_streams
from agentbus.runtime.embedded import EmbeddedNats
from agentbus.runtime.platform import Platform
from agentbus.settings import AgentConfig, Settings
from agentbus.store import EventStore
from agentbus.store.eventstore import ANY, NO_EVENTS
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.runs import RunWorker
from tests.conftest import apply_project_streams, connect

AGENTS = {
    "echo": AgentConfig(executor="echo", options={"word_delay": 0}),
    "slow": AgentConfig(executor="echo", options={"word_delay": 0.03}),
}
TIMEOUT = 15.0


# ---------------------------------------------------------------------------- an SSE client


@dataclass
class Event:
    id: str | None
    event: str
    data: str

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class Parser:
    """The SSE wire format as the WHATWG spec reads it (complete events only)."""

    buffer: bytes = b""
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    _fields: dict[str, list[str]] = field(default_factory=dict)

    def feed(self, chunk: bytes) -> list[Event]:
        self.buffer += chunk
        events: list[Event] = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            text = line.decode().rstrip("\r")
            if not text:
                if "data" in self._fields:
                    events.append(
                        Event(
                            self._fields.get("id", [None])[-1],
                            self._fields.get("event", ["message"])[-1],
                            "\n".join(self._fields["data"]),
                        )
                    )
                self._fields = {}
            elif text.startswith(":"):
                self.comments.append(text[1:].strip())
            else:
                name, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if name == "retry":
                    self.retry = int(value)
                else:
                    self._fields.setdefault(name, []).append(value)
        return events


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    system: str
    store: EventStore
    nc: NATS
    app: Any
    nats: Nats
    stop: Callable[[], Coroutine[Any, Any, None]]  # a coroutine: a test may run it as a task

    def followers(self) -> int:
        """Connections' subscriptions on this gateway's hubs."""
        bridge = getattr(self.app.state, "sse_bridge", None)
        return sum(hub.subscriptions for hub in bridge.hubs.values()) if bridge else 0

    async def call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def workspace(self, ws: str) -> str:
        created = await self.call(
            "POST", "/v1/workspaces", self.system, json={"id": ws, "display_name": ws}
        )
        assert created.status_code == 202, created.text
        return await self.key(ws, self.system, "owner")

    async def key(self, ws: str, by: str, role: str) -> str:
        issued = await self.call(
            "POST", f"/v1/workspaces/{ws}/api-keys", by, json={"name": role, "role": role}
        )
        assert issued.status_code == 201, issued.text
        return str(issued.json()["key"])

    async def session(self, ws: str, key: str, sid: str, agent: str | None = None) -> None:
        body: dict[str, Any] = {"id": sid} | ({"agent": agent} if agent else {})
        opened = await self.call("POST", f"/v1/workspaces/{ws}/sessions", key, json=body)
        assert opened.status_code == 202, opened.text

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, key: str, last_event_id: str | None = None, **params: str
    ) -> AsyncIterator[Stream]:
        headers = {"Authorization": f"Bearer {key}"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        async with self.http.stream("GET", path, headers=headers, params=params) as response:
            yield Stream(response)


@dataclass
class Stream:
    response: httpx.Response
    parser: Parser = field(default_factory=Parser)
    events: list[Event] = field(default_factory=list)
    ended: bool = False

    def __post_init__(self) -> None:
        self._chunks = self.response.aiter_bytes()

    async def until(self, done: Callable[[list[Event]], bool], timeout: float = TIMEOUT) -> None:
        """Read until `done(events)` (or the end of the response)."""
        async with asyncio.timeout(timeout):
            while not done(self.events):
                try:
                    chunk = await anext(self._chunks)
                except (StopAsyncIteration, httpx.RemoteProtocolError):
                    # (a connection dropped mid-response: what a browser reconnects after)
                    self.ended = True
                    return
                self.events.extend(self.parser.feed(chunk))

    async def count(self, n: int, timeout: float = TIMEOUT) -> list[Event]:
        """The first `n` events (read until there are)."""
        await self.until(lambda events: len(events) >= n, timeout)
        return self.events[:n]


async def _serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


StartGateway = Callable[..., Awaitable[Gateway]]


@dataclass
class Nats:
    """A nats-server of the test's own (file storage), which the test may restart."""

    server: EmbeddedNats
    store: EventStore

    async def restart(self) -> None:
        port = self.server.port
        self.server.stop()
        self.server = EmbeddedNats(self.server.store_dir, port=port)
        self.server.start()
        async with asyncio.timeout(15):
            while True:  # connected again, and JetStream has its streams back
                with contextlib.suppress(Exception):
                    if self.store._nc.is_connected and await self.store.last_position():
                        return
                await asyncio.sleep(0.05)


@pytest.fixture
async def nats_of_its_own(tmp_path: Path) -> AsyncIterator[Nats]:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    server.start()
    client = await connect(server.url)
    own = Nats(server, EventStore(client, default_registry(), timeout=5.0))
    try:
        await apply_project_streams(client)
        yield own
    finally:
        await client.close()
        own.server.stop()


@pytest.fixture
async def start_gateway(nats_of_its_own: Nats, database_url: str) -> AsyncIterator[StartGateway]:
    """Starts a gateway (uvicorn on 127.0.0.1) on a private nats-server; with `runs=True` a
    run worker and the auto-reply reactor too (they load a session on every message: tests
    that append thousands of messages go without). Settings overrides as keyword arguments.
    Called twice, two gateways (replicas) on the same servers."""
    store = nats_of_its_own.store
    await upgrade(database_url)
    engine = create_engine(database_url)
    stop = asyncio.Event()
    cleanups: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    key = await bootstrap(store._nc, store)
    assert key is not None

    async def start(*, runs: bool = False, **overrides: Any) -> Gateway:
        if runs and not tasks:
            tasks.append(
                asyncio.create_task(RunWorker(store, store._nc, AGENTS, lease=5).run(stop))
            )
            tasks.append(asyncio.create_task(AutoReply(store, store._nc, AGENTS).run(stop)))
        settings = Settings(agents=AGENTS, **overrides)
        platform = Platform(settings, "nats://private", database_url, store._nc, store, engine)
        app = create_app(platform, rate=10_000, burst=10_000)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        server, task, port = await _serve(app)
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)

        stopped = False

        async def stop_it() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                end_streams(app)  # as agentbus.runtime.roles stops the gateway
                server.should_exit = True
                await task
                await lifespan.__aexit__(None, None, None)
                await http.aclose()

        cleanups.append(stop_it)
        assert key is not None
        return Gateway(
            f"http://127.0.0.1:{port}",
            http,
            key.token,
            store,
            store._nc,
            app,
            nats_of_its_own,
            stop_it,
        )

    try:
        yield start
    finally:
        for cleanup in reversed(cleanups):
            await cleanup()
        stop.set()
        await asyncio.gather(*tasks)
        await engine.dispose()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Gateway:
    return await start_gateway(sse_ping_interval=0.3)


@pytest.fixture
async def gw_runs(start_gateway: StartGateway) -> Gateway:
    return await start_gateway(runs=True, sse_ping_interval=0.3)


async def append_messages(
    store: EventStore, ws: str, sid: str, count: int, text: str = "hello"
) -> None:
    ref = AggregateRef(ws, "session", sid)
    for n in range(count):
        await store.append(ref, [MessageReceived(message_id=f"m{n}", author="t", text=text)])


async def stream_ids(store: EventStore, subject: str) -> list[str]:
    return [recorded.id async for recorded in store.read(subjects=[subject])]


def ids(events: list[Event]) -> list[str]:
    return [e.json["id"] for e in events]


def by_source(events: list[Event]) -> dict[str, list[str]]:
    """Event ids per source (a session's or a run's events, a run's live output): each in
    stream order. Different sources interleave as they arrive."""
    grouped: dict[str, list[str]] = {}
    for event in events:
        body = event.json
        live = " live" if body["source"] == "agentbus/live" else ""
        grouped.setdefault(body["subject"] + live, []).append(body["id"])
    return grouped


def _count_is(kind: str, number: int, events: list[Event]) -> bool:
    return [e.event for e in events].count(kind) == number


def _last(events: list[Event]) -> str | None:
    return events[-1].event if events else None


# ---------------------------------------------------------------------------- exactness


async def test_random_disconnects_and_resumes_miss_nothing_and_repeat_nothing(
    gw: Gateway,
) -> None:
    """5,000 events appended continuously over 4 sessions while one client follows the whole
    workspace and another one session, each cut off at random points (mid-event too) and
    resuming with Last-Event-ID: joined, each received exactly the stream's sequence."""
    ws = "acme"
    owner = await gw.workspace(ws)
    sessions = [f"s{n}" for n in range(4)]
    for sid in sessions:
        await gw.session(ws, owner, sid)
    total = 5000
    rng = random.Random(7)
    whole = {f"evt.{ws}.>": 0, f"evt.{ws}.session.s1.*": 0}
    """How many events each filter has once the appender is done (0: not yet)."""
    during_flow = dict.fromkeys(whole, 0)

    async def appender() -> None:
        refs = [AggregateRef(ws, "session", sid) for sid in sessions]
        for n in range(total):
            event = MessageReceived(message_id=f"m{n}", author="a", text=f"message {n}")
            await gw.store.append(refs[n % len(refs)], [event], expect=ANY)
            if n % 50 == 49:
                await asyncio.sleep(0.05)  # a flow over several seconds, not one burst
        for subject in whole:
            whole[subject] = len(await stream_ids(gw.store, subject))

    async def follower(path: str, subject: str, disconnects: int) -> tuple[list[str], int]:
        """Follows `path`, cut off after a random number of bytes (mid-event too) until it was
        cut `disconnects` times, resuming with the id of the last complete event."""
        received: list[str] = []
        cursor: str | None = None
        cuts = 0
        while True:
            budget = rng.randint(1, 20_000)
            headers = {"Authorization": f"Bearer {owner}"}
            if cursor is not None:
                headers["Last-Event-ID"] = cursor
            async with gw.http.stream("GET", path, headers=headers) as response:
                assert response.status_code == 200, await response.aread()
                parser = Parser()
                async for chunk in response.aiter_bytes():
                    complete = 0 < whole[subject] <= len(received)
                    cut = cuts < disconnects and (len(chunk) >= budget or complete)
                    for event in parser.feed(chunk[:budget] if cut else chunk):
                        received.append(orjson.loads(event.data)["id"])
                        cursor = event.id
                    budget -= len(chunk)
                    if cut:
                        cuts += 1
                        during_flow[subject] += not whole[subject]
                        break
                    if cuts >= disconnects and 0 < whole[subject] <= len(received):
                        return received, cuts

    writing = asyncio.create_task(appender())
    (everything, cuts), (one, one_cuts) = await asyncio.wait_for(
        asyncio.gather(
            follower(f"/v1/workspaces/{ws}/events/stream", f"evt.{ws}.>", 200),
            follower(f"/v1/workspaces/{ws}/sessions/s1/events", f"evt.{ws}.session.s1.*", 60),
        ),
        45,
    )
    await writing
    assert (cuts, one_cuts) == (200, 60)
    assert min(during_flow.values()) >= 40, during_flow  # cut while events kept coming
    assert len(everything) > total
    assert everything == await stream_ids(gw.store, f"evt.{ws}.>")
    assert one == await stream_ids(gw.store, f"evt.{ws}.session.s1.*")


async def test_first_connection_resumes_from_the_query_parameter_and_the_header_wins(
    gw: Gateway,
) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    await append_messages(gw.store, "acme", "s1", 5)
    path = "/v1/workspaces/acme/sessions/s1/events"
    async with gw.stream(path, owner) as first:
        events = await first.count(6)  # opened + 5 messages
    assert [e.event for e in events[:2]] == [
        "agentbus.session.opened.v1",
        "agentbus.session.message_received.v1",
    ]
    async with gw.stream(path, owner, last_event_id=events[2].id) as resumed:
        assert ids(await resumed.count(3)) == ids(events[3:6])
    async with gw.http.stream(
        "GET",
        path,
        params={"last_event_id": events[2].id},
        headers={"Authorization": f"Bearer {owner}"},
    ) as response:
        by_query = Stream(response)
        assert ids(await by_query.count(3)) == ids(events[3:6])
    # An EventSource keeps its first URL and sends the newer cursor as the header.
    newer = events[4].id
    assert newer is not None
    async with gw.http.stream(
        "GET",
        path,
        params={"last_event_id": events[0].id},
        headers={"Authorization": f"Bearer {owner}", "Last-Event-ID": newer},
    ) as response:
        both = Stream(response)
        assert ids(await both.count(1)) == ids(events[5:6])


async def test_a_cursor_resumes_on_another_replica_and_across_a_nats_restart(
    start_gateway: StartGateway,
) -> None:
    one = await start_gateway(sse_ping_interval=0.3)
    two = await start_gateway(sse_ping_interval=0.3)
    owner = await one.workspace("acme")
    await one.session("acme", owner, "s1")
    await append_messages(one.store, "acme", "s1", 3)
    path = "/v1/workspaces/acme/sessions/s1/events"
    subject = "evt.acme.session.s1.*"
    async with one.stream(path, owner) as first:
        cursor = (await first.count(4))[-1].id
    await append_messages(one.store, "acme", "s1", 2)
    async with two.stream(path, owner, last_event_id=cursor) as elsewhere:
        more = await elsewhere.count(2)  # the other replica accepts the cursor
    assert ids(more) == (await stream_ids(one.store, subject))[4:6]
    async with one.stream(path, owner, last_event_id=more[-1].id) as following:
        await following.until(lambda _: len(following.parser.comments) >= 1)  # following
        await one.nats.restart()
        await append_messages(one.store, "acme", "s1", 2)
        # The open stream goes on after the restart, or ends and is resumed: nothing lost.
        await following.until(lambda events: len(events) >= 2)
        received = following.events
    if len(received) < 2:
        async with two.stream(path, owner, last_event_id=_last_id(more, received)) as resumed:
            received += await resumed.count(2 - len(received))
    assert ids(more + received) == (await stream_ids(one.store, subject))[4:8]
    # A cursor from before the restart is still valid (same stream, same epoch).
    async with two.stream(path, owner, last_event_id=cursor) as again:
        assert ids(await again.count(4)) == (await stream_ids(one.store, subject))[4:8]


def _last_id(*lists: list[Event]) -> str | None:
    return next((events[-1].id for events in reversed(lists) if events), None)


# ---------------------------------------------------------------------------- cursors


async def test_foreign_altered_and_malformed_cursors_are_400_and_never_data(gw: Gateway) -> None:
    owner = await gw.workspace("acme")
    other = await gw.workspace("other")
    for ws, key in (("acme", owner), ("other", other)):
        await gw.session(ws, key, "s1")
        await gw.session(ws, key, "s2")
    async with gw.stream("/v1/workspaces/other/sessions/s1/events", other) as theirs:
        their_cursor = (await theirs.count(1))[0].id
    async with gw.stream("/v1/workspaces/acme/sessions/s2/events", owner) as mine:
        s2_cursor = (await mine.count(1))[0].id
    assert their_cursor
    assert s2_cursor
    payload, mac = s2_cursor.split(".")[1:]
    altered = f"c1.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
    cases = {
        "another workspace's": their_cursor,
        "another session's": s2_cursor,
        "altered": altered,
        "malformed": "not-a-cursor",
        "bad base64": "c1.!!!.???",
    }
    for what, cursor in cases.items():
        for headers, params in (({"Last-Event-ID": cursor}, {}), ({}, {"last_event_id": cursor})):
            response = await gw.http.get(
                "/v1/workspaces/acme/sessions/s1/events",
                headers={"Authorization": f"Bearer {owner}", **headers},
                params=params,
            )
            assert response.status_code == 400, (what, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert "event:" not in response.text
    # The same scope rule for runs and workspace streams (and their type filters).
    async with gw.stream("/v1/workspaces/acme/events/stream", owner) as everything:
        workspace_cursor = (await everything.count(1))[0].id
    assert workspace_cursor
    for path, params in (
        ("/v1/workspaces/acme/events/stream", {"types": "agentbus.session.opened.v1"}),
        ("/v1/workspaces/acme/sessions/s1/events", {}),
        ("/v1/workspaces/acme/sessions/s1/events", {"include": "runs"}),
    ):
        response = await gw.http.get(
            path,
            params=params,
            headers={"Authorization": f"Bearer {owner}", "Last-Event-ID": workspace_cursor},
        )
        assert response.status_code == 400, (path, params, response.text)


async def test_reset_when_the_cursor_is_behind_retention(gw: Gateway) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    path = "/v1/workspaces/acme/sessions/s1/events"
    async with gw.stream(path, owner) as stream:
        old = (await stream.count(1))[0].id
    # The stream now keeps its newest 100 events only (identities stay cached by the gateway).
    await _update_stream(gw.nc, "EVENTS", max_msgs=100, discard="old")
    await append_messages(gw.store, "acme", "s1", 150)
    async with gw.stream(path, owner, last_event_id=old) as stream:
        await stream.until(lambda events: False)  # to the end of the response
    assert stream.ended
    assert stream.parser.retry == 3000
    [reset] = stream.events
    assert reset.event == "reset"
    assert reset.json["reason"] == "behind_retention"
    # Its id is a fresh cursor: an EventSource reconnects with it and gets what is retained.
    async with gw.stream(path, owner, last_event_id=reset.id) as again:
        events = await again.count(5)
    assert all(e.event == "agentbus.session.message_received.v1" for e in events)
    # A cursor still within retention resumes normally.
    async with gw.stream(path, owner, last_event_id=events[0].id) as fine:
        assert ids(await fine.count(2)) == ids(events[1:3])


async def test_reset_when_the_stream_was_re_created(gw: Gateway) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    await append_messages(gw.store, "acme", "s1", 3)
    path = "/v1/workspaces/acme/sessions/s1/events"
    async with gw.stream(path, owner) as stream:
        cursor = (await stream.count(4))[1].id
        # Deleted and re-created under the connection's feet: the open stream resets, or
        # ends (its hub's reader failed) and the reconnect resets.
        await _recreate_events(gw)
        await stream.until(lambda events: _last(events) == "reset", timeout=5)
    assert stream.ended or stream.events[-1].json["reason"] == "stream_recreated"
    await gw.store.append(
        AggregateRef("acme", "session", "s1"), [SessionOpened(channel="api")], expect=NO_EVENTS
    )
    await append_messages(gw.store, "acme", "s1", 5)  # new positions 1..6 overlap the old ones
    async with gw.stream(path, owner, last_event_id=cursor) as resumed:
        await resumed.until(lambda events: False)
    [reset] = resumed.events
    assert (reset.event, reset.json["reason"]) == ("reset", "stream_recreated")
    async with gw.stream(path, owner, last_event_id=reset.id) as fresh:
        assert [e.event for e in await fresh.count(2)][:1] == ["agentbus.session.opened.v1"]


# ---------------------------------------------------------------------------- runs


async def test_a_run_joined_mid_run_shows_its_output_from_the_start_and_its_end(
    gw_runs: Gateway,
) -> None:
    gw = gw_runs
    owner = await gw.workspace("acme")
    words = " ".join(f"w{n}" for n in range(40))  # ~1.2 s of output at 30 ms a word
    queued = await gw.call(
        "POST", "/v1/workspaces/acme/runs", owner, json={"agent": "slow", "input": words}
    )
    assert queued.status_code == 202, queued.text
    run_id = queued.json()["id"]
    path = f"/v1/workspaces/acme/runs/{run_id}/stream"
    await _wait_for_live_output(gw, "acme", run_id)
    async with gw.stream(path, owner) as stream:
        await stream.until(lambda events: _last(events) == "agentbus.run.succeeded.v1")
    events = stream.events
    transitions = [e.event for e in events if not e.event.endswith(("delta.v1", "progress.v1"))]
    assert transitions[:2] == ["agentbus.run.queued.v1", "agentbus.run.started.v1"]
    deltas = [e.json for e in events if e.event == "agentbus.run.delta.v1"]
    assert "".join(d["data"]["text"] for d in deltas) == f"echo: {words}"  # from the start
    assert [d["data"]["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert events[-1].json["data"]["output"] == f"echo: {words}"  # after all its output
    # Resumed from any event, each source continues exactly after what was received.
    for cut in range(0, len(events) - 1, 4):
        async with gw.stream(path, owner, last_event_id=events[cut].id) as resumed:
            rest = await resumed.count(len(events) - cut - 1)
        assert by_source(rest) == by_source(events[cut + 1 :])


async def test_a_session_with_its_runs_on_one_connection(gw_runs: Gateway) -> None:
    """What a chat page needs: messages, each run's transitions and live output, the reply,
    with all of a run before the session's run_released, resumable anywhere in between."""
    gw = gw_runs
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "chat", agent="slow")
    path = "/v1/workspaces/acme/sessions/chat/events"
    released = "agentbus.session.run_released.v1"
    async with gw.stream(path, owner, include="runs") as stream:
        await stream.count(1)
        for number, text in enumerate(("hello there", "and again"), start=1):
            posted = await gw.call(
                "POST", "/v1/workspaces/acme/sessions/chat/messages", owner, json={"text": text}
            )
            assert posted.status_code == 202
            await stream.until(partial(_count_is, released, number))
    events = stream.events
    kinds = [e.event for e in events]
    assert kinds.count("agentbus.run.succeeded.v1") == 2
    assert kinds.count("agentbus.session.message_sent.v1") == 2
    assert len(set(ids(events))) == len(events)
    _check_runs_of_a_session(events)
    # Replayed from the start, and resumed from every few events: the same, per source.
    async with gw.stream(path, owner, include="runs") as replay:
        again = await replay.count(len(events))
    assert by_source(again) == by_source(events)
    _check_runs_of_a_session(again)
    for cut in range(0, len(events) - 1, 3):
        async with gw.stream(path, owner, last_event_id=events[cut].id, include="runs") as rest:
            after = await rest.count(len(events) - cut - 1)
        assert by_source(after) == by_source(events[cut + 1 :])


def _check_runs_of_a_session(events: list[Event]) -> None:
    """Each run: between its run_assigned and run_released, its transitions from queued to
    succeeded, its whole live output before its final transition."""
    kinds = [e.event for e in events]
    starts = [i for i, kind in enumerate(kinds) if kind == "agentbus.session.run_assigned.v1"]
    assert len(starts) == 2
    for assigned in starts:
        end = kinds.index("agentbus.session.run_released.v1", assigned)
        run_id = events[assigned].json["data"]["run_id"]
        of_run = [e for e in events if e.json["subject"] == f"run/{run_id}"]
        assert of_run == [e for e in events[assigned:end] if e.json["subject"] == f"run/{run_id}"]
        transitions = [e.event for e in of_run if e.json["source"] != "agentbus/live"]
        assert transitions[:2] == ["agentbus.run.queued.v1", "agentbus.run.started.v1"]
        assert of_run[-1].event == "agentbus.run.succeeded.v1"
        text = "".join(e.json["data"]["text"] for e in of_run if e.event.endswith("delta.v1"))
        assert text == of_run[-1].json["data"]["output"]


# ---------------------------------------------------------------------------- hygiene


async def test_connection_hygiene_headers_retry_pings_and_a_gone_client_is_forgotten(
    gw: Gateway,
) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    await gw.session("acme", owner, "s2")
    before = await _consumers(gw.nc)
    path = "/v1/workspaces/acme/sessions/s1/events"
    async with gw.stream(path, owner) as stream:
        headers = stream.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-store"
        assert headers["x-accel-buffering"] == "no"
        assert "content-length" not in headers
        await stream.until(lambda _: len(stream.parser.comments) >= 2, timeout=5)
        assert stream.parser.retry == 3000
        assert stream.parser.comments[:2] == ["ping", "ping"]
        assert gw.followers() == 1
        # Twenty more followers share the gateway's one consumer of the stream (its hub).
        async with contextlib.AsyncExitStack() as more:
            others = [
                await more.enter_async_context(
                    gw.stream(f"/v1/workspaces/acme/sessions/s{1 + n % 2}/events", owner)
                )
                for n in range(20)
            ]
            for other in others:
                await other.count(1)
            await _eventually(lambda: gw.followers() == 21)
            assert await _consumers(gw.nc) == before + 1
    # Gone clients are forgotten at once (their readers stopped, their subscriptions dropped).
    await _eventually(lambda: gw.followers() == 0, timeout=2)


async def test_a_client_too_slow_is_disconnected_at_the_bound_and_resumes(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(sse_buffer_events=50, sse_ping_interval=0.3)
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    path = "/v1/workspaces/acme/sessions/s1/events"
    big = "x" * 30_000
    async with gw.stream(path, owner) as stream:
        first = await stream.count(1)
        # The client stops reading; 600 events of 30 kB (18 MB) fill every socket buffer.
        await append_messages(gw.store, "acme", "s1", 600, text=big)
        await asyncio.sleep(1.0)
        await stream.until(lambda events: False, timeout=20)  # what was sent, then the end
    assert stream.ended
    received = stream.events
    assert 1 < len(received) < 601
    assert ids(received) == (await stream_ids(gw.store, "evt.acme.session.s1.*"))[: len(received)]
    async with gw.stream(path, owner, last_event_id=received[-1].id) as resumed:
        rest = await resumed.count(601 - len(received), timeout=20)
    assert ids(first + received[1:] + rest) == await stream_ids(gw.store, "evt.acme.session.s1.*")


async def test_a_stopping_gateway_ends_its_streams_cleanly(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    async with gw.stream("/v1/workspaces/acme/sessions/s1/events", owner) as stream:
        await stream.count(1)
        stopping = asyncio.create_task(gw.stop())
        await stream.until(lambda events: False, timeout=5)  # the end of the response
        await stopping
    assert stream.ended
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_roles_filters_and_visibility(gw: Gateway) -> None:
    owner = await gw.workspace("acme")
    await gw.session("acme", owner, "s1")
    viewer = await gw.key("acme", owner, "viewer")
    auditor = await gw.key("acme", owner, "auditor")
    workspace = "/v1/workspaces/acme/events/stream"
    denied = await gw.call("GET", workspace, viewer)
    assert denied.status_code == 403
    assert denied.headers["content-type"].startswith("application/problem+json")
    async with gw.stream("/v1/workspaces/acme/sessions/s1/events", viewer) as stream:
        assert (await stream.count(1))[0].event == "agentbus.session.opened.v1"
    types = "agentbus.session.opened.v1,agentbus.workspace.created.v1"
    async with gw.stream(workspace, auditor, types=types) as stream:
        events = await stream.count(2)
    assert sorted(e.event for e in events) == sorted(types.split(","))
    for bad in ("agentbus.nothing.here.v1", "agentbus.session.opened.v9", "nonsense"):
        response = await gw.call("GET", workspace, auditor, params={"types": bad})
        assert response.status_code == 400, response.text
    # Another workspace, a session or run that does not exist: 404, like everywhere else.
    other = await gw.workspace("other")
    assert (await gw.call("GET", workspace, other)).status_code == 404
    missing = await gw.call("GET", "/v1/workspaces/acme/sessions/nope/events", owner)
    assert missing.status_code == 404
    assert (await gw.call("GET", "/v1/workspaces/acme/runs/nope/stream", owner)).status_code == 404


# ---------------------------------------------------------------------------- helpers


async def _update_stream(nc: NATS, stream: str, **changes: Any) -> None:
    info = orjson.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"")).data)
    config = {**info["config"], **changes}
    reply = orjson.loads(
        (await nc.request(f"$JS.API.STREAM.UPDATE.{stream}", orjson.dumps(config))).data
    )
    assert "error" not in reply, reply


async def _recreate_events(gw: Gateway) -> None:
    reply = orjson.loads((await gw.nc.request("$JS.API.STREAM.DELETE.EVENTS", b"")).data)
    assert reply.get("success"), reply
    await apply_project_streams(gw.nc)


async def _eventually(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def _consumers(nc: NATS) -> int:
    info = orjson.loads((await nc.request("$JS.API.STREAM.INFO.EVENTS", b"")).data)
    return int(info["state"]["consumer_count"])


async def _wait_for_live_output(gw: Gateway, ws: str, run_id: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            reply = await gw.nc.request(
                "$JS.API.DIRECT.GET.LIVE",
                orjson.dumps({"last_by_subj": f"live.{ws}.run.{run_id}.delta"}),
            )
            if not (reply.headers or {}).get("Status"):
                return
            await asyncio.sleep(0.05)
