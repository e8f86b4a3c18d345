"""Posting into sessions through the gateway's session views (`gateway/posting.py`), on the real
NATS server: a view that is stale (another process appended since) never answers wrongly, and
an Idempotency-Key is honoured whichever process saw the first post."""

from __future__ import annotations

import uuid

import pytest

from agentbus.domain.handling import handle
from agentbus.domain.session import (
    SESSION,
    AssignRun,
    CloseSession,
    OpenSession,
    ReceiveMessage,
    ReleaseRun,
    SessionBusy,
    SessionClosedError,
    SessionNotFound,
)
from agentbus.events import AggregateRef, EventContext, uuid7
from agentbus.events.session import MessageReceived
from agentbus.gateway.posting import SessionPosts
from agentbus.store import EventStore

CONTEXT = EventContext(source="test", actor="test")


def keyed(ref: AggregateRef, key: str) -> str:
    """The event id of a post with this Idempotency-Key (unique per session, as the API's)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ref.workspace}/{ref.id}/{key}"))


def message(text: str) -> ReceiveMessage:
    return ReceiveMessage(uuid7(), "apikey:test", text)


async def opened(store: EventStore, workspace: str, concurrency: str = "enqueue") -> AggregateRef:
    ref = AggregateRef(workspace, "session", "s1")
    await handle(store, SESSION, ref, OpenSession("api", concurrency=concurrency))  # type: ignore[arg-type]
    return ref


async def messages_in(store: EventStore, ref: AggregateRef) -> int:
    history = await store.load(ref)
    return sum(1 for e in history.events if isinstance(e.event, MessageReceived))


async def test_a_retried_key_answers_the_first_post(store: EventStore, workspace: str) -> None:
    ref = await opened(store, workspace)
    posts = SessionPosts(store)
    first = await posts.post(ref, message("hello"), keyed(ref, "k1"), CONTEXT)
    again = await posts.post(ref, message("hello"), keyed(ref, "k1"), CONTEXT)
    assert (again.duplicate, again.message_id, again.position) == (
        True,
        first.message_id,
        first.position,
    )
    assert await messages_in(store, ref) == 1


async def test_a_key_first_posted_through_another_process_is_found(
    store: EventStore, workspace: str
) -> None:
    ref = await opened(store, workspace)
    here, there = SessionPosts(store), SessionPosts(store)
    await here.post(ref, message("a view of the session, here"), uuid7(), CONTEXT)
    first = await there.post(ref, message("hello"), keyed(ref, "k1"), CONTEXT)
    # `here` has not seen that post: the store recognises the id, the view catches up
    again = await here.post(ref, message("hello"), keyed(ref, "k1"), CONTEXT)
    assert (again.duplicate, again.message_id, again.position) == (
        True,
        first.message_id,
        first.position,
    )
    assert await messages_in(store, ref) == 2


async def test_a_stale_view_posts_after_what_others_appended(
    store: EventStore, workspace: str
) -> None:
    ref = await opened(store, workspace)
    posts = SessionPosts(store)
    await posts.post(ref, message("one"), uuid7(), CONTEXT)
    await handle(store, SESSION, ref, message("two, from elsewhere"))
    three = await posts.post(ref, message("three"), uuid7(), CONTEXT)
    assert three.duplicate is False
    assert three.state.messages == 3
    assert three.position == (await store.load(ref)).last_position


async def test_a_stale_view_never_refuses_wrongly(store: EventStore, workspace: str) -> None:
    ref = await opened(store, workspace, concurrency="reject")
    posts = SessionPosts(store)
    await handle(store, SESSION, ref, AssignRun("r1", "input"))
    with pytest.raises(SessionBusy):
        await posts.post(ref, message("while r1 runs"), uuid7(), CONTEXT)
    await handle(store, SESSION, ref, ReleaseRun("r1"))  # the view still says busy
    posted = await posts.post(ref, message("after r1"), uuid7(), CONTEXT)
    assert posted.duplicate is False
    await handle(store, SESSION, ref, CloseSession())  # the view still says open
    with pytest.raises(SessionClosedError):
        await posts.post(ref, message("too late"), uuid7(), CONTEXT)


async def test_a_session_that_does_not_exist_is_refused_and_not_kept(
    store: EventStore, workspace: str
) -> None:
    posts = SessionPosts(store)
    ghost = AggregateRef(workspace, "session", "ghost")
    with pytest.raises(SessionNotFound):
        await posts.post(ghost, message("anyone?"), uuid7(), CONTEXT)
    assert ghost not in posts._views
