"""Scenario `http_ingest`: messages posted through the whole HTTP gateway (authentication,
validation, the session's decision, the append), beside a bare Starlette endpoint that only
parses the body and publishes it to JetStream, measured in the same run by the same client.

Processes. Each app is served by uvicorn in a process of its own, configured as `agentbus up`
serves the gateway (one process, `lifespan="on"`, no access log, httptools as the HTTP
parser, the garbage collector tuned by `tune_collector`), and the load comes from this
process. On 2 cores, serving in the benchmark process would make the server's one event loop
share its CPU with the client's, and the figure would be the sum of both costs; in separate
processes the OS puts the server and the client on different cores, and nats-server takes
what is left. Both servers run for the whole scenario; only the one being measured is busy.

- **gateway**: `create_app(platform, rate=1e9, burst=1e9)` over `Platform.connect` (its own
  NATS connection and Postgres engine), no projector and no workers: ingest only. Sessions
  have no agent, so posting starts no run. Posts carry an owner API key.
- **bare**: a Starlette app with one route of the same path; it parses the JSON body, puts the
  text into a CloudEvent of the same shape and size as the gateway's `message_received`, and
  publishes it with a `Nats-Msg-Id` to the same stream and subject shape, awaiting the PubAck
  (the fastest raw way of the `append` scenario: one wildcard reply subscription). No
  authentication, no load of the session, no expected-sequence check.

The client: `--concurrency` keep-alive HTTP/1.1 connections (default 512), each with one
request in flight and a session of its own (a fresh one per measurement, so every
measurement starts from empty sessions), written on asyncio streams: ~40-60 µs of CPU per
post, well below either server's cost. (httpx's `AsyncClient` was measured first: ~3.7 ms of
client CPU per post with 64 connections, 204 posts/s against a bare endpoint that serves
3,400/s; every figure would have been httpx's.) Every answer must be a 202, or the
measurement aborts.

Figures: posts per second through the gateway against the bare endpoint (goal 0.7), with and
without an `Idempotency-Key` (a fresh key per post), and each server's CPU per post, measured
once per round in a rotating order (median of the rounds); then, after each round's
throughput measurements, the latency p50 / p99 of one client posting alone (at
`--concurrency` the servers are saturated and the latency is only concurrency / throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from nats.aio.client import Client as NATS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentbus.cli.admin import issue_key
from agentbus.db.migrations import upgrade
from agentbus.domain.handling import handle
from agentbus.domain.session import SESSION, OpenSession
from agentbus.events import AggregateRef, EventContext, uuid7
from agentbus.events.session import MessageReceived
from agentbus.gateway.app import create_app
from agentbus.runtime.platform import Platform
from agentbus.runtime.roles import HTTP_PARSER, tune_collector
from agentbus.settings import Settings
from agentbus.store.connection import connect_nats
from agentbus.store.eventstore import encode_event
from benchmarks import Figure, Options
from benchmarks.append import _ReplyInbox, _sequence
from benchmarks.env import Env
from benchmarks.measure import Sample, throughput
from benchmarks.servers import served

NAME = "http_ingest"
DESCRIPTION = "messages posted through the HTTP gateway vs a bare Starlette JetStream publisher"
GOAL = 0.7
DEFAULT_POSTS = 5_000
DEFAULT_WARMUP = 1_000
LATENCY_CLIENTS = 1
"""Clients of the latency measurement: one, so that no post queues behind another."""
LATENCY_SHARE = 10
MIN_LATENCY_POSTS = 200
"""A latency measurement posts max(MIN_LATENCY_POSTS, posts / LATENCY_SHARE) (500 by default)."""
MODULE = "benchmarks.http_ingest"
"""Where `python -m benchmarks.http_ingest` runs from."""
TEXT = (
    "Could you summarise yesterday's incident report and draft a reply to the customer? "
    "Keep it short and mention that the fix ships on Thursday."
)
BODY = orjson.dumps({"text": TEXT})

CONTENDERS = ("gateway", "gateway, Idempotency-Key", "bare")
KEYED = {"gateway, Idempotency-Key"}
"""Contenders whose posts carry a fresh `Idempotency-Key` each."""


async def run(env: Env, options: Options) -> list[Figure]:
    count = None if options.seconds else (options.events or DEFAULT_POSTS)
    warmup = DEFAULT_WARMUP if options.warmup is None else options.warmup
    latency_posts = max(MIN_LATENCY_POSTS, (count or DEFAULT_POSTS) // LATENCY_SHARE)
    database_url = await env.postgres_url()
    await upgrade(database_url)
    store = env.event_store()
    system = await issue_key(store, "http_ingest benchmark", None, "owner")
    workspace = env.workspace
    sessions = (f"s{n}" for n in itertools.count())

    async with (
        served(MODULE, "gateway", env, database_url) as gateway,
        served(MODULE, "bare", env, database_url) as bare,
    ):
        owner = await _workspace_owner(gateway.port, workspace, system.token)

        async def measure(
            name: str, clients: int, posts: int | None, seconds: float | None
        ) -> _Measurement:
            server = bare if name == "bare" else gateway
            ids = [next(sessions) for _ in range(clients)]
            if server is gateway:  # the bare endpoint needs no session to exist
                await asyncio.gather(*(_open_session(store, workspace, sid) for sid in ids))
            connections = await asyncio.gather(
                *(
                    _Client.open(server.port, workspace, sid, owner, keyed=name in KEYED)
                    for sid in ids
                )
            )
            try:
                cpu = server.cpu_seconds()
                sample = await throughput(
                    [c.post for c in connections], count=posts, seconds=seconds
                )
                server_cpu = server.cpu_seconds() - cpu
            finally:
                for connection in connections:
                    connection.close()
            latencies = sorted(itertools.chain.from_iterable(c.latencies for c in connections))
            return _Measurement(sample, server_cpu, latencies)

        if warmup:
            for name in CONTENDERS:
                await measure(name, options.concurrency, warmup, None)
        loaded: dict[str, list[_Measurement]] = {name: [] for name in CONTENDERS}
        light: dict[str, list[_Measurement]] = {name: [] for name in CONTENDERS}
        for index in range(options.rounds):
            shift = index % len(CONTENDERS)
            rotation = [*CONTENDERS[shift:], *CONTENDERS[:shift]]
            for name in rotation:
                loaded[name].append(
                    await measure(name, options.concurrency, count, options.seconds)
                )
            for name in rotation:
                light[name].append(await measure(name, LATENCY_CLIENTS, latency_posts, None))

    bare_rate = _median(m.sample.per_second for m in loaded["bare"])
    figures = []
    for name in CONTENDERS:
        measured = loaded[name]
        is_bare = name == "bare"
        figures.append(
            Figure(
                name="  bare endpoint: posts/s" if is_bare else f"{name}: posts/s",
                value=_median(m.sample.per_second for m in measured),
                unit="posts/s",
                ceiling_name=None if is_bare else "bare Starlette endpoint + JetStream publish",
                ceiling_value=None if is_bare else bare_rate,
                goal=None if is_bare else GOAL,
                samples=tuple(m.sample.per_second for m in measured),
                cpu_us_per_op=_median(m.sample.cpu_us_per_op for m in measured),
            )
        )
    for name in CONTENDERS:
        label = "bare" if name == "bare" else name
        per_post = [m.server_cpu / m.sample.ops * 1e6 for m in loaded[name]]
        figures.append(
            Figure(
                name=f"  {label}: server CPU per post",
                value=_median(per_post),
                unit="µs",
                samples=tuple(per_post),
            )
        )
        for share in (0.5, 0.99):
            values = [m.percentile(share) for m in light[name]]
            figures.append(
                Figure(
                    name=f"  {label}: latency p{share * 100:g}, one client",
                    value=_median(values),
                    unit="ms",
                    samples=tuple(values),
                )
            )
    return figures


@dataclass(frozen=True)
class _Measurement:
    sample: Sample
    server_cpu: float
    """CPU seconds the server process used during the measurement."""
    latencies: list[float]
    """Seconds per post as the client saw them, sorted."""

    def percentile(self, share: float) -> float:
        return self.latencies[min(len(self.latencies) - 1, int(share * len(self.latencies)))] * 1e3


def _median(values: Any) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------- the client


class _Client:
    """One keep-alive HTTP/1.1 connection posting into one session, a request at a time."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: bytes,
        keyed: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._head = head
        self._keys = (f"{secrets.token_hex(8)}-{n}" for n in itertools.count()) if keyed else None
        self.latencies: list[float] = []

    @classmethod
    async def open(
        cls, port: int, workspace: str, session: str, key: str, *, keyed: bool
    ) -> _Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST /v1/workspaces/{workspace}/sessions/{session}/messages HTTP/1.1\r\n"
            f"host: 127.0.0.1:{port}\r\n"
            f"authorization: Bearer {key}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(BODY)}\r\n"
        ).encode()
        return cls(reader, writer, head, keyed)

    async def post(self) -> None:
        started = time.perf_counter()
        if self._keys is None:
            self._writer.write(self._head + b"\r\n" + BODY)
        else:
            key = f"idempotency-key: {next(self._keys)}\r\n\r\n".encode()
            self._writer.write(self._head + key + BODY)
        head = await self._reader.readuntil(b"\r\n\r\n")
        at = head.lower().find(b"content-length:")
        length = int(head[at + 15 : head.index(b"\r\n", at)]) if at >= 0 else 0
        body = await self._reader.readexactly(length)
        if head[9:12] != b"202":
            raise RuntimeError(f"a post was answered {head[9:12].decode()}: {body[:300]!r}")
        self.latencies.append(time.perf_counter() - started)

    def close(self) -> None:
        self._writer.close()


async def _open_session(store: Any, workspace: str, session: str) -> None:
    await handle(store, SESSION, AggregateRef(workspace, "session", session), OpenSession("api"))


async def _workspace_owner(port: int, workspace: str, system_key: str) -> str:
    """Create the workspace and an owner key through the gateway, as a client would."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        headers = {"Authorization": f"Bearer {system_key}"}
        created = await client.post(
            "/v1/workspaces", headers=headers, json={"id": workspace, "display_name": workspace}
        )
        created.raise_for_status()
        issued = await client.post(
            f"/v1/workspaces/{workspace}/api-keys",
            headers=headers,
            json={"name": "bench", "role": "owner"},
        )
        issued.raise_for_status()
        return str(issued.json()["key"])


# ---------------------------------------------------------------------------- the servers


def _bare_app(nc: NATS) -> Starlette:
    """One POST route: parse the body, publish a CloudEvent carrying its text, await the
    PubAck, answer 202 with the stream position."""
    inbox = _ReplyInbox(nc)
    ref = AggregateRef("shape", "session", "shape")
    event = MessageReceived(message_id=uuid7(), author="apikey:0123456789abcdef", text=TEXT)
    envelope = orjson.loads(encode_event(ref, event, uuid7(), EventContext.DEFAULT))
    msg_ids = (f"{secrets.token_hex(12)}-{n}" for n in itertools.count())

    async def post(request: Request) -> JSONResponse:
        body = orjson.loads(await request.body())
        workspace, session = request.path_params["ws"], request.path_params["sid"]
        cloudevent = {**envelope, "data": {**envelope["data"], "text": body["text"]}}
        reply = await inbox.request(
            f"evt.{workspace}.session.{session}.message_received",
            orjson.dumps(cloudevent),
            {"Nats-Msg-Id": next(msg_ids)},
        )
        return JSONResponse({"position": _sequence(reply)}, status_code=202)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await inbox.start()
        try:
            yield
        finally:
            await inbox.stop()

    route = Route("/v1/workspaces/{ws}/sessions/{sid}/messages", post, methods=["POST"])
    return Starlette(routes=[route], lifespan=lifespan)


async def _serve(kind: str, nats_url: str, database_url: str, port_file: Path) -> None:
    platform: Platform | None = None
    nc: NATS | None = None
    if kind == "gateway":
        platform = await Platform.connect(Settings(agents={}), nats_url, database_url)
        app: Any = create_app(platform, rate=1e9, burst=1e9)
    else:
        nc = await connect_nats(nats_url, name="agentbus-bench-bare")
        app = _bare_app(nc)
    # As `agentbus up` serves the gateway (agentbus.runtime.roles), on an ephemeral port, plus
    # uvicorn's signal handling: the parent stops this process with SIGTERM. (uvicorn binds
    # the socket itself, as in production: asyncio sets TCP_NODELAY only on sockets whose
    # protocol is IPPROTO_TCP, and a plain socket.socket() bound here would have 0, costing
    # every response ~40 ms of Nagle and delayed ACK.)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=HTTP_PARSER,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        written = port_file.with_suffix(".tmp")
        written.write_text(str(port))
        written.rename(port_file)
        await serving
    finally:
        if platform is not None:
            await platform.close()
        if nc is not None:
            await nc.close()


def main(argv: Sequence[str]) -> None:
    """`python -m benchmarks.http_ingest gateway|bare NATS_URL DATABASE_URL PORT_FILE`: serve
    one of the two apps on 127.0.0.1 (an ephemeral port, written to PORT_FILE once serving)."""
    kind, nats_url, database_url, port_file = argv
    if kind not in ("gateway", "bare"):
        raise SystemExit(f"serve gateway or bare, not {kind!r}")
    tune_collector()  # as `agentbus up` and `agentbus serve` run their roles
    asyncio.run(_serve(kind, nats_url, database_url, Path(port_file)))


if __name__ == "__main__":
    main(sys.argv[1:])
