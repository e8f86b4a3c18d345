"""The approval gate: what happens when an executor asks to use a tool (`request_approval`).

For one attempt of one run, each request

1. gets a deterministic approval id (run, attempt, index of the request in the attempt), so a
   retried append is the same approval, never a second one;
2. is checked against the workspace's rules: `allow` / `deny` are decided at once, the rule as
   actor, in the same atomic append as the request (no waiting, the run never leaves `running`);
3. otherwise is appended as `approval.requested` (pending until `expires_at`: the agent's
   `approval_timeout`, and never past the run's deadline), the run goes `waiting_approval`, a
   LIVE progress message `approval_requested` lets a chat show buttons, and a session (if any)
   gets a message saying how to decide from the chat (`/approve <id>`, `/deny <id> <reason>`);
4. waits for the decision: a core NATS subscription on the approval's subjects (made before
   the request is appended, so nothing is missed) plus a periodic reload; at `expires_at` the
   gate appends `expired` itself (the `approval-expiry` consumer does it when no worker waits).
   The worker keeps renewing its lease meanwhile; a cancel cancels the wait with the executor;
5. resumes the run (`resumed(decision)`) and answers the executor.

A run taken over while it waited (its worker died) starts a new attempt; the approval it was
waiting for is carried over to the same tool call of the new attempt (same tool, same
arguments digest), so nobody is asked twice and a decision made meanwhile is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.domain.approval import (
    APPROVAL,
    ApprovalNotDue,
    ApprovalState,
    AskApproval,
    approval_id_for,
    approval_ref,
    approval_rules,
    arguments_digest,
    arguments_preview,
    evaluate,
    expire_approval,
)
from agentbus.domain.decider import DomainError
from agentbus.domain.handling import Loaded, handle, load
from agentbus.domain.run import RequestApproval, Resume, RunCommand, RunState
from agentbus.domain.session import SESSION, SendMessage
from agentbus.events.envelope import EventContext
from agentbus.events.subjects import AggregateRef
from agentbus.executors.executor import ApprovalDecision, ExecutorError
from agentbus.store.eventstore import EventStore

log = structlog.get_logger("agentbus.approvals")

Progress = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class ApprovalGate:
    """The approvals of one attempt of one run (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        nc: NATS,
        run: Loaded[RunCommand, RunState],
        attempt: int,
        *,
        timeout: float,
        deadline: datetime | None = None,
        context: EventContext = EventContext.DEFAULT,
        recheck: float = 5.0,
    ) -> None:
        self._store = store
        self._nc = nc
        self._run = run
        self._attempt = attempt
        self._timeout = timeout
        self._deadline = deadline
        self._context = context
        self._recheck = recheck
        self._asked = 0
        # The approval the run was still waiting for when this attempt took it over, if any.
        self._unresolved = run.state.approval_id

    async def request(
        self, tool: str, arguments: Mapping[str, Any], reason: str | None, progress: Progress
    ) -> ApprovalDecision:
        if not 1 <= len(tool) <= 200:
            raise ExecutorError(
                "executor", f"a tool name has 1 to 200 characters: {tool[:50]!r}", retryable=False
            )
        reason = reason[:2000] if reason else None
        ref = self._run.ref
        index, self._asked = self._asked, self._asked + 1
        digest = arguments_digest(arguments)
        carried = await self._carried_over(tool, digest)
        approval_id = carried or approval_id_for(ref.id, self._attempt, index)
        approval = approval_ref(ref.workspace, approval_id)
        changed = asyncio.Event()

        async def on_event(_: Msg) -> None:
            changed.set()

        # Subscribed before the request is appended: no decision can slip by unseen.
        watch = await self._nc.subscribe(approval.filter, cb=on_event)
        try:
            if carried:
                state, _ = await load(self._store, APPROVAL, approval)
            else:
                state = await self._ask(approval, tool, arguments, digest, reason)
            if carried or state.pending:  # (a rule decided: no waiting, the run runs on)
                await self._run.handle(
                    RequestApproval(self._attempt, approval_id, tool, reason),
                    context=self._context,
                )
                if state.pending:
                    await progress("approval_requested", _requested(approval, state))
                    await self._tell_session(approval, state)
                state = await self._wait(approval, state, changed)
                assert state.verdict is not None
                await self._run.handle(
                    Resume(approval_id, state.verdict.outcome), context=self._context
                )
            answer = _answer(approval_id, state)
            await progress(
                "approval_decided",
                {
                    "approval_id": approval_id,
                    "tool": tool,
                    "decision": answer.decision,
                    "by": answer.by,
                    "reason": answer.reason,
                    "rule": answer.rule,
                },
            )
            return answer
        finally:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _ask(
        self,
        approval: AggregateRef,
        tool: str,
        arguments: Mapping[str, Any],
        digest: str,
        reason: str | None,
    ) -> ApprovalState:
        now = datetime.now(UTC)
        expires_at = now + timedelta(seconds=self._timeout)
        if self._deadline is not None:
            expires_at = min(expires_at, self._deadline)
        state = self._run.state
        command = AskApproval(
            run_id=self._run.ref.id,
            attempt=self._attempt,
            tool=tool,
            arguments_digest=digest,
            arguments_preview=arguments_preview(arguments),
            expires_at=expires_at,
            requested_by=f"agent:{state.agent}",
            reason=reason,
            session_id=state.session_id,
            rules=evaluate(await approval_rules(self._store, approval.workspace), tool, arguments),
            author=state.author,
        )
        done = await handle(self._store, APPROVAL, approval, command, context=self._context)
        return done.state

    async def _carried_over(self, tool: str, digest: str) -> str | None:
        """The approval this attempt inherits for this tool call, if any (see the module)."""
        if self._unresolved is None:
            return None
        approval = approval_ref(self._run.ref.workspace, self._unresolved)
        state, _ = await load(self._store, APPROVAL, approval)
        if (state.tool, state.arguments_digest) != (tool, digest):
            return None
        self._unresolved = None
        return approval.id

    async def _wait(
        self, approval: AggregateRef, state: ApprovalState, changed: asyncio.Event
    ) -> ApprovalState:
        while state.pending:
            assert state.expires_at is not None
            left = (state.expires_at - datetime.now(UTC)).total_seconds()
            if left <= 0:
                try:
                    state = (
                        await expire_approval(self._store, approval, context=self._context)
                    ).state
                except ApprovalNotDue:  # clocks disagree by a hair: look again shortly
                    await asyncio.sleep(0.05)
                    state, _ = await load(self._store, APPROVAL, approval)
                continue
            with contextlib.suppress(TimeoutError):  # (not wait_for: see sleep_or_stop)
                async with asyncio.timeout(min(left, self._recheck)):
                    await changed.wait()
            changed.clear()
            state, _ = await load(self._store, APPROVAL, approval)
        return state

    async def _tell_session(self, approval: AggregateRef, state: ApprovalState) -> None:
        """A chat message saying what is asked and how to answer from the chat."""
        if state.session_id is None:
            return
        session = AggregateRef(approval.workspace, "session", state.session_id)
        why = f" ({state.reason})" if state.reason else ""
        assert state.expires_at is not None
        text = (
            f"Approval needed: run {state.run_id} wants to use {state.tool} with "
            f"{state.arguments_preview[:500]}{why}. Reply /approve {approval.id} or "
            f"/deny {approval.id} <reason> before {state.expires_at:%Y-%m-%d %H:%M:%S} UTC."
        )
        notice_id = f"ask-{approval.id}"
        with contextlib.suppress(DomainError):  # e.g. the session was closed
            await handle(
                self._store,
                SESSION,
                session,
                SendMessage(
                    notice_id, "agentbus", text, run_id=state.run_id, recipient=state.author
                ),
                context=self._context,
                event_ids=[notice_id],
            )


def _answer(approval_id: str, state: ApprovalState) -> ApprovalDecision:
    verdict = state.verdict
    assert verdict is not None
    return ApprovalDecision(approval_id, verdict.outcome, verdict.by, verdict.reason, verdict.rule)


def _requested(approval: AggregateRef, state: ApprovalState) -> dict[str, Any]:
    assert state.expires_at is not None
    return {
        "approval_id": approval.id,
        "tool": state.tool,
        "arguments_preview": state.arguments_preview,
        "reason": state.reason,
        "expires_at": state.expires_at.isoformat(),
        "decide": f"/v1/workspaces/{approval.workspace}/approvals/{approval.id}/decide",
    }
