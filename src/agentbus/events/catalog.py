"""The list of every event type agentbus knows, and the registry built from it.

Add a new event model here; add an `Upcaster` here when a type gets a new version.
"""

from __future__ import annotations

from agentbus.events.approval import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalRulesSet,
)
from agentbus.events.budget import (
    BudgetAlerted,
    BudgetExhausted,
    BudgetPeriodStarted,
    BudgetSet,
    ReservationReleased,
    ReservationSettled,
    TokensReserved,
)
from agentbus.events.identity import (
    ApiKeyIssued,
    ApiKeyRevoked,
    UserCreated,
    UserDisabled,
    UserEnabled,
    UserPasswordChanged,
)
from agentbus.events.privacy import SubjectForgotten
from agentbus.events.registry import DomainEvent, EventRegistry, Upcaster
from agentbus.events.run import (
    RunCancelled,
    RunFailed,
    RunQueued,
    RunResumed,
    RunRetryScheduled,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    RunUsageRecorded,
    RunWaitingApproval,
)
from agentbus.events.session import (
    MessageReceived,
    MessageSent,
    RunAssigned,
    RunEnqueued,
    RunInterrupted,
    RunReleased,
    SessionClosed,
    SessionOpened,
)
from agentbus.events.workspace import (
    MemberAdded,
    MemberRemoved,
    MemberRoleChanged,
    RedactionModeSet,
    WorkspaceCreated,
)

EVENT_MODELS: tuple[type[DomainEvent], ...] = (
    WorkspaceCreated,
    MemberAdded,
    MemberRoleChanged,
    MemberRemoved,
    RedactionModeSet,
    UserCreated,
    UserPasswordChanged,
    UserDisabled,
    UserEnabled,
    ApiKeyIssued,
    ApiKeyRevoked,
    SessionOpened,
    SessionClosed,
    MessageReceived,
    MessageSent,
    RunAssigned,
    RunEnqueued,
    RunInterrupted,
    RunReleased,
    RunQueued,
    RunStarted,
    RunWaitingApproval,
    RunResumed,
    RunSucceeded,
    RunFailed,
    RunRetryScheduled,
    RunCancelled,
    RunTimedOut,
    RunUsageRecorded,
    BudgetSet,
    BudgetPeriodStarted,
    TokensReserved,
    ReservationSettled,
    ReservationReleased,
    BudgetAlerted,
    BudgetExhausted,
    ApprovalRequested,
    ApprovalGranted,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalRulesSet,
    SubjectForgotten,
)

UPCASTERS: tuple[Upcaster, ...] = ()


def default_registry() -> EventRegistry:
    return EventRegistry(EVENT_MODELS, UPCASTERS)
