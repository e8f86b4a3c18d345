"""Posting messages into sessions without reading a session's history for every post.

The gateway keeps, per recently used session, what a post needs: the session's state and last
position, and the posts made with an `Idempotency-Key` (their event ids, a UUIDv5 of the key,
with the message id and position each answered). A post decides on that view and appends with
`Expect.at(its position)`, so while the view is current a post reads nothing at all. When it
is not (a reply, a run, a post through another replica appended since), the expectation fails,
the view reads only what was appended after its position, and the post is decided again; a
refusal (closed, busy) is only ever answered on a view read during the post.

A retried key is answered from the view, or, when its first post is newer than the view, by
the store itself (it recognises the event id behind a failed expectation and reports a
duplicate) after which the view catches up and finds it: the first post's answer however long
ago it was, as when the whole history was read for every post.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field

from agentbus.domain.decider import DomainError
from agentbus.domain.session import SESSION, ReceiveMessage, SessionState
from agentbus.errors import ConcurrencyConflict
from agentbus.events.envelope import EventContext
from agentbus.events.subjects import AggregateRef
from agentbus.store.eventstore import EventStore, Expect
from agentbus.values import value


@value
class Posted:
    message_id: str
    position: int
    duplicate: bool
    state: SessionState
    """The session as of the post (its agent decides whether a run will answer)."""


@dataclass(slots=True)
class _View:
    state: SessionState
    position: int
    keyed: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Posts made with an Idempotency-Key: event id -> (message id, position)."""


class SessionPosts:
    """Recently used sessions' views (least recently used forgotten beyond `size`), and
    posting through them. One per gateway process; views may be stale, never wrong: every
    append states the position it was decided on. A view keeps every keyed post of its
    session (~200 bytes each) for as long as it is kept; a forgotten view is read whole again
    on the session's next post."""

    def __init__(self, store: EventStore, size: int = 1024, attempts: int = 5) -> None:
        self._store = store
        self._size = size
        self._attempts = attempts
        self._views: OrderedDict[AggregateRef, _View] = OrderedDict()

    @staticmethod
    def ref(workspace: str, sid: str) -> AggregateRef:
        """Session `sid` of `workspace` (validated once: the refs of sessions posted into
        recently are kept, as their views are)."""
        return _session_ref(workspace, sid)

    async def post(
        self, ref: AggregateRef, command: ReceiveMessage, event_id: str, context: EventContext
    ) -> Posted:
        """Append `command`'s message with `event_id`, or answer the post that used that id.

        Raises the session's `DomainError` to refuse, `ConcurrencyConflict` if the session kept
        moving for every attempt, and what `EventStore.append` raises."""
        view = self._views.get(ref)
        fresh = view is None
        if view is None:
            view = await self._read(ref, _View(SESSION.initial_state, 0))
        else:
            self._views.move_to_end(ref)
        for attempt in range(self._attempts):
            first = view.keyed.get(event_id)
            if first is not None:
                return Posted(first[0], first[1], duplicate=True, state=view.state)
            state, position = view.state, view.position
            try:
                events = SESSION.decide(command, state)
            except DomainError:
                if fresh:
                    raise
                view, fresh = await self._read(ref, view), True
                continue
            try:
                result = await self._store.append(
                    ref, events, expect=Expect(position), context=context, event_ids=[event_id]
                )
            except ConcurrencyConflict:
                if attempt == self._attempts - 1:
                    raise
                view, fresh = await self._read(ref, view), True
                continue
            if result.duplicate:  # posted before, after what the view had read
                view, fresh = await self._read(ref, view), True
                continue
            for event in events:
                state = SESSION.evolve(state, event)
            self._advance(ref, view, state, result.last_position)
            if _keyed(event_id):
                view.keyed[event_id] = (command.message_id, result.last_position)
            return Posted(command.message_id, result.last_position, duplicate=False, state=state)
        raise ConcurrencyConflict(ref.filter, view.position, None)

    async def _read(self, ref: AggregateRef, view: _View) -> _View:
        """`view` moved on by what was appended after its position (kept if the session
        exists)."""
        state, position = view.state, view.position
        history = await self._store.load(ref, after=position)
        for recorded in history.events:
            state = SESSION.evolve(state, recorded.event)
            if _keyed(recorded.id):
                message_id = str(getattr(recorded.event, "message_id", ""))
                view.keyed[recorded.id] = (message_id, recorded.position)
        self._advance(ref, view, state, max(position, history.last_position))
        return view

    def _advance(self, ref: AggregateRef, view: _View, state: SessionState, position: int) -> None:
        # Other posts may have moved the view while this one awaited: only ever forward.
        if position > view.position:
            view.state, view.position = state, position
        if view.position and ref not in self._views:
            self._views[ref] = view
            while len(self._views) > self._size:
                self._views.popitem(last=False)


@functools.lru_cache(maxsize=4096)
def _session_ref(workspace: str, sid: str) -> AggregateRef:
    return AggregateRef(workspace, "session", sid)


def _keyed(event_id: str) -> bool:
    """An id made from an Idempotency-Key (a UUIDv5): the only posts ever retried."""
    return len(event_id) == 36 and event_id[14] == "5"
