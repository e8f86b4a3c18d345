"""Approval expiry: every pending approval ends `expired` at its `expires_at`, even when no
worker is waiting for it and across restarts.

The durable consumer `approval-expiry` gets each `approval.requested` event once. Still pending
and not yet due: the message is naked with a delay until `expires_at`, so JetStream itself keeps
the timer (it survives a restart of this process, and another worker role picks it up);
due: `expired` is appended (idempotent: an approval decided meanwhile is left as it is) and the
message acked. A worker waiting for the approval appends `expired` itself at the same moment;
whichever comes first, the other changes nothing.

Why not JetStream message scheduling (ADR-51): a scheduled message lands on EVENTS, which is the
audit record and holds CloudEvents only; a delayed nak keeps the timer outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agentbus.domain.approval import APPROVAL, ApprovalNotDue, expire_approval
from agentbus.domain.decider import DomainError
from agentbus.domain.handling import load
from agentbus.events.envelope import EventContext
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import EventStore
from agentbus.workers.queue import consume

log = structlog.get_logger("agentbus.approvals")

APPROVAL_EXPIRY = "approval-expiry"
MAX_DELAY = 24 * 3600.0
"""Longest single nak delay; a later expiry is simply naked again."""


def approval_expiry_config() -> dict[str, object]:
    return {
        "durable_name": APPROVAL_EXPIRY,
        "description": "agentbus approval expiry: one item per requested approval",
        "filter_subject": "evt.*.approval.*.requested",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": 30_000_000_000,
        "max_deliver": -1,
        # Every pending approval is one unacked (delayed) message: allow many.
        "max_ack_pending": 100_000,
        "replay_policy": "instant",
    }


class ApprovalExpiry:
    def __init__(self, store: EventStore, nc: NATS) -> None:
        self._store = store
        self._nc = nc
        self._context = EventContext(source="agentbus/approval-expiry", actor="agentbus")

    async def run(self, stop: asyncio.Event) -> None:
        await consume(self._nc, approval_expiry_config(), self._process, stop)

    async def _process(self, message: Msg) -> None:
        ref = AggregateRef.from_subject(message.subject)
        try:
            state, _ = await load(self._store, APPROVAL, ref)
            if not state.pending or state.expires_at is None:
                await message.ack()
                return
            left = (state.expires_at - datetime.now(UTC)).total_seconds()
            if left > 0:
                await message.nak(delay=min(left, MAX_DELAY))
                return
            try:
                await expire_approval(self._store, ref, context=self._context)
            except ApprovalNotDue:  # this clock is a hair behind the one that checked
                await message.nak(delay=0.1)
                return
            log.info("approval expired", workspace=ref.workspace, approval=ref.id)
            await message.ack()
        except DomainError as exc:
            log.info("nothing to expire", approval=ref.id, reason=str(exc))
            await message.ack()
        except Exception as exc:
            log.warning("approval expiry failed; retrying", approval=ref.id, error=str(exc))
            with contextlib.suppress(Exception):
                await message.nak(delay=1.0)
