"""Deciding approvals from a chat: `/approve <id> [reason]`, `/deny <id> <reason>`.

An inbound message that starts with one of these is a decision by its author, not a question
for the agent: the auto-reply reactor hands it here instead of starting a run, and a short
confirmation (or why nothing was decided) is posted into the session from author `agentbus`.
Posting into a session takes the same role as deciding through the API (member), and the
approval must belong to the session's workspace.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from agentbus.domain.approval import (
    ApprovalAlreadyDecided,
    ApprovalNotFound,
    LinkAlreadyUsed,
    decide_approval,
)
from agentbus.domain.decider import DomainError
from agentbus.domain.handling import handle
from agentbus.domain.session import SESSION, SendMessage
from agentbus.errors import InvalidEvent
from agentbus.events.approval import Decision
from agentbus.events.envelope import EventContext
from agentbus.events.session import MessageReceived
from agentbus.events.subjects import validate_token
from agentbus.store.eventstore import EventStore, RecordedEvent

_COMMAND = re.compile(r"/(approve|deny)(?:\s+(\S+))?(?:\s+(.+))?", re.DOTALL)
USAGE = "usage: /approve <approval id> [reason] or /deny <approval id> <reason>"


@dataclass(frozen=True, slots=True)
class ChatDecision:
    decision: Decision
    approval_id: str | None
    reason: str | None


def parse_chat_command(text: str) -> ChatDecision | None:
    """The decision a message asks for, or None when it is not a command (an ordinary
    message). `approval_id` None: the command lacks its id."""
    match = _COMMAND.fullmatch(text.strip())
    if match is None:
        return None
    decision: Decision = "granted" if match[1] == "approve" else "denied"
    reason = match[3].strip()[:2000] if match[3] else None
    return ChatDecision(decision, match[2], reason)


async def answer_chat_command(
    store: EventStore, recorded: RecordedEvent, context: EventContext
) -> bool:
    """Decide what the inbound message `recorded` commands, and say so in its session.
    False: the message is not a command (nothing done)."""
    event = recorded.event
    assert isinstance(event, MessageReceived)
    command = parse_chat_command(event.text)
    if command is None:
        return False
    session = recorded.ref
    # The decision's `by` is the author; the envelope's actor, who posted the message.
    acting = context.model_copy(update={"actor": recorded.envelope.actor or event.author})
    reply = await _decide(store, session.workspace, command, event.author, acting)
    notice_id = f"cmd-{recorded.id}"[:64]
    notice = SendMessage(notice_id, "agentbus", reply)
    with contextlib.suppress(DomainError):  # e.g. the session was closed meanwhile
        await handle(store, SESSION, session, notice, context=context, event_ids=[notice_id])
    return True


async def _decide(
    store: EventStore, workspace: str, command: ChatDecision, author: str, context: EventContext
) -> str:
    if command.approval_id is None:
        return f"Not decided: {USAGE}"
    approval_id = command.approval_id
    try:
        validate_token(approval_id, "approval id")
        await decide_approval(
            store,
            workspace,
            approval_id,
            command.decision,
            by=author,
            reason=command.reason,
            context=context,
        )
    except ApprovalNotFound:
        return f"Not decided: there is no approval {approval_id} in this workspace."
    except (ApprovalAlreadyDecided, LinkAlreadyUsed, InvalidEvent) as exc:
        return f"Not decided: {exc}"
    why = f": {command.reason}" if command.reason else ""
    return f"Approval {approval_id} {command.decision} by {author}{why}."
