"""How `agentbus up` / `agentbus serve` set up their process: the gateway's HTTP parser and the
garbage collector (docs/operations.md, "How the server process is tuned")."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS

from agentbus.db.migrations import upgrade
from agentbus.runtime import roles
from agentbus.runtime.platform import Platform
from agentbus.runtime.roles import COLLECTOR_THRESHOLDS, HTTP_PARSER, run_roles, tune_collector
from agentbus.settings import Settings


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_tune_collector_freezes_what_exists_and_raises_the_thresholds(
    restored_collector: None,
) -> None:
    assert gc.get_threshold() != COLLECTOR_THRESHOLDS
    tune_collector()
    assert gc.get_threshold() == COLLECTOR_THRESHOLDS
    assert gc.get_freeze_count() > 0


async def test_the_gateway_role_serves_http_with_httptools(
    nc: NATS, streams_ready: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers: list[Any] = []

    class Recorded(roles._HttpServer):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(roles, "_HttpServer", Recorded)
    await upgrade(database_url)
    url = nc.connected_url
    assert url is not None
    platform = await Platform.connect(Settings(), url.geturl(), database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_roles(platform, {"gateway"}, host="127.0.0.1", port=0, stop=stop)
    )
    try:
        async with asyncio.timeout(20):
            while not (servers and servers[0].started):
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        server = servers[0]
        assert HTTP_PARSER == "httptools"
        assert server.config.http == "httptools"
        assert server.config.http_protocol_class.__name__ == "HttpToolsProtocol"
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/healthz")
        assert answer.status_code == 200
    finally:
        stop.set()
        await task
        await platform.close()


async def test_the_platform_bounds_its_key_cache_by_the_setting(
    nc: NATS, streams_ready: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = nc.connected_url
    assert url is not None
    monkeypatch.setenv("AGENTBUS_SUBJECT_KEY_CACHE", "2048")
    platform = await Platform.connect(Settings(), url.geturl(), database_url)
    try:
        assert platform.store.sealer is not None
        assert platform.store.sealer._max == 2048
    finally:
        await platform.close()
    monkeypatch.setenv("AGENTBUS_SUBJECT_KEY_CACHE", "100")
    with pytest.raises(ValueError, match="subject_key_cache"):
        Settings()
