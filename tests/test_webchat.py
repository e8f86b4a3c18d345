"""The web chat page (`/`) in a real browser: Debian's chromium driven by Playwright, against a
gateway, a projector and a worker running as `agentbus serve` processes on a nats-server of the
module's own and the session's Postgres.

Without chromium these tests are skipped, unless AGENTBUS_BROWSER_TESTS=required (CI sets it:
.ci/run installs chromium), where a missing browser fails them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from agentbus.cli.admin import add_member, bootstrap, create_user, create_workspace
from agentbus.db.migrations import upgrade
from agentbus.events.catalog import default_registry
from agentbus.runtime.embedded import EmbeddedNats, EmbeddedPostgres
from agentbus.store import EventStore
from tests.conftest import apply_project_streams, connect

CHROMIUM = Path(os.environ.get("AGENTBUS_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("AGENTBUS_BROWSER_TESTS") == "required"
if not CHROMIUM.exists():
    if REQUIRED:
        raise RuntimeError(f"browser tests are required but {CHROMIUM} is missing")
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

# Flags for a headless chromium in a sandbox with no outside network (see the machine's notes):
# without the background-networking flags it keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AGENTS = {
    "echo": {"executor": "echo"},
    # Slow enough to restart the gateway in the middle of a reply.
    "slow": {"executor": "echo", "options": {"word_delay": 0.25}},
}
PASSWORD = "correct horse battery"
TIMEOUT = 20_000  # ms, for the page's expectations

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Deployment:
    """`agentbus serve` processes on real servers; the gateway can be killed and restarted."""

    url: str
    port: int
    env: dict[str, str]
    logs: Path
    store: EventStore
    gateway: subprocess.Popen[bytes] | None = None

    def start_gateway(self) -> None:
        self.gateway = _serve("gateway", self.env, self.logs / "gateway.log", self.port)
        _wait_ready(f"{self.url}/readyz", self.gateway)

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGKILL)
        self.gateway.wait(10)

    async def user_in_workspace(self) -> tuple[str, str]:
        """A new user, owner of a new workspace."""
        user, ws = f"u{secrets.token_hex(4)}", f"w{secrets.token_hex(4)}"
        await create_user(self.store, user, "A person", PASSWORD)
        await create_workspace(self.store, ws, "Browser tests", None)
        await add_member(self.store, ws, user, "owner")
        return user, ws


def _serve(role: str, env: dict[str, str], log: Path, port: int | None = None) -> Any:
    command = [sys.executable, "-m", "agentbus", "serve", "--role", role]
    if port is not None:
        command += ["--port", str(port)]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="module")
async def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: EmbeddedPostgres
) -> AsyncIterator[Deployment]:
    base = tmp_path_factory.mktemp("webchat")
    nats_server = EmbeddedNats(base / "nats", port=0)
    nats_server.start()
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_server.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database_url = postgres_server.url.replace("/postgres?", f"/{name}?", 1)
    nc = await connect(nats_server.url)
    processes: list[subprocess.Popen[bytes]] = []
    deployment: Deployment | None = None
    try:
        await apply_project_streams(nc)
        await upgrade(database_url)
        store = EventStore(nc, default_registry(), timeout=5.0)
        await bootstrap(nc, store)
        port = _free_port()
        env = {
            **os.environ,
            "AGENTBUS_NATS_URL": nats_server.url,
            "AGENTBUS_DATABASE_URL": database_url,
            "AGENTBUS_AGENTS": json.dumps(AGENTS),
            "AGENTBUS_LOG_FORMAT": "json",
            "AGENTBUS_LOG_LEVEL": "warning",
        }
        processes.append(_serve("projector,worker", env, base / "back.log"))
        deployment = Deployment(f"http://127.0.0.1:{port}", port, env, base, store)
        deployment.start_gateway()
        yield deployment
    finally:
        if deployment is not None and deployment.gateway is not None:
            processes.append(deployment.gateway)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
            if process.poll() is None:
                process.kill()
        await nc.close()
        nats_server.stop()
        admin = await asyncpg.connect(postgres_server.url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) per test, phone-sized: the layout the page must
    work on; errors in the page's JavaScript fail the test."""
    context = await browser.new_context(viewport={"width": 390, "height": 780})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert errors == [], f"JavaScript errors in the page: {errors}"


async def log_in(page: Page, deployment: Deployment, user: str, ws: str) -> None:
    await page.goto(deployment.url + "/")
    await page.get_by_label("User").fill(user)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_label("Workspace").fill(ws)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("navigation", name="Sessions")).to_be_visible(timeout=TIMEOUT)


async def new_chat(page: Page, title: str, agent: str = "echo") -> None:
    await page.get_by_label("New chat").fill(title)
    await page.get_by_label("Agent").select_option(agent)
    await page.get_by_role("button", name="Start").click()
    await expect(page.get_by_role("heading", name=title)).to_be_visible(timeout=TIMEOUT)


async def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    await box.fill(text)
    await box.press("Enter")
    await expect(box).to_have_value("", timeout=TIMEOUT)


def replies(page: Page) -> Any:
    """The agent's stored replies (bubbles of a run that got its final message)."""
    return page.locator("li.message.out[data-run-id][data-message-id] .text")


async def test_a_chat_round_trip_with_the_echo_agent(page: Page, deployment: Deployment) -> None:
    user, ws = await deployment.user_in_workspace()
    await page.goto(deployment.url + "/")
    await page.get_by_label("User").fill(user)
    await page.get_by_label("Password").fill("wrong password")
    await page.get_by_label("Workspace").fill(ws)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert").first).to_contain_text(
        "wrong user or password", timeout=TIMEOUT
    )

    await log_in(page, deployment, user, ws)
    await new_chat(page, "Round trip")
    await send(page, "hello there, agent")
    await expect(replies(page)).to_have_text(["echo: hello there, agent"], timeout=TIMEOUT)
    log = page.get_by_role("log", name="Messages")
    await expect(log.locator("li.message.in .text")).to_have_text(["hello there, agent"])
    await expect(page.locator("li.message.out .chip")).to_have_text(["done"])
    # The reply streamed in token by token, and what streamed is what was stored.
    await expect(page.locator("li.message.out[data-run-id]")).to_have_attribute(
        "data-streamed", "echo: hello there, agent"
    )

    # A reload replays the session from the stream: everything once, nothing twice.
    await page.reload()
    await expect(replies(page)).to_have_text(["echo: hello there, agent"], timeout=TIMEOUT)
    await expect(log.locator("li.message.in .text")).to_have_text(["hello there, agent"])
    await expect(page.get_by_role("heading", name="Round trip")).to_be_visible()
    await page.get_by_role("button", name="Sessions").click()  # the list, on a phone
    await expect(page.get_by_role("button", name="Round trip")).to_contain_text("2 messages")
    await page.get_by_role("button", name="Round trip").click()

    # Keyboard only: the skip link leads to the message box, which sends on Enter.
    await page.get_by_role("link", name="Skip to the message box").focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()
    await page.keyboard.type("second message")
    await page.keyboard.press("Enter")
    await expect(replies(page)).to_have_text(
        ["echo: hello there, agent", "echo: second message"], timeout=TIMEOUT
    )

    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_role("button", name="Log in")).to_be_visible(timeout=TIMEOUT)
    async with httpx.AsyncClient(base_url=deployment.url) as http:
        cookies = await page.context.cookies()
        assert not [c for c in cookies if c["name"] == "agentbus_session" and c["value"]]
        assert (await http.get("/v1/me")).status_code == 401


async def test_an_approval_by_click(page: Page, deployment: Deployment) -> None:
    user, ws = await deployment.user_in_workspace()
    await log_in(page, deployment, user, ws)
    await new_chat(page, "Approvals")

    await send(page, '/tool shell {"command": "ls"}')
    approve = page.get_by_role("button", name="Approve shell")
    await expect(approve).to_be_visible(timeout=TIMEOUT)
    await expect(page.locator("li.message.out[data-run-id] .chip")).to_have_text(
        ["waiting for approval"]
    )
    await approve.click()
    await expect(replies(page)).to_have_text(
        ['tool shell approved: {"command":"ls"}'], timeout=TIMEOUT
    )
    await expect(page.locator(".approval-outcome")).to_have_text([re.compile("^Approved")])
    await expect(approve).to_be_hidden()

    # A denial with a reason typed into the card; the agent is told why.
    await send(page, '/tool deploy {"env": "prod"}')
    await expect(page.get_by_role("button", name="Deny deploy")).to_be_visible(timeout=TIMEOUT)
    await page.get_by_label("Reason (told to the agent)").last.fill("not on a Friday")
    await page.get_by_role("button", name="Deny deploy").click()
    await expect(replies(page).last).to_contain_text("tool deploy denied:", timeout=TIMEOUT)
    await expect(replies(page).last).to_contain_text("not on a Friday")

    # The decisions are events: the API shows them, and a second click is refused clearly.
    async with httpx.AsyncClient(base_url=deployment.url) as http:
        for cookie in await page.context.cookies():
            http.cookies.set(cookie["name"], cookie["value"])
        page_ = (await http.get(f"/v1/workspaces/{ws}/approvals")).json()["approvals"]
        assert sorted(a["status"] for a in page_) == ["denied", "granted"]


async def test_the_gateway_restarted_mid_reply_shows_the_reply_once(
    page: Page, deployment: Deployment
) -> None:
    user, ws = await deployment.user_in_workspace()
    await log_in(page, deployment, user, ws)
    await new_chat(page, "Restart", agent="slow")
    words = [f"w{n}" for n in range(24)]  # 25 pieces at 0.25 s: about 6 s of streaming
    expected = "echo: " + " ".join(words)
    await send(page, " ".join(words))

    streaming = page.locator("li.message.out.streaming[data-run-id] .text")
    await expect(streaming).to_contain_text("w2", timeout=TIMEOUT)  # mid-reply
    deployment.kill_gateway()
    await expect(page.locator("#connection")).not_to_have_attribute(
        "data-state", "live", timeout=TIMEOUT
    )
    partial = await streaming.text_content()
    assert partial is not None
    assert "w23" not in partial
    await asyncio.to_thread(deployment.start_gateway)

    await expect(replies(page)).to_have_text([expected], timeout=TIMEOUT)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    bubble = page.locator("li.message.out[data-run-id]")
    await expect(bubble).to_have_count(1)
    # Token by token across the restart, with no gap and no repeat (the live output may
    # finish arriving after the stored reply: they are separate sources of the stream).
    await expect(bubble).to_have_attribute("data-streamed", expected, timeout=TIMEOUT)
    await expect(replies(page)).to_have_text([expected])
    await expect(page.locator("li.message.in")).to_have_count(1)


def test_the_page_is_served_with_its_security_headers(deployment: Deployment) -> None:
    page = httpx.get(deployment.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(deployment.url + "/web/chat.js")
    assert script.status_code == 200
    assert "default-src 'self'" in script.headers["content-security-policy"]
    assert httpx.get(deployment.url + "/web/nope.js").status_code == 404
    assert "/" not in httpx.get(deployment.url + "/openapi.json").json()["paths"]


@pytest.fixture(autouse=True)
def _no_leftover_gateway(deployment: Deployment) -> Iterator[None]:
    yield
    # A test that failed between killing and restarting the gateway leaves the next one a
    # working deployment.
    if deployment.gateway is None or deployment.gateway.poll() is not None:
        deployment.start_gateway()
