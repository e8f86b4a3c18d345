"""Every error agentbus raises on purpose. One place, so the HTTP layer can map them to
problem+json in one place too. Each message names what was wrong."""

from __future__ import annotations


class AgentbusError(Exception):
    """Base of agentbus's own errors."""


class InvalidEvent(AgentbusError, ValueError):
    """An event (or the address it would be written to) is malformed; nothing was written."""


class UnknownEventType(InvalidEvent):
    """A type string that no registered event model (or upcaster chain) can read."""


class ConcurrencyConflict(AgentbusError):
    """The aggregate moved since the caller read it: the expectation did not hold.

    `actual` is the aggregate's last position as the server saw it (0: no events), when known.
    """

    def __init__(self, subject: str, expected: int | None, actual: int | None) -> None:
        self.subject = subject
        self.expected = expected
        self.actual = actual
        want = "no events" if expected == 0 else f"last position {expected}"
        have = "unknown" if actual is None else ("no events" if actual == 0 else str(actual))
        super().__init__(f"concurrency conflict on {subject}: expected {want}, found {have}")


class StoreUnavailable(AgentbusError):
    """JetStream did not answer in time (or the connection is down). Retryable.

    The outcome of an append that failed this way is unknown: retry it with the *same* event
    ids, and the store reports the retry as a duplicate if the first attempt had landed.
    """


class StreamNotFound(StoreUnavailable):
    """JetStream answered that the stream does not exist (not created yet, or deleted): run
    `agentbus streams apply`."""


class StreamConfigError(AgentbusError):
    """A stream definition in streams/ is invalid, or applying it would be destructive."""


class EmbeddedServerError(AgentbusError):
    """An embedded server (nats-server, Postgres) could not be started or reached."""


class ProjectionTimeout(AgentbusError):
    """A query asked for a position its projection did not reach in time (read-your-writes)."""

    def __init__(self, projection: str, wanted: int, reached: int, timeout: float) -> None:
        self.projection = projection
        self.wanted = wanted
        self.reached = reached
        super().__init__(
            f"projection {projection!r} reached position {reached}, not {wanted}, "
            f"within {timeout:g}s; retry later"
        )


class SealBroken(InvalidEvent):
    """A sealed personal field does not open with its subject's key: it was altered, or moved
    from another event or field (docs/erasure.md). Tampering, not erasure."""


class SubjectKeyUnavailable(StoreUnavailable):
    """A sealed field's key is not loaded in this process yet (it is being fetched): retry.
    Reads through the event store load keys before decoding and never see this."""


class AuditError(AgentbusError):
    """An audit command cannot do what was asked (no chain yet, an unreadable key or
    checkpoints file). Tampering itself is a finding in a report, not this error."""
