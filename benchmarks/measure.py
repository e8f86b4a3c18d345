"""The measuring loop shared by scenarios: a fixed pool of workers, rounds, medians.

Figures and their ceilings are measured alternately, round after round, in a rotating order:
on a 2-core machine shared by nats-server and Python, a slow moment then hurts every
measurement a little instead of one of them a lot. The median of the rounds is reported.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Op = Callable[[], Awaitable[None]]
"""One operation of one worker (a worker may keep state between its calls, e.g. a position)."""
Workers = Callable[[int], Sequence[Op]]
"""Builds `concurrency` fresh workers for one measurement."""


@dataclass(frozen=True)
class Sample:
    """One measurement: operations per second, and the Python process's CPU time per op."""

    ops: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu_seconds / self.ops * 1e6


async def throughput(
    workers: Sequence[Op], *, count: int | None = None, seconds: float | None = None
) -> Sample:
    """Run `workers` concurrently (one asyncio task each, so `len(workers)` operations are in
    flight) until `count` operations are done in all, or for `seconds`. An operation that
    raises aborts the measurement: a benchmark of failures would measure nothing."""
    if (count is None) == (seconds is None):
        raise ValueError("give exactly one of count or seconds")
    done = 0
    tickets = iter(range(count)) if count is not None else itertools.repeat(None)
    deadline = time.perf_counter() + seconds if seconds is not None else None

    async def work(op: Op) -> None:
        nonlocal done
        for _ in tickets:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await op()
            done += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(work(op) for op in workers))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Sample(ops=done, seconds=wall, cpu_seconds=cpu)


@dataclass(frozen=True)
class Contender:
    """Something to measure: a name and how to build its workers."""

    name: str
    workers: Workers


async def measure_rounds(
    contenders: Sequence[Contender],
    *,
    rounds: int,
    concurrency: int,
    count: int | None,
    seconds: float | None,
    warmup: int,
) -> dict[str, list[Sample]]:
    """Warm every contender up, then measure each once per round in a rotating order."""
    for contender in contenders:
        if warmup:
            await throughput(contender.workers(concurrency), count=warmup)
    results: dict[str, list[Sample]] = {c.name: [] for c in contenders}
    for index in range(rounds):
        shift = index % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            sample = await throughput(contender.workers(concurrency), count=count, seconds=seconds)
            results[contender.name].append(sample)
    return results


def median_rate(samples: Sequence[Sample]) -> float:
    return statistics.median(s.per_second for s in samples)
