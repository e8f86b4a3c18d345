"""Approvals end to end on real servers: the HTTP API with a projector, a run worker, the
auto-reply reactor and the expiry consumer on a private nats-server and a fresh database.

A run of the echo agent whose input is `/tool shell {...}` asks approval to call `shell`; it
waits in `waiting_approval` until someone decides (or a rule does, or the approval expires)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import make_url, text

from agentbus.db.engine import create_engine
from agentbus.db.migrations import upgrade
from agentbus.domain.approval import (
    APPROVAL,
    ApprovalAlreadyDecided,
    AskApproval,
    RuleVerdict,
    approval_id_for,
    approval_ref,
    arguments_digest,
    decide_approval,
    expire_approval,
)
from agentbus.domain.approval_link import LinkClaims, sign_link
from agentbus.domain.handling import handle, load
from agentbus.domain.run import RUN, QueueRun
from agentbus.events import AggregateRef
from agentbus.events.approval import ApprovalDenied, ApprovalExpired, ApprovalGranted
from agentbus.events.run import RunResumed, RunStarted, RunWaitingApproval
from agentbus.executors.executor import ApprovalDecision, RunRequest
from agentbus.executors.openai import OpenAIExecutor
from agentbus.projections.approvals import ApprovalsProjection
from agentbus.projections.runtime import Projector, RuntimeOptions
from agentbus.queries.consistency import wait_for_position
from agentbus.runtime.link_keys import link_keys
from agentbus.settings import AgentConfig
from agentbus.store import EventStore
from agentbus.workers.expiry import ApprovalExpiry
from agentbus.workers.runs import RunWorker
from tests.conftest import eventually
from tests.executors.stand_ins import LocalServer, openai_app
from tests.test_gateway import Api, problem, serving

ECHO = AgentConfig(executor="echo", options={"word_delay": 0})
AGENTS = {"echo": ECHO, "quick": ECHO.model_copy(update={"approval_timeout": 1.5})}
DECISIONS = (ApprovalGranted, ApprovalDenied, ApprovalExpired)


@pytest.fixture
async def api(private_store: EventStore, database_url: str) -> AsyncIterator[Api]:
    async with serving(private_store, database_url, AGENTS, expiry=True) as api:
        yield api


async def run_in(api: Api, key: str, ws: str, rid: str, statuses: set[str]) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        got = await api.call("GET", f"/v1/workspaces/{ws}/runs/{rid}", key)
        body: dict[str, Any] = got.json()
        return body if got.status_code == 200 and body["status"] in statuses else None

    result: dict[str, Any] = await eventually(probe, f"run {rid} in {statuses}")
    return result


async def pending_approval(api: Api, key: str, ws: str, rid: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        got = await api.call(
            "GET", f"/v1/workspaces/{ws}/approvals?status=pending&run_id={rid}", key
        )
        listed = got.json()["approvals"]
        return listed[0] if listed else None

    found: dict[str, Any] = await eventually(probe, f"a pending approval of {rid}")
    return found


async def start_run(api: Api, key: str, ws: str, rid: str, text: str, agent: str = "echo") -> None:
    created = await api.call(
        "POST", f"/v1/workspaces/{ws}/runs", key, json={"id": rid, "agent": agent, "input": text}
    )
    assert created.status_code == 202, created.text


def decisions_in(history: Any) -> list[Any]:
    return [e.event for e in history.events if isinstance(e.event, DECISIONS)]


# ---------------------------------------------------------------------------- done when


async def test_a_run_waits_is_approved_through_the_api_and_finishes(api: Api) -> None:
    owner = await api.workspace("acme")
    member = await api.key("acme", owner, "member")
    viewer = await api.key("acme", owner, "viewer")
    progress: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        progress.append(orjson.loads(msg.data))

    await api.store._nc.subscribe("live.acme.run.rtool.progress", cb=collect)
    await start_run(api, member, "acme", "rtool", '/tool shell {"command": "make deploy"}')

    approval = await pending_approval(api, viewer, "acme", "rtool")
    assert (approval["tool"], approval["status"], approval["attempt"]) == ("shell", "pending", 1)
    assert approval["arguments_preview"] == '{"command":"make deploy"}'
    assert approval["arguments_digest"] == arguments_digest({"command": "make deploy"})
    assert approval["requested_by"] == "agent:echo"
    assert approval["id"] == approval_id_for("rtool", 1, 0)
    assert (await run_in(api, viewer, "acme", "rtool", {"waiting_approval"}))["output"] is None
    [asked] = [p for p in progress if p["kind"] == "approval_requested"]
    assert asked["data"]["approval_id"] == approval["id"]
    assert asked["data"]["decide"] == f"/v1/workspaces/acme/approvals/{approval['id']}/decide"

    path = f"/v1/workspaces/acme/approvals/{approval['id']}/decide"
    problem(await api.call("POST", path, viewer, json={"decision": "granted"}), 403)
    problem(await api.call("POST", path, member, json={"decision": "maybe"}), 422)
    decided = await api.call("POST", path, member, json={"decision": "granted", "reason": "ok"})
    assert decided.status_code == 202, decided.text
    body = decided.json()
    assert (body["decision"], body["reason"], body["duplicate"]) == ("granted", "ok", False)
    assert body["by"].startswith("apikey:")
    again = await api.call("POST", path, member, json={"decision": "granted"})
    assert (again.status_code, again.json()["duplicate"]) == (202, True)
    refused = problem(await api.call("POST", path, owner, json={"decision": "denied"}), 409)
    assert refused["original"] == {
        "decision": "granted",
        "by": body["by"],
        "reason": "ok",
        "rule": None,
    }

    run = await run_in(api, viewer, "acme", "rtool", {"succeeded", "failed"})
    assert run["output"] == 'tool shell approved: {"command":"make deploy"}'
    decided_rows = await api.call(
        "GET",
        f"/v1/workspaces/acme/approvals/{approval['id']}?min_position={body['position']}",
        viewer,
    )
    row = decided_rows.json()
    assert (row["status"], row["decided_by"], row["decision_reason"]) == (
        "granted",
        body["by"],
        "ok",
    )
    listed = await api.call("GET", "/v1/workspaces/acme/approvals?status=decided", viewer)
    assert [a["id"] for a in listed.json()["approvals"]] == [approval["id"]]
    history = await api.store.load(AggregateRef("acme", "run", "rtool"))
    assert [type(e.event) for e in history.events if isinstance(e.event, RunWaitingApproval)]
    assert [e.event.decision for e in history.events if isinstance(e.event, RunResumed)] == [
        "granted"
    ]
    assert [p["data"]["decision"] for p in progress if p["kind"] == "approval_decided"] == [
        "granted"
    ]
    # another workspace sees nothing of it
    other = await api.workspace("other")
    problem(await api.call("GET", f"/v1/workspaces/other/approvals/{approval['id']}", other), 404)
    elsewhere = f"/v1/workspaces/other/approvals/{approval['id']}/decide"
    problem(await api.call("POST", elsewhere, other, json={"decision": "denied"}), 404)
    problem(await api.call("GET", f"/v1/workspaces/acme/approvals/{approval['id']}", other), 404)


async def test_a_denial_or_an_expiry_tells_the_agent_why(api: Api) -> None:
    owner = await api.workspace("acme")
    await start_run(api, owner, "acme", "rdeny", '/tool shell {"command": "drop db"}')
    approval = await pending_approval(api, owner, "acme", "rdeny")
    denied = await api.call(
        "POST",
        f"/v1/workspaces/acme/approvals/{approval['id']}/decide",
        owner,
        json={"decision": "denied", "reason": "not on a Friday"},
    )
    assert denied.status_code == 202
    run = await run_in(api, owner, "acme", "rdeny", {"succeeded", "failed"})
    assert run["output"] == f"tool shell denied: denied by {denied.json()['by']}: not on a Friday"

    started = time.monotonic()
    await start_run(api, owner, "acme", "rlate", '/tool shell {"command": "ls"}', agent="quick")
    approval = await pending_approval(api, owner, "acme", "rlate")
    run = await run_in(api, owner, "acme", "rlate", {"succeeded", "failed"})
    assert run["output"].startswith("tool shell denied: nobody approved it in time")
    assert time.monotonic() - started < 6
    late = await api.call(
        "POST",
        f"/v1/workspaces/acme/approvals/{approval['id']}/decide",
        owner,
        json={"decision": "granted"},
    )
    assert problem(late, 410)["original"]["decision"] == "expired"


async def test_a_cancel_while_waiting_ends_the_run_at_once(api: Api) -> None:
    owner = await api.workspace("acme")
    await start_run(api, owner, "acme", "rcancel", '/tool shell {"command": "ls"}')
    await run_in(api, owner, "acme", "rcancel", {"waiting_approval"})
    cancelled = await api.call("POST", "/v1/workspaces/acme/runs/rcancel/cancel", owner)
    assert cancelled.status_code == 202
    await run_in(api, owner, "acme", "rcancel", {"cancelled"})


# ---------------------------------------------------------------------------- first decision wins


async def test_twenty_concurrent_deciders_make_one_decision(api: Api) -> None:
    owner = await api.workspace("acme")
    keys = await asyncio.gather(*(api.key("acme", owner, "member") for _ in range(20)))
    ref = approval_ref("acme", "ap_race")
    await handle(api.store, APPROVAL, ref, ask("r1", expires_in=60))
    path = "/v1/workspaces/acme/approvals/ap_race/decide"
    answers = await asyncio.gather(
        *(
            api.call("POST", path, key, json={"decision": ("granted", "denied")[n % 2]})
            for n, key in enumerate(keys)
        )
    )
    assert sorted(a.status_code for a in answers) == [202] + [409] * 19
    [winner] = [a.json() for a in answers if a.status_code == 202]
    for answer in answers:
        if answer.status_code == 409:
            original = problem(answer, 409)["original"]
            assert (original["decision"], original["by"]) == (winner["decision"], winner["by"])
    [decision] = decisions_in(await api.store.load(ref))
    assert decision.by == winner["by"]

    # the same through the domain service, 20 deciders at once on a fresh approval
    ref = approval_ref("acme", "ap_race2")
    await handle(api.store, APPROVAL, ref, ask("r2", expires_in=60))
    outcomes = await asyncio.gather(
        *(
            decide_approval(api.store, "acme", "ap_race2", ("granted", "denied")[n % 2], by=f"u{n}")
            for n in range(20)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, ApprovalAlreadyDecided) for o in outcomes if isinstance(o, Exception))
    assert len(decisions_in(await api.store.load(ref))) == 1


def ask(run_id: str, expires_in: float, tool: str = "shell") -> AskApproval:
    return AskApproval(
        run_id=run_id,
        attempt=1,
        tool=tool,
        arguments_digest=arguments_digest({}),
        arguments_preview="{}",
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
        requested_by="agent:test",
    )


# ---------------------------------------------------------------------------- signed links


async def test_signed_links_work_once_and_survive_a_rotation(api: Api) -> None:
    owner = await api.workspace("acme")
    for name in ("ap_l1", "ap_l2", "ap_l3"):
        await handle(api.store, APPROVAL, approval_ref("acme", name), ask("r1", expires_in=60))

    minted = await api.call(
        "POST",
        "/v1/workspaces/acme/approvals/ap_l1/links",
        owner,
        json={"decision": "granted", "decider": "ops@acme", "expires_in": 600},
    )
    assert minted.status_code == 201, minted.text
    link = minted.json()
    assert link["path"] == f"/v1/approval-links/{link['token']}"
    info = await api.call("GET", link["path"])  # no credentials; changes nothing
    assert (info.status_code, info.json()["status"], info.json()["decision"]) == (
        200,
        "pending",
        "granted",
    )
    problem(await api.call("POST", link["path"], json={"decision": "denied"}), 403)
    used = await api.call("POST", link["path"], json={"reason": "looks fine"})
    assert used.status_code == 202, used.text
    assert (used.json()["decision"], used.json()["by"]) == ("granted", "ops@acme")
    assert problem(await api.call("POST", link["path"]), 409)["type"].endswith("link-used")
    [decision] = decisions_in(await api.store.load(approval_ref("acme", "ap_l1")))
    assert (decision.jti, decision.by, decision.reason) == (link["jti"], "ops@acme", "looks fine")

    # a second link on a decided approval: the original decision, 409
    deny_link = await api.call(
        "POST", "/v1/workspaces/acme/approvals/ap_l1/links", owner, json={"decision": "denied"}
    )
    assert problem(deny_link, 409)["original"]["decision"] == "granted"
    # tampered, forged with another key, expired
    header, payload, signature = link["token"].split(".")
    problem(
        await api.call("POST", f"/v1/approval-links/{header}.{payload}.{signature[:-3]}AAA"), 403
    )
    keys = await link_keys(api.store._nc)
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = sign_link(
        LinkClaims.new("acme", "ap_l2", "granted", "ops", past), keys.signing_key, keys.current
    )
    problem(await api.call("POST", f"/v1/approval-links/{expired}"), 410)
    forged = sign_link(
        LinkClaims.new("acme", "ap_l2", "granted", "x", past + timedelta(hours=1)), b"k" * 32, "zz"
    )
    problem(await api.call("POST", f"/v1/approval-links/{forged}"), 403)

    # rotation: earlier links keep working (keep=3), or stop at once (keep=1); only system keys
    early = (
        await api.call(
            "POST", "/v1/workspaces/acme/approvals/ap_l2/links", owner, json={"decision": "denied"}
        )
    ).json()
    problem(await api.call("POST", "/v1/approval-link-keys/rotate", owner), 403)
    rotated = await api.call("POST", "/v1/approval-link-keys/rotate", api.system)
    assert rotated.json()["current"] != keys.current
    assert keys.current in rotated.json()["kids"]
    assert (await api.call("POST", early["path"])).json()["decision"] == "denied"
    doomed = (
        await api.call(
            "POST", "/v1/workspaces/acme/approvals/ap_l3/links", owner, json={"decision": "granted"}
        )
    ).json()
    voided = await api.call("POST", "/v1/approval-link-keys/rotate", api.system, json={"keep": 1})
    assert len(voided.json()["kids"]) == 1
    problem(await api.call("POST", doomed["path"]), 403)
    assert (await link_keys(api.store._nc)).current == voided.json()["current"]  # persisted


# ---------------------------------------------------------------------------- rules


async def test_rules_allow_deny_and_ask(api: Api) -> None:
    owner = await api.workspace("acme")
    member = await api.key("acme", owner, "member")
    rules = [
        {
            "name": "no-rm-rf",
            "tool": "shell",
            "arguments": [{"key": "command", "pattern": r"\brm\s+-[a-zA-Z]*r[a-zA-Z]*f"}],
            "effect": "deny",
            "reason": "rm -rf is never allowed",
        },
        {
            "name": "ls",
            "tool": "shell",
            "arguments": [{"key": "command", "pattern": r"^ls(\s|$)"}],
            "effect": "allow",
        },
    ]
    path = "/v1/workspaces/acme/approval-rules"
    problem(await api.call("PUT", path, member, json={"rules": rules}), 403)
    bad = [{**rules[0], "arguments": [{"key": "command", "pattern": "("}]}]
    refused = problem(await api.call("PUT", path, owner, json={"rules": bad}), 422)
    assert "regular expression" in refused["detail"]
    problem(await api.call("PUT", path, owner, json={"rules": [rules[1], rules[1]]}), 422)
    assert (await api.call("PUT", path, owner, json={"rules": rules})).status_code == 202
    assert (await api.call("GET", path, member)).json()["rules"][0]["name"] == "no-rm-rf"

    await start_run(api, member, "acme", "rls", '/tool shell {"command": "ls -la"}')
    await start_run(api, member, "acme", "rrm", '/tool shell {"command": "rm -rf /"}')
    await start_run(api, member, "acme", "rcat", '/tool shell {"command": "cat notes"}')
    allowed = await run_in(api, member, "acme", "rls", {"succeeded", "failed"})
    assert allowed["output"] == 'tool shell approved: {"command":"ls -la"}'
    denied = await run_in(api, member, "acme", "rrm", {"succeeded", "failed"})
    assert denied["output"] == (
        "tool shell denied: denied by rule:no-rm-rf: rm -rf is never allowed"
    )
    asked = await pending_approval(api, member, "acme", "rcat")  # no rule matched: a person
    decided = await api.call(
        "POST",
        f"/v1/workspaces/acme/approvals/{asked['id']}/decide",
        member,
        json={"decision": "granted"},
    )
    assert decided.status_code == 202
    assert (await run_in(api, member, "acme", "rcat", {"succeeded"}))["output"].startswith(
        "tool shell approved"
    )
    # automatic decisions are events with the rule as actor; the run never waited
    by_rule = await api.call("GET", "/v1/workspaces/acme/approvals?status=decided", member)
    rows = {a["run_id"]: a for a in by_rule.json()["approvals"]}
    assert (rows["rls"]["status"], rows["rls"]["rule"], rows["rls"]["decided_by"]) == (
        "granted",
        "ls",
        "rule:ls",
    )
    assert (rows["rrm"]["status"], rows["rrm"]["rule"]) == ("denied", "no-rm-rf")
    for rid in ("rls", "rrm"):
        history = await api.store.load(AggregateRef("acme", "run", rid))
        assert not [e for e in history.events if isinstance(e.event, RunWaitingApproval)]
    problem(
        await api.call(
            "POST",
            f"/v1/workspaces/acme/approvals/{rows['rrm']['id']}/decide",
            owner,
            json={"decision": "granted"},
        ),
        409,
    )


# ---------------------------------------------------------------------------- chat commands


async def test_chat_commands_approve_and_deny(api: Api) -> None:
    owner = await api.workspace("acme")
    opened = await api.call(
        "POST", "/v1/workspaces/acme/sessions", owner, json={"id": "s1", "agent": "echo"}
    )
    assert opened.status_code == 202

    async def post(text: str) -> None:
        posted = await api.call(
            "POST",
            "/v1/workspaces/acme/sessions/s1/messages",
            owner,
            json={"text": text, "author": "ada"},
        )
        assert posted.status_code == 202, posted.text

    async def messages(count: int) -> list[tuple[str, str]]:
        async def probe() -> list[tuple[str, str]] | None:
            got = await api.call("GET", "/v1/workspaces/acme/sessions/s1/messages", owner)
            if got.status_code != 200:  # not projected yet
                return None
            listed = [(m["author"], m["text"]) for m in got.json()]
            return listed if len(listed) >= count else None

        found: list[tuple[str, str]] = await eventually(probe, f"{count} messages")
        return found

    await post('/tool shell {"command": "deploy"}')
    notice = (await messages(2))[1]
    assert notice[0] == "agentbus"
    approval_id = notice[1].split("/approve ")[1].split(" ")[0]
    assert approval_id.startswith("ap_")
    await post(f"/approve {approval_id} ship it")
    listed = await messages(5)  # + the confirmation and the run's reply, in either order
    assert ("agentbus", f"Approval {approval_id} granted by ada: ship it.") in listed
    assert ("echo", 'tool shell approved: {"command":"deploy"}') in listed
    await post(f"/deny {approval_id} too late")
    await post("/deny nope because")
    await post("/approve")
    listed = await messages(11)
    replies = [text for author, text in listed if author == "agentbus"]
    assert "Not decided: the approval was already granted by ada (ship it)" in replies
    assert "Not decided: there is no approval nope in this workspace." in replies
    assert any(r.startswith("Not decided: usage: /approve") for r in replies)
    runs = (await api.call("GET", "/v1/workspaces/acme/runs", owner)).json()["runs"]
    assert len(runs) == 1  # commands start no run


# ---------------------------------------------------------------------------- expiry, takeover


async def test_a_pending_approval_expires_at_its_time_across_a_restart(
    private_store: EventStore,
) -> None:
    store = private_store
    ref = approval_ref("acme", "ap_timer")
    done = await handle(store, APPROVAL, ref, ask("r1", expires_in=1.5))
    expires_at = done.state.expires_at
    assert expires_at is not None

    first = asyncio.Event()
    task = asyncio.create_task(ApprovalExpiry(store, store._nc).run(first))
    await asyncio.sleep(0.5)  # it has seen the request and set its timer
    first.set()
    await task  # "restart": the process's consumer is gone
    state, _ = await load(store, APPROVAL, ref)
    assert state.pending

    second = asyncio.Event()
    task = asyncio.create_task(ApprovalExpiry(store, store._nc).run(second))
    try:

        async def expired() -> bool:
            return (await load(store, APPROVAL, ref))[0].status == "expired"

        await eventually(expired, "the approval to expire", timeout=5)
    finally:
        second.set()
        await task
    [event] = [e for e in (await store.load(ref)).events if isinstance(e.event, ApprovalExpired)]
    assert expires_at <= event.time < expires_at + timedelta(seconds=1)


async def test_a_run_taken_over_while_waiting_keeps_its_approval(
    private_store: EventStore,
) -> None:
    store = private_store
    ref = AggregateRef("acme", "run", "rtake")
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    command = QueueRun("echo", "echo", '/tool shell {"command": "ls"}', deadline_at=deadline)
    await handle(store, RUN, ref, command)

    async def status_is(status: str, attempt: int) -> bool:
        state, _ = await load(store, RUN, ref)
        return state.status == status and state.attempt == attempt

    stop_a = asyncio.Event()
    worker_a = asyncio.create_task(
        RunWorker(store, store._nc, AGENTS, name="a", lease=5).run(stop_a)
    )
    await eventually(lambda: status_is("waiting_approval", 1), "worker a to wait")
    stop_a.set()  # worker a stops while waiting: it hands the run back
    await worker_a
    stop_b = asyncio.Event()
    worker_b = asyncio.create_task(
        RunWorker(store, store._nc, AGENTS, name="b", lease=5).run(stop_b)
    )
    try:
        await eventually(lambda: status_is("waiting_approval", 2), "worker b to take over")
        carried = approval_id_for("rtake", 1, 0)
        await decide_approval(store, "acme", carried, "granted", by="ada")
        await eventually(lambda: status_is("succeeded", 2), "the run to finish")
    finally:
        stop_b.set()
        await worker_b
    history = await store.load(ref)
    assert [e.event.worker for e in history.events if isinstance(e.event, RunStarted)] == ["a", "b"]
    waits = [e.event.approval_id for e in history.events if isinstance(e.event, RunWaitingApproval)]
    assert waits == [carried, carried]  # the same approval: nobody was asked twice
    new_id = approval_ref("acme", approval_id_for("rtake", 2, 0))
    assert (await store.load(new_id)).events == ()


# ---------------------------------------------------------------------------- openai


@dataclass
class Approver:
    """A `RunOutput` that denies every tool call it is asked about."""

    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def delta(self, text: str) -> None:
        pass

    async def progress(self, kind: str, data: Mapping[str, Any]) -> None:
        self.steps.append((kind, dict(data)))

    async def usage(self, model: str, tokens_in: int, tokens_out: int) -> None:
        pass

    async def request_approval(
        self, tool: str, arguments: Mapping[str, Any], reason: str | None
    ) -> ApprovalDecision:
        self.asked.append((tool, dict(arguments)))
        return ApprovalDecision("ap_1", "denied", "ada", "no weather today")


async def test_openai_asks_approval_for_matching_tool_calls() -> None:
    output = Approver()
    with LocalServer(openai_app([])) as server:
        options = {
            "base_url": f"{server.url}/v1",
            "model": "tools",
            "timeout": 2,
            "approval_tools": ["get_w*"],
        }
        request = RunRequest("acme", "r1", 1, "helper", "weather?", options=options)
        await OpenAIExecutor().execute(request, output)
    assert output.asked == [("get_weather", {"city": "Paris"})]  # get_time needs none
    kinds = [kind for kind, _ in output.steps]
    assert kinds == ["tool_call", "tool_call", "tool_approval"]  # asked once the stream ended
    approval = output.steps[2][1]
    assert (approval["name"], approval["decision"], approval["explanation"]) == (
        "get_weather",
        "denied",
        "denied by ada: no weather today",
    )


# ---------------------------------------------------------------------------- read model


async def test_the_approvals_table_does_not_depend_on_batch_boundaries(
    private_store: EventStore, database_url: str
) -> None:
    """The projection contract: batch size 1 and one large batch give the same rows."""
    store = private_store
    for n in range(12):
        ref = approval_ref("acme", f"ap_{n}")
        rules = RuleVerdict(("ask", "allow", "deny")[n % 3], None if n % 3 == 0 else f"rule{n}")
        await handle(store, APPROVAL, ref, replace(ask(f"r{n % 4}", 60), rules=rules))
        if n % 3 == 0 and n % 2 == 0:
            await decide_approval(store, "acme", ref.id, "denied", by="ada", reason=f"no {n}")
    await handle(store, APPROVAL, approval_ref("acme", "ap_late"), ask("r9", expires_in=0.01))
    await asyncio.sleep(0.02)
    await expire_approval(store, approval_ref("acme", "ap_late"))
    last = await store.last_position()

    big = f"{make_url(database_url).database}_big"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{big}"')
    finally:
        await admin.close()
    other = make_url(database_url).set(database=big)
    rows = []
    for url, batch in ((database_url, 1), (other.render_as_string(hide_password=False), 1000)):
        await upgrade(url)
        engine = create_engine(url)
        stop = asyncio.Event()
        options = RuntimeOptions(batch_size=batch, linger=0, lock_poll=0.2, scan_interval=0.2)
        task = asyncio.create_task(
            Projector([ApprovalsProjection()], store, engine, options).run(stop)
        )
        try:
            await wait_for_position(engine, "approvals", last, timeout=20)
            async with engine.connect() as connection:
                rows.append(
                    (await connection.execute(text("SELECT * FROM approvals ORDER BY id"))).all()
                )
        finally:
            stop.set()
            await task
            await engine.dispose()
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'DROP DATABASE "{big}" WITH (FORCE)')
    finally:
        await admin.close()
    assert rows[0] == rows[1]
    by_id = {row.id: row for row in rows[0]}
    assert len(by_id) == 13
    assert (by_id["ap_1"].status, by_id["ap_1"].decided_by) == ("granted", "rule:rule1")
    assert (by_id["ap_2"].status, by_id["ap_2"].rule) == ("denied", "rule2")
    assert (by_id["ap_0"].status, by_id["ap_0"].decision_reason) == ("denied", "no 0")
    assert by_id["ap_3"].status == "pending"
    assert by_id["ap_late"].status == "expired"
