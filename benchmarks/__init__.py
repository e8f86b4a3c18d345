"""agentbus benchmarks: each figure beside its raw ceiling, measured in the same run.

`python -m benchmarks [NAME ...]` runs scenarios and prints a table (see docs/benchmarks.md).
Benchmarks report; they never assert. A scenario is one module in this package exposing:

- `NAME: str` and `DESCRIPTION: str` (one line);
- `async def run(env: Env, options: Options) -> list[Figure]`.

It is listed by hand in `benchmarks/__main__.py`. `env` (see `benchmarks/env.py`) holds the
servers and a fresh workspace; `benchmarks/measure.py` has the shared measuring loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Options:
    """What the command line asks of every scenario. None: the scenario's own default."""

    events: int | None = None
    """Operations per measurement (each round measures every figure and ceiling once)."""
    seconds: float | None = None
    """Time per measurement instead of a fixed count of operations."""
    concurrency: int = 512
    """Operations in flight, for the platform figure and its raw ceiling alike."""
    rounds: int = 5
    """Measurements per figure; the median is reported (the machine is noisy)."""
    warmup: int | None = None
    """Operations of each kind before measuring. None: the scenario's default."""
    workers: int | None = None
    """Worker instances, for scenarios that run workers (runs). None: the scenario's default."""
    worker_concurrency: int | None = None
    """Work items each worker handles at a time. None: the scenario's default."""


@dataclass(frozen=True)
class Figure:
    """One measured number, and the raw ceiling it is compared with (None: a reference row)."""

    name: str
    value: float
    unit: str
    ceiling_name: str | None = None
    ceiling_value: float | None = None
    goal: float | None = None
    """The ratio value/ceiling this figure should reach, if one is declared."""
    samples: tuple[float, ...] = field(default=())
    """Every round's value; `value` is their median."""
    cpu_us_per_op: float | None = None
    """CPU time of the benchmark process per operation (median): where the client side stands."""

    @property
    def ratio(self) -> float | None:
        if not self.ceiling_value:
            return None
        return self.value / self.ceiling_value

    @property
    def goal_met(self) -> bool | None:
        ratio = self.ratio
        if self.goal is None or ratio is None:
            return None
        return ratio >= self.goal
