"""Events as plain data: type strings, the registry, upcasting, ids, subjects. No servers."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, ClassVar

import pytest

from agentbus.domain.session import SessionState
from agentbus.errors import InvalidEvent, UnknownEventType
from agentbus.events import AggregateRef, DomainEvent, EventKind, EventRegistry, Upcaster, uuid7
from agentbus.events.catalog import EVENT_MODELS, default_registry
from agentbus.events.envelope import uuid5
from agentbus.events.session import SessionOpened
from agentbus.events.subjects import workspace_filter
from agentbus.store.eventstore import ANY, Expect


class TitleSetV3(DomainEvent):
    """Version 3 of a made-up event: v1 had `name`, v2 renamed it `title`, v3 added `lang`."""

    kind: ClassVar[EventKind] = EventKind("session", "title_set", 3)
    title: str
    lang: str


def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"title": data["name"]}


def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "lang": "en"}


REGISTRY = EventRegistry(
    [TitleSetV3],
    [Upcaster("session", "title_set", 1, v1_to_v2), Upcaster("session", "title_set", 2, v2_to_v3)],
)


def test_type_strings_round_trip() -> None:
    kind = EventKind("run", "started", 1)
    assert kind.type == "agentbus.run.started.v1"
    assert EventKind.parse("agentbus.run.started.v1") == kind


@pytest.mark.parametrize(
    "bad", ["run.started.v1", "agentbus.run.started", "agentbus.Run.started.v1", "agentbus.run.x.v"]
)
def test_malformed_type_strings_are_refused(bad: str) -> None:
    with pytest.raises(UnknownEventType, match="not an agentbus event type"):
        EventKind.parse(bad)


def test_old_versions_are_upcast_through_the_chain() -> None:
    assert REGISTRY.decode("agentbus.session.title_set.v1", {"name": "Hi"}) == TitleSetV3(
        title="Hi", lang="en"
    )
    assert REGISTRY.decode("agentbus.session.title_set.v2", {"title": "Yo"}) == TitleSetV3(
        title="Yo", lang="en"
    )
    assert REGISTRY.decode(
        "agentbus.session.title_set.v3", {"title": "Yo", "lang": "fr"}
    ) == TitleSetV3(title="Yo", lang="fr")


def test_missing_upcaster_newer_version_and_unknown_type_are_named() -> None:
    partial = EventRegistry([TitleSetV3], [Upcaster("session", "title_set", 2, v2_to_v3)])
    with pytest.raises(UnknownEventType, match="no upcaster"):
        partial.decode("agentbus.session.title_set.v1", {"name": "x"})
    with pytest.raises(UnknownEventType, match="newer than this build"):
        REGISTRY.decode("agentbus.session.title_set.v4", {})
    with pytest.raises(UnknownEventType, match="no event model"):
        REGISTRY.decode("agentbus.session.vanished.v1", {})


def test_invalid_data_is_reported_with_its_type() -> None:
    with pytest.raises(InvalidEvent, match=r"agentbus.session.opened.v1 data is invalid"):
        default_registry().decode("agentbus.session.opened.v1", {"channel": "carrier-pigeon"})


def test_registry_refuses_two_models_for_one_event() -> None:
    with pytest.raises(ValueError, match="two models"):
        EventRegistry([SessionOpened, SessionOpened])


def test_catalog_models_are_strict_and_named_consistently() -> None:
    registry = default_registry()
    for model in EVENT_MODELS:
        assert model.model_config.get("extra") == "forbid"
        assert registry.model_for(model.kind.type) is model


def test_uuid7_is_a_time_ordered_version_7_uuid() -> None:
    ids = [uuid7(now_ns=n * 1_000_000) for n in (1, 2, 3)]
    assert ids == sorted(ids)
    parsed = uuid.UUID(uuid7())
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert len({uuid7() for _ in range(1000)}) == 1000


def test_uuid5_is_the_standard_librarys_own() -> None:
    # Idempotency-Keys become event ids through it: a change would post a retry twice
    namespace = uuid.UUID("6f1d2a8e-3c59-4a3e-9d7b-1b2c3d4e5f60")
    names = ["", "ws/s1/key", "ünï/cödé/🔑", *(f"acme/s{n}/{'k' * n}" for n in range(0, 300, 7))]
    for name in names:
        assert uuid5(namespace, name) == str(uuid.uuid5(namespace, name)), name
    for namespace in (uuid.NAMESPACE_DNS, uuid.NAMESPACE_URL):
        assert uuid5(namespace, "agentbus") == str(uuid.uuid5(namespace, "agentbus"))


def test_value_objects_compare_and_hash_by_their_fields() -> None:
    # `value` classes are frozen for mypy (an assignment to a field does not type-check) and
    # plain slots dataclasses at run time: equal and hashable by their fields, no __dict__
    state = SessionState(status="open", messages=2)
    same = SessionState(status="open", messages=2)
    assert state == same
    assert hash(state) == hash(same)
    assert len({state, same}) == 1
    assert dataclasses.replace(state, messages=3) != state
    assert not hasattr(state, "__dict__")
    assert Expect.at(3) == Expect(3)
    assert hash(ANY) == hash(Expect(None))


def test_aggregate_subjects() -> None:
    ref = AggregateRef("acme", "run", "01J-x_9")
    assert ref.subject("started") == "evt.acme.run.01J-x_9.started"
    assert ref.filter == "evt.acme.run.01J-x_9.*"
    assert ref.path == "run/01J-x_9"
    assert AggregateRef.from_subject("evt.acme.run.01J-x_9.started") == ref
    assert workspace_filter("acme") == "evt.acme.*.>"
    assert workspace_filter("acme", "run") == "evt.acme.run.>"
    with pytest.raises(InvalidEvent):
        AggregateRef.from_subject("live.acme.run.1.delta")
    with pytest.raises(InvalidEvent, match="snake_case"):
        AggregateRef("acme", "Run", "1")
    with pytest.raises(InvalidEvent):
        workspace_filter("ac.me")
