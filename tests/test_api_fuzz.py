"""schemathesis against `/openapi.json`: no request, however malformed, makes the gateway answer
5xx, and every answer conforms to the document (status code, content type, body schema).

The gateway runs as in production: the real app served by uvicorn on 127.0.0.1, over a
nats-server of its own and a fresh Postgres database, with a projector and a run worker. It
runs on an event loop of its own in a thread, because its NATS and Postgres connections belong
to the loop they were opened on, and schemathesis calls from synchronous test code (its ASGI
transport would run the app on yet another loop).

Three callers, each a bounded, deterministic run (`max-examples` 15 or 8, `deterministic`):

- a workspace owner with the workspace in the path pinned to theirs, so requests get past
  authorization into validation, the domain and the read models;
- the system key with every path parameter fuzzed (workspace ids included);
- nobody: no credentials at all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentbus.audit.erasure import open_sealed_store
from agentbus.cli.admin import bootstrap
from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.gateway.app import create_app
from agentbus.projections.catalog import all_projections
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.runtime.embedded import EmbeddedNats, EmbeddedPostgres
from agentbus.runtime.platform import Platform
from agentbus.settings import AgentConfig, Settings
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.runs import RunWorker
from tests.conftest import apply_project_streams, connect

AGENTS = {"echo": AgentConfig(executor="echo", options={"word_delay": 0})}
WORKSPACE = "acme"
# Left out on purpose: positive_data_acceptance and negative_data_rejection judge an answer by
# the schema alone, while the API refuses some schema-valid input for what it is (a cursor it
# did not hand out: 400; a min_position the history has not reached: 422; repeated rule names:
# 422) and, as pydantic's lax mode does, accepts "5" for an integer.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@dataclass(frozen=True)
class LiveApi:
    base_url: str
    system: str
    """The bootstrap system key."""
    owner: str
    """An owner key of `WORKSPACE`."""


class _Gateway:
    """The gateway app, its projector and run worker on an event loop in a thread of their own."""

    def __init__(self, nats_url: str, postgres_url: str, database: str) -> None:
        self._nats_url = nats_url
        self._postgres_url = postgres_url
        self._database = database
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self.base_url = ""
        self.system_key = ""

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the gateway did not start within 60 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        database_url = await self._create_database()
        nc = await connect(self._nats_url)
        await apply_project_streams(nc)
        store = await open_sealed_store(nc, Settings(agents=AGENTS))  # as the platform's
        await upgrade(database_url)
        engine = create_engine(database_url)
        platform = Platform(
            Settings(agents=AGENTS), self._nats_url, database_url, nc, store, engine
        )
        app = create_app(platform, rate=10_000, burst=10_000)
        key = await bootstrap(nc, store)
        assert key is not None
        stop = asyncio.Event()
        options = RuntimeOptions(lock_poll=0.2, scan_interval=0.2)
        tasks = [
            asyncio.create_task(Projector(all_projections(), store, engine, options).run(stop)),
            asyncio.create_task(RunWorker(store, nc, AGENTS, lease=5).run(stop)),
            asyncio.create_task(AutoReply(store, nc, AGENTS).run(stop)),
        ]
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if serving.done():
                    serving.result()
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            self.base_url = f"http://127.0.0.1:{port}"
            self.system_key = key.token
            self._ready.set()
            await self._stop.wait()
        finally:
            server.should_exit = True
            await serving
            stop.set()
            await asyncio.gather(*tasks)
            await engine.dispose()
            if store.sealer is not None:
                await store.sealer.close()
            await nc.close()
            await self._admin(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')

    async def _create_database(self) -> str:
        await self._admin(f'CREATE DATABASE "{self._database}"')
        return self._postgres_url.replace("/postgres?", f"/{self._database}?", 1)

    async def _admin(self, statement: str) -> None:
        admin = await asyncpg.connect(self._postgres_url)
        try:
            await admin.execute(statement)
        finally:
            await admin.close()


@pytest.fixture(scope="module")
def live_api(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: EmbeddedPostgres
) -> Iterator[LiveApi]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    nats = EmbeddedNats(directory / "nats", port=0)
    nats.start()
    gateway = _Gateway(nats.url, postgres_server.url, "fuzz_" + directory.name.replace("-", "_"))
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.base_url) as client:
            system = {"Authorization": f"Bearer {gateway.system_key}"}
            created = client.post(
                "/v1/workspaces", headers=system, json={"id": WORKSPACE, "display_name": "Acme"}
            )
            assert created.status_code == 202, created.text
            issued = client.post(
                f"/v1/workspaces/{WORKSPACE}/api-keys",
                headers=system,
                json={"name": "owner", "role": "owner"},
            )
            assert issued.status_code == 201, issued.text
            owner = issued.json()["key"]
            # something to find: a session answered by the echo agent, with a message in it
            headers = {"Authorization": f"Bearer {owner}"}
            opened = client.post(
                f"/v1/workspaces/{WORKSPACE}/sessions",
                headers=headers,
                json={"id": "s1", "agent": "echo"},
            )
            assert opened.status_code == 202, opened.text
            posted = client.post(
                f"/v1/workspaces/{WORKSPACE}/sessions/s1/messages",
                headers=headers,
                json={"text": "hello"},
            )
            assert posted.status_code == 202, posted.text
        yield LiveApi(gateway.base_url, gateway.system_key, owner)
    finally:
        gateway.stop()
        nats.stop()


def _document() -> dict[str, Any]:
    """The gateway's OpenAPI document, built at import so that every operation is a test of
    its own. The app is only built here, never served, so it needs no connections;
    `test_the_fuzzed_document_is_the_served_one` checks it is what `/openapi.json` serves."""
    return create_app(cast(Platform, None)).openapi()


def _schema(examples: int, parameters: dict[str, Any] | None = None) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "generation": {
                "mode": "all",  # valid and invalid requests
                "max-examples": examples,
                "deterministic": True,
                "database": "none",
            },
            "parameters": parameters or {},
            # SSE responses never end by themselves: read the first event, then hang up
            "max-stream-events": 1,
        }
    )
    return schemathesis.openapi.from_dict(_document(), config=config)


# (schemathesis.pytest.from_fixture would load the document from the live server, but
# schemathesis 4.32 renames test nodes through `Function._nodeid`, gone in pytest 9.2.)
# The owner's requests reach the domain and the read models: most examples go there. Elsewhere
# most requests stop at authentication or authorization, which fewer examples cover.
# (schemathesis types `parametrize()` as returning a bare `Callable`: hence the ignores below.)
in_the_workspace = _schema(15, {"ws": WORKSPACE})
anywhere = _schema(8)


def test_the_fuzzed_document_is_the_served_one(live_api: LiveApi) -> None:
    served = httpx.get(f"{live_api.base_url}/openapi.json").json()
    assert served == _document()


@in_the_workspace.parametrize()  # type: ignore[untyped-decorator]
def test_as_a_workspace_owner(case: schemathesis.Case[Any], live_api: LiveApi) -> None:
    case.call_and_validate(
        base_url=live_api.base_url,
        headers={"Authorization": f"Bearer {live_api.owner}"},
        checks=CHECKS,
    )


@anywhere.parametrize()  # type: ignore[untyped-decorator]
def test_as_the_system_key(case: schemathesis.Case[Any], live_api: LiveApi) -> None:
    case.call_and_validate(
        base_url=live_api.base_url,
        headers={"Authorization": f"Bearer {live_api.system}"},
        checks=CHECKS,
    )


@anywhere.parametrize()  # type: ignore[untyped-decorator]
def test_without_credentials(case: schemathesis.Case[Any], live_api: LiveApi) -> None:
    case.call_and_validate(base_url=live_api.base_url, checks=CHECKS)
