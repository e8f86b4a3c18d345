"""The durable JetStream consumers workers compete on.

- `run-queue`: every `run.queued` event is one work item. A worker holds it while it runs the
  run (renewing the lease with `in_progress`), acks it when the run has ended, naks it with a
  delay for a scheduled retry. If the worker dies the lease (`ack_wait`) runs out and JetStream
  hands the item to another worker, which takes the run over as a new attempt.
- `auto-reply`: inbound messages and the session's run decisions (assign, interrupt), and runs
  that ended (post the reply, hand the session to the next waiting run).

Both are created or updated idempotently at worker start (JetStream's create-or-update).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from agentbus.errors import StoreUnavailable
from agentbus.store.eventstore import EVENTS_STREAM

log = structlog.get_logger("agentbus.queue")

RUN_QUEUE = "run-queue"
AUTO_REPLY = "auto-reply"


def run_queue_config(lease: float) -> dict[str, object]:
    return {
        "durable_name": RUN_QUEUE,
        "description": "agentbus run queue: one item per queued run",
        "filter_subject": "evt.*.run.*.queued",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(lease * 1e9),
        "max_deliver": -1,  # attempts are counted by the run aggregate, not here
        "max_ack_pending": 10_000,
        "replay_policy": "instant",
    }


def auto_reply_config() -> dict[str, object]:
    return {
        "durable_name": AUTO_REPLY,
        "description": "agentbus auto-reply: inbound messages -> runs, runs -> replies",
        "filter_subjects": [
            "evt.*.session.*.message_received",
            "evt.*.session.*.run_assigned",
            "evt.*.session.*.run_interrupted",
            "evt.*.run.*.succeeded",
            "evt.*.run.*.failed",
            "evt.*.run.*.cancelled",
            "evt.*.run.*.timed_out",
        ],
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": 30_000_000_000,
        "max_deliver": -1,
        "max_ack_pending": 1_000,
        "replay_policy": "instant",
    }


async def ensure_consumer(nc: NATS, config: dict[str, object], timeout: float = 5.0) -> None:
    """Create the durable consumer, or update it to `config` (raw JetStream API)."""
    name = config["durable_name"]
    body = orjson.dumps({"stream_name": EVENTS_STREAM, "config": config})
    try:
        reply = await nc.request(
            f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{name}", body, timeout=timeout
        )
    except Exception as exc:
        raise StoreUnavailable(f"cannot create consumer {name}: {exc}") from exc
    answer = orjson.loads(reply.data)
    if "error" in answer:
        raise StoreUnavailable(f"consumer {name}: {answer['error'].get('description')}")


async def consume(
    nc: NATS,
    config: dict[str, object],
    process: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event,
    *,
    batch: int = 64,
) -> None:
    """Ensure the durable consumer `config`, then hand its messages to `process` one at a time,
    in stream order, until `stop`. `process` acks or naks each message itself."""
    await ensure_consumer(nc, config)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=str(config["durable_name"]), stream=EVENTS_STREAM)
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(batch, timeout=0.5)
            except (NatsTimeout, TimeoutError):
                continue
            except Exception as exc:  # NATS reconnecting: back off, keep the loop alive
                log.warning("fetch failed", consumer=config["durable_name"], error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                await process(message)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
