"""The HTTP API on real NATS and Postgres: identity, roles, every resource's success and error
paths, cross-workspace isolation (404, never data), revocation, RLS and limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentbus.audit.erasure import Sealer
from agentbus.domain.budget import set_budget
from agentbus.events.catalog import default_registry
from agentbus.gateway.app import create_app
from agentbus.projections.catalog import all_projections
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.queries.scope import workspace_scope
from agentbus.runtime.platform import Platform
from agentbus.settings import AgentConfig, Settings
from agentbus.store import EventStore
from agentbus.workers.autoreply import AutoReply
from agentbus.workers.expiry import ApprovalExpiry
from agentbus.workers.runs import RunWorker
from tests.conftest import gateway_in_process, stop_tasks

AGENTS = {"echo": AgentConfig(executor="echo", options={"word_delay": 0})}


@dataclass
class Api:
    client: httpx.AsyncClient
    system: str
    store: EventStore
    engine: AsyncEngine

    async def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def workspace(self, ws: str) -> str:
        """Create workspace `ws`; returns an owner key of it."""
        created = await self.call(
            "POST", "/v1/workspaces", self.system, json={"id": ws, "display_name": ws.title()}
        )
        assert created.status_code == 202, created.text
        issued = await self.call(
            "POST",
            f"/v1/workspaces/{ws}/api-keys",
            self.system,
            json={"name": "owner", "role": "owner"},
        )
        assert issued.status_code == 201, issued.text
        return str(issued.json()["key"])

    async def user(self, user_id: str, display_name: str, password: str = "s3cret-pw") -> None:
        """Create user `user_id` (with a password) with the system key."""
        created = await self.call(
            "POST",
            "/v1/users",
            self.system,
            json={"id": user_id, "display_name": display_name, "password": password},
        )
        assert created.status_code == 202, created.text

    async def key(self, ws: str, owner: str, role: str) -> str:
        issued = await self.call(
            "POST", f"/v1/workspaces/{ws}/api-keys", owner, json={"name": role, "role": role}
        )
        assert issued.status_code == 201, issued.text
        return str(issued.json()["key"])


@asynccontextmanager
async def serving(
    store: EventStore,
    database_url: str,
    agents: dict[str, AgentConfig],
    *,
    expiry: bool = False,
) -> AsyncIterator[Api]:
    """The gateway in process, with the projections, a run worker and auto-reply running on
    `store` (and the approval expiry worker with `expiry`)."""
    async with gateway_in_process(store, database_url, Settings(agents=agents)) as gateway:
        engine = gateway.platform.engine
        stop = asyncio.Event()
        options = RuntimeOptions(lock_poll=0.2, scan_interval=0.2)
        tasks = [
            asyncio.create_task(Projector(all_projections(), store, engine, options).run(stop)),
            asyncio.create_task(RunWorker(store, store._nc, agents, lease=5).run(stop)),
            asyncio.create_task(AutoReply(store, store._nc, agents).run(stop)),
        ]
        if expiry:
            tasks.append(asyncio.create_task(ApprovalExpiry(store, store._nc).run(stop)))
        try:
            yield Api(gateway.client, gateway.system_key, store, engine)
        finally:
            await stop_tasks(stop, tasks)


@pytest.fixture
async def api(private_store: EventStore, database_url: str) -> AsyncIterator[Api]:
    # Sealed, as the platform's store always is (docs/erasure.md).
    sealer = await Sealer.open(private_store._nc, default_registry())
    store = EventStore(private_store._nc, default_registry(), timeout=5.0, sealer=sealer)
    try:
        async with serving(store, database_url, AGENTS) as api:
            yield api
    finally:
        await sealer.close()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["detail"]
    return body


# ---------------------------------------------------------------------------- identity


async def test_authentication_is_required_and_explained(api: Api) -> None:
    problem(await api.call("GET", "/v1/me"), 401)
    assert "malformed" in problem(await api.call("GET", "/v1/me", "nonsense"), 401)["detail"]
    assert "unknown" in problem(await api.call("GET", "/v1/me", "ab_zzzz_secret"), 401)["detail"]
    me = (await api.call("GET", "/v1/me", api.system)).json()
    assert me["kind"] == "apikey"
    assert me["workspace"] is None


async def test_workspaces_keys_and_roles(api: Api) -> None:
    owner = await api.workspace("acme")
    info = (await api.call("GET", "/v1/workspaces/acme", owner)).json()
    assert (info["id"], info["your_role"]) == ("acme", "owner")
    # only system keys create workspaces
    problem(
        await api.call("POST", "/v1/workspaces", owner, json={"id": "other", "display_name": "x"}),
        403,
    )
    problem(
        await api.call(
            "POST", "/v1/workspaces", api.system, json={"id": "_sneaky", "display_name": "x"}
        ),
        422,
    )
    viewer = await api.key("acme", owner, "viewer")
    problem(await api.call("POST", "/v1/workspaces/acme/sessions", viewer, json={}), 403)
    assert (await api.call("GET", "/v1/workspaces/acme/sessions", viewer)).status_code == 200
    admin = await api.key("acme", owner, "admin")
    problem(
        await api.call(
            "POST", "/v1/workspaces/acme/api-keys", admin, json={"name": "x", "role": "owner"}
        ),
        403,
    )


async def test_a_revoked_key_is_refused_on_its_next_request(api: Api) -> None:
    owner = await api.workspace("acme")
    member = await api.key("acme", owner, "member")
    assert (await api.call("GET", "/v1/workspaces/acme/sessions", member)).status_code == 200
    key_id = member.split("_")[1]
    revoked = await api.call("DELETE", f"/v1/workspaces/acme/api-keys/{key_id}", owner)
    assert revoked.status_code == 202
    assert (
        "revoked"
        in problem(await api.call("GET", "/v1/workspaces/acme/sessions", member), 401)["detail"]
    )


async def test_password_login_cookie_and_disabled_user(api: Api) -> None:
    owner = await api.workspace("acme")
    await api.user("ada", "Ada")
    assert (
        await api.call("PUT", "/v1/workspaces/acme/members/ada", owner, json={"role": "member"})
    ).status_code == 202
    problem(await api.client.post("/v1/auth/login", json={"user": "ada", "password": "wrong"}), 401)
    login = await api.client.post("/v1/auth/login", json={"user": "ada", "password": "s3cret-pw"})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
    assert "agentbus_session=" in cookie
    sessions = await api.client.get("/v1/workspaces/acme/sessions")  # cookie jar sends it
    assert sessions.status_code == 200
    # not a member of another workspace: 404, not 403
    await api.workspace("other")
    problem(await api.client.get("/v1/workspaces/other/sessions"), 404)
    disabled = await api.call("POST", "/v1/users/ada/disable", api.system)
    assert disabled.status_code == 202
    assert (
        "disabled" in problem(await api.client.get("/v1/workspaces/acme/sessions"), 401)["detail"]
    )
    assert (await api.call("POST", "/v1/users/ada/enable", api.system)).status_code == 202
    assert (await api.client.get("/v1/workspaces/acme/sessions")).status_code == 200


# ---------------------------------------------------------------------------- resources


async def test_sessions_messages_and_the_echo_reply(api: Api) -> None:
    owner = await api.workspace("acme")
    opened = await api.call(
        "POST",
        "/v1/workspaces/acme/sessions",
        owner,
        json={"id": "s1", "agent": "echo", "title": "Hi"},
    )
    assert opened.status_code == 202
    position = opened.json()["position"]
    got = await api.call("GET", f"/v1/workspaces/acme/sessions/s1?min_position={position}", owner)
    assert got.status_code == 200
    assert (got.json()["agent"], got.json()["status"]) == ("echo", "open")
    posted = await api.call(
        "POST",
        "/v1/workspaces/acme/sessions/s1/messages",
        owner,
        json={"text": "hello api"},
        headers={"Idempotency-Key": "k1"},
    )
    assert posted.status_code == 202
    first = posted.json()
    assert first["run_id"] is not None
    assert first["duplicate"] is False
    again = await api.call(
        "POST",
        "/v1/workspaces/acme/sessions/s1/messages",
        owner,
        json={"text": "hello api"},
        headers={"Idempotency-Key": "k1"},
    )
    assert again.json()["duplicate"] is True
    assert (again.json()["id"], again.json()["position"]) == (first["id"], first["position"])
    # the reply arrives through the run
    for _ in range(100):
        listed = await api.call("GET", "/v1/workspaces/acme/sessions/s1/messages", owner)
        if len(listed.json()) == 2:
            break
        await asyncio.sleep(0.1)
    texts = [(m["direction"], m["text"]) for m in listed.json()]
    assert texts == [("in", "hello api"), ("out", "echo: hello api")]
    run = await api.call("GET", f"/v1/workspaces/acme/runs/{first['run_id']}", owner)
    assert run.json()["status"] == "succeeded"
    closed = await api.call("POST", "/v1/workspaces/acme/sessions/s1/close", owner)
    assert closed.status_code == 202
    problem(
        await api.call(
            "POST", "/v1/workspaces/acme/sessions/s1/messages", owner, json={"text": "late"}
        ),
        409,
    )
    problem(await api.call("GET", "/v1/workspaces/acme/sessions/nope", owner), 404)
    problem(
        await api.call(
            "POST", "/v1/workspaces/acme/sessions/nope/messages", owner, json={"text": "x"}
        ),
        404,
    )


async def test_session_pagination(api: Api) -> None:
    owner = await api.workspace("acme")
    last = 0
    for n in range(5):
        opened = await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": f"p{n}"})
        last = opened.json()["position"]
    seen: list[str] = []
    cursor = None
    while True:
        query = f"limit=2&min_position={last}" + (f"&cursor={cursor}" if cursor else "")
        page = (await api.call("GET", f"/v1/workspaces/acme/sessions?{query}", owner)).json()
        seen += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == [f"p{n}" for n in range(5)]
    assert len(seen) == 5
    problem(await api.call("GET", "/v1/workspaces/acme/sessions?cursor=garbage", owner), 400)
    problem(await api.call("GET", "/v1/workspaces/acme/sessions?limit=500", owner), 422)


async def test_runs_create_get_cancel(api: Api) -> None:
    owner = await api.workspace("acme")
    created = await api.call(
        "POST",
        "/v1/workspaces/acme/runs",
        owner,
        json={"id": "run1", "agent": "echo", "input": "ping pong"},
    )
    assert created.status_code == 202
    for _ in range(100):
        got = await api.call("GET", "/v1/workspaces/acme/runs/run1", owner)
        if got.status_code == 200 and got.json()["status"] == "succeeded":
            break
        await asyncio.sleep(0.1)
    assert got.json()["output"] == "echo: ping pong"
    assert (got.json()["tokens_in"], got.json()["tokens_out"]) == (2, 3)
    problem(await api.call("POST", "/v1/workspaces/acme/runs/run1/cancel", owner), 409)
    problem(await api.call("POST", "/v1/workspaces/acme/runs/ghost/cancel", owner), 404)
    problem(
        await api.call(
            "POST", "/v1/workspaces/acme/runs", owner, json={"agent": "nobody", "input": "x"}
        ),
        404,
    )
    listed = (await api.call("GET", "/v1/workspaces/acme/runs", owner)).json()
    assert [r["id"] for r in listed["runs"]] == ["run1"]


async def test_event_history_for_auditors(api: Api) -> None:
    owner = await api.workspace("acme")
    auditor = await api.key("acme", owner, "auditor")
    viewer = await api.key("acme", owner, "viewer")
    for n in range(3):
        await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": f"h{n}"})
    page = (await api.call("GET", "/v1/workspaces/acme/events?limit=2", auditor)).json()
    assert len(page["events"]) == 2
    assert all(e["workspace"] == "acme" for e in page["events"])
    rest = (
        await api.call("GET", f"/v1/workspaces/acme/events?after={page['next_after']}", auditor)
    ).json()
    types = [e["type"] for e in page["events"] + rest["events"]]
    assert types.count("agentbus.session.opened.v1") == 3
    only = (
        await api.call(
            "GET", "/v1/workspaces/acme/events?types=agentbus.session.opened.v1", auditor
        )
    ).json()
    assert {e["type"] for e in only["events"]} == {"agentbus.session.opened.v1"}
    problem(await api.call("GET", "/v1/workspaces/acme/events", viewer), 403)


# ---------------------------------------------------------------------------- isolation


async def test_other_workspaces_answer_404_and_never_data(api: Api) -> None:
    acme = await api.workspace("acme")
    globex = await api.workspace("globex")
    await api.call("POST", "/v1/workspaces/acme/sessions", acme, json={"id": "secret"})
    await api.call(
        "POST",
        "/v1/workspaces/acme/runs",
        acme,
        json={"id": "acme-run", "agent": "echo", "input": "x"},
    )
    attempts = [
        ("GET", "/v1/workspaces/acme/sessions"),
        ("GET", "/v1/workspaces/acme/sessions/secret"),
        ("GET", "/v1/workspaces/acme/sessions/secret/messages"),
        ("POST", "/v1/workspaces/acme/sessions/secret/messages"),
        ("GET", "/v1/workspaces/acme/runs/acme-run"),
        ("POST", "/v1/workspaces/acme/runs/acme-run/cancel"),
        ("GET", "/v1/workspaces/acme/events"),
        ("GET", "/v1/workspaces/acme"),
        ("DELETE", f"/v1/workspaces/acme/api-keys/{acme.split('_')[1]}"),
    ]
    for method, path in attempts:
        response = await api.call(method, path, globex, json={"text": "x"})
        body = problem(response, 404)
        assert "secret" not in response.text
        assert body["title"] == "NotVisible"
    # another workspace's ids through one's own path: not found either
    problem(await api.call("GET", "/v1/workspaces/globex/sessions/secret", globex), 404)
    problem(await api.call("GET", "/v1/workspaces/globex/runs/acme-run", globex), 404)
    problem(
        await api.call("DELETE", f"/v1/workspaces/globex/api-keys/{acme.split('_')[1]}", globex),
        404,
    )
    # and its events never show in this workspace's history
    history = (await api.call("GET", "/v1/workspaces/globex/events", globex)).json()
    assert all(e["workspace"] == "globex" for e in history["events"])


async def test_forgetting_a_data_subject_over_http(api: Api) -> None:
    """`POST .../data-subjects/forget` does what `agentbus audit forget` does: the subject's
    sealed fields read [erased] (the read model too, from the answered position on), others
    are untouched; admins only; repeating it says so."""
    owner = await api.workspace("acme")
    member = await api.key("acme", owner, "member")
    globex = await api.workspace("globex")
    await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": "s1"})
    for author, words in (("ada", "ada's secret"), ("bob", "bob's words")):
        posted = await api.call(
            "POST",
            "/v1/workspaces/acme/sessions/s1/messages",
            owner,
            json={"text": words, "author": author},
        )
        assert posted.status_code == 202, posted.text
    path = "/v1/workspaces/acme/data-subjects/forget"
    problem(await api.call("POST", path, member, json={"subject": "ada"}), 403)
    problem(await api.call("POST", path, globex, json={"subject": "ada"}), 404)
    for bad in ({"subject": ""}, {"subject": "ada", "by": "me"}, {}, {"subject": "x" * 201}):
        problem(await api.call("POST", path, owner, json=bad), 422)

    done = await api.call("POST", path, owner, json={"subject": "ada", "reason": "art. 17"})
    assert done.status_code == 200, done.text
    answer = done.json()
    assert answer["outcome"] == "destroyed"
    assert len(answer["key_id"]) == 16
    assert answer["live_purged"] == 0  # the session has no agent: no run, no live output
    listed = await api.call(
        "GET",
        f"/v1/workspaces/acme/sessions/s1/messages?min_position={answer['position']}",
        owner,
    )
    assert [(m["author"], m["text"]) for m in listed.json()] == [
        ("ada", "[erased]"),
        ("bob", "bob's words"),
    ]
    history = (await api.call("GET", "/v1/workspaces/acme/events", owner)).json()["events"]
    recorded = [e for e in history if e["type"].endswith("subject_forgotten.v1")]
    assert [(e["data"]["subject"], e["data"]["reason"], e["actor"]) for e in recorded] == [
        ("ada", "art. 17", f"apikey:{owner.split('_')[1]}")
    ]

    again = (await api.call("POST", path, owner, json={"subject": "ada"})).json()
    assert (again["outcome"], again["position"]) == ("already_forgotten", None)
    assert again["forgotten_at"] is not None
    nobody = (await api.call("POST", path, owner, json={"subject": "nobody"})).json()
    assert nobody["outcome"] == "unknown"

    # A user's own data (their display name, in `_system`): system keys only.
    await api.user("lou", "Lou Lastname")
    problem(await api.call("POST", "/v1/users/lou/forget", owner), 403)
    problem(await api.call("POST", "/v1/users/Bad!/forget", api.system), 422)
    user = await api.call("POST", "/v1/users/lou/forget", api.system, json={"reason": "left"})
    assert user.status_code == 200, user.text
    assert user.json()["outcome"] == "destroyed"
    assert (await api.call("POST", "/v1/users/lou/forget", api.system)).json()[
        "outcome"
    ] == "already_forgotten"


async def test_row_level_security_hides_other_workspaces(api: Api) -> None:
    owner = await api.workspace("acme")
    opened = await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": "rls"})
    position = opened.json()["position"]
    await api.call("GET", f"/v1/workspaces/acme/sessions/rls?min_position={position}", owner)
    async with workspace_scope(api.engine, "acme") as connection:
        mine = await connection.scalar(text("SELECT count(*) FROM sessions"))  # no WHERE at all
    async with workspace_scope(api.engine, "globex") as connection:
        theirs = await connection.scalar(text("SELECT count(*) FROM sessions"))
        messages = await connection.scalar(text("SELECT count(*) FROM messages"))
    assert mine == 1
    assert theirs == 0
    assert messages == 0
    async with api.engine.connect() as connection:
        bypass = await connection.scalar(
            text("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = 'agentbus_reader'")
        )
    assert bypass is False


# ---------------------------------------------------------------------------- limits


async def test_limits_answer_clearly(api: Api) -> None:
    owner = await api.workspace("acme")
    await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": "big"})
    too_long = await api.call(
        "POST", "/v1/workspaces/acme/sessions/big/messages", owner, json={"text": "x" * 40_000}
    )
    assert "text" in problem(too_long, 422)["detail"]
    huge = await api.call(
        "POST",
        "/v1/workspaces/acme/sessions/big/messages",
        owner,
        content=b"{" + b" " * 300_000 + b"}",
        headers={"content-type": "application/json"},
    )
    problem(huge, 413)
    extra = await api.call(
        "POST", "/v1/workspaces/acme/sessions", owner, json={"id": "x", "colour": "red"}
    )
    assert "colour" in problem(extra, 422)["detail"]
    bad_id = await api.call("GET", "/v1/workspaces/acme/sessions/a.b", owner)
    problem(bad_id, 422)


async def test_rate_limit_answers_429_with_retry_after(
    private_store: EventStore, database_url: str
) -> None:
    settings = Settings(agents=AGENTS)
    async with gateway_in_process(
        private_store, database_url, settings, rate=0.5, burst=2
    ) as gateway:
        headers = {"Authorization": f"Bearer {gateway.system_key}"}
        statuses = [(await gateway.client.get("/v1/me", headers=headers)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["retry-after"]) >= 1
    assert statuses[2].headers["content-type"].startswith("application/problem+json")


async def test_openapi_document(api: Api) -> None:
    document = (await api.client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    for path in (
        "/v1/workspaces/{ws}/sessions",
        "/v1/workspaces/{ws}/sessions/{sid}/messages",
        "/v1/workspaces/{ws}/runs",
        "/v1/workspaces/{ws}/events",
        "/v1/auth/login",
    ):
        assert path in document["paths"]


async def test_a_run_in_an_exhausted_workspace_is_refused_with_402(api: Api) -> None:
    owner = await api.workspace("broke")
    await set_budget(api.store, "broke", limit_tokens=10, period="monthly", by="test")
    refused = await api.call(
        "POST", "/v1/workspaces/broke/runs", owner, json={"agent": "echo", "input": "x"}
    )
    assert "budget" in problem(refused, 402)["detail"]


async def test_budget_endpoints(api: Api) -> None:
    owner = await api.workspace("acme")
    viewer = await api.key("acme", owner, "viewer")
    problem(
        await api.call("PUT", "/v1/workspaces/acme/budget", viewer, json={"limit_tokens": 100}), 403
    )
    put = await api.call(
        "PUT",
        "/v1/workspaces/acme/budget",
        owner,
        json={"limit_tokens": 1000, "period": "daily", "alert_at": 0.8},
    )
    assert put.status_code == 202
    position = put.json()["position"]
    got = await api.call("GET", f"/v1/workspaces/acme/budget?min_position={position}", viewer)
    assert got.status_code == 200
    [current] = got.json()
    assert (current["limit_tokens"], current["used"], current["balance"]) == (1000, 0, 1000)
    assert current["exhausted"] is False
    problem(
        await api.call("PUT", "/v1/workspaces/acme/budget", owner, json={"limit_tokens": -1}), 422
    )


# ---------------------------------------------------------------------------- the fast path


async def test_the_fast_path_answers_posts_exactly_as_the_route(
    api: Api, database_url: str
) -> None:
    """gateway/ingest.py answers `POST .../messages` ahead of the router: every answer, success
    or error, must be the route's own (ids and positions aside)."""
    owner = await api.workspace("acme")
    viewer = await api.key("acme", owner, "viewer")
    other = await api.workspace("other")
    platform = Platform(
        Settings(agents=AGENTS),
        "nats://private",
        database_url,
        api.store._nc,
        api.store,
        api.engine,
    )
    route_only = create_app(platform, rate=1000, burst=1000, fast_ingest=False)
    async with (
        route_only.router.lifespan_context(route_only),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=route_only), base_url="http://agentbus.test"
        ) as client,
    ):
        route = Api(client, api.system, api.store, api.engine)
        for sid, agent in (("s1", "echo"), ("s2", None), ("closed", None)):
            opened = await api.call(
                "POST", "/v1/workspaces/acme/sessions", owner, json={"id": sid, "agent": agent}
            )
            assert opened.status_code == 202, opened.text
        assert (
            await api.call("POST", "/v1/workspaces/acme/sessions/closed/close", owner)
        ).status_code == 202

        messages = "/v1/workspaces/acme/sessions/{}/messages"
        cases: list[tuple[str, str | None, dict[str, Any]]] = [
            ("s1", owner, {"json": {"text": "hello"}}),
            ("s2", owner, {"json": {"text": "my mail is ada@example.com", "author": "ada"}}),
            ("s2", owner, {"json": {"text": "x"}, "headers": {"Idempotency-Key": "k" * 201}}),
            ("s2", owner, {"json": {"text": ""}}),
            ("s2", owner, {"json": {"text": "x", "bogus": 1}}),
            ("s2", owner, {"json": {"text": 5}}),
            ("s2", owner, {"json": ["not", "an", "object"]}),
            (
                "s2",
                owner,
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
            ),
            ("s2", owner, {"content": b"text", "headers": {"content-type": "text/plain"}}),
            ("s2", owner, {"content": b""}),
            ("s2", None, {"json": {"text": "x"}}),
            ("s2", "ab_nope_nope", {"json": {"text": "x"}}),
            ("s2", viewer, {"json": {"text": "x"}}),
            ("s2", other, {"json": {"text": "x"}}),
            ("nope", owner, {"json": {"text": "x"}}),
            ("a.b", owner, {"json": {"text": "x"}}),
            ("closed", owner, {"json": {"text": "x"}}),
        ]
        for sid, key, request in cases:
            fast = await api.call("POST", messages.format(sid), key, **request)
            slow = await route.call("POST", messages.format(sid), key, **request)
            what = f"{sid} {request}"
            assert fast.status_code == slow.status_code, what
            assert fast.headers["content-type"] == slow.headers["content-type"], what
            assert _stable(fast.json()) == _stable(slow.json()), what

        # A retried Idempotency-Key posts once, on either path.
        for client_api in (api, route):
            key_header = {"Idempotency-Key": f"retry-{id(client_api)}"}
            first = await client_api.call(
                "POST", messages.format("s2"), owner, json={"text": "once"}, headers=key_header
            )
            again = await client_api.call(
                "POST", messages.format("s2"), owner, json={"text": "once"}, headers=key_header
            )
            assert (first.status_code, again.status_code) == (202, 202)
            assert again.json()["duplicate"] is True
            assert again.json()["id"] == first.json()["id"]


async def test_the_fast_path_hands_on_a_chunked_body_and_answers_its_own_crash(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body without Content-Length is the route's (and `BodyLimit`'s) to read; an unexpected
    error on the fast path (which runs ahead of the app's own error handling) is logged and
    answered 500 problem+json, as everywhere else."""
    owner = await api.workspace("acme")
    await api.call("POST", "/v1/workspaces/acme/sessions", owner, json={"id": "s1"})
    path = "/v1/workspaces/acme/sessions/s1/messages"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": '
        yield b'"in two pieces"}'

    chunked = await api.call(
        "POST", path, owner, content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 202, chunked.text
    assert "content-length" not in chunked.request.headers

    async def crash(*args: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr("agentbus.gateway.ingest.post_message_as", crash)
    crashed = await api.call("POST", path, owner, json={"text": "hello"})
    body = problem(crashed, 500)
    assert body["type"].endswith("/internal")
    assert "boom" not in crashed.text


def _stable(body: Any) -> Any:
    """An answer without what differs between two posts (ids, positions)."""
    if isinstance(body, dict) and "event_ids" in body:
        return {
            k: v for k, v in body.items() if k not in ("id", "event_ids", "position", "run_id")
        } | {"run_id": body["run_id"] is not None}
    return body


async def test_readiness_names_a_missing_stream(
    private_store: EventStore, database_url: str
) -> None:
    """`/readyz` answers 503 naming the stream JetStream does not have, and what to run."""
    async with gateway_in_process(private_store, database_url, Settings()) as gateway:
        ready = await gateway.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        await private_store._nc.jetstream().delete_stream("LIVE")
        missing = await gateway.client.get("/readyz")
    assert missing.status_code == 503
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert "stream:LIVE: missing (" in missing.json()["detail"]
    assert "run agentbus streams apply" in missing.json()["detail"]
    assert "stream:EVENTS" not in missing.json()["detail"]
