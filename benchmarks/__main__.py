"""`python -m benchmarks [NAME ...]`: run scenarios, print each figure beside its raw ceiling.

python -m benchmarks                 # every scenario
python -m benchmarks append          # one
python -m benchmarks --list
python -m benchmarks append --events 20000 --rounds 7 --json > append.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentbus.runtime.roles import tune_collector
from benchmarks import Figure, Options, append, audit, http_ingest, projection, runs, sse
from benchmarks.env import Env, fresh_workspace, open_env

SCENARIOS: tuple[ModuleType, ...] = (append, projection, runs, http_ingest, sse, audit)
"""Every scenario, in the order `python -m benchmarks` runs them. Add new modules here."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Callable[[Env, Options], Awaitable[list[Figure]]]

    @classmethod
    def of(cls, module: ModuleType) -> Scenario:
        return cls(module.NAME, module.DESCRIPTION, module.run)


def main(argv: Sequence[str] | None = None) -> int:
    scenarios = {s.name: s for s in map(Scenario.of, SCENARIOS)}
    args = _parser(scenarios).parse_args(argv)
    if args.list:
        for scenario in scenarios.values():
            print(f"{scenario.name:<12} {scenario.description}")
        return 0
    unknown = [name for name in args.names if name not in scenarios]
    if unknown:
        print(
            f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(scenarios)}",
            file=sys.stderr,
        )
        return 2
    chosen = [scenarios[name] for name in args.names] or list(scenarios.values())
    options = Options(
        events=args.events,
        seconds=args.seconds,
        concurrency=args.concurrency,
        rounds=args.rounds,
        warmup=args.warmup,
        workers=args.workers,
        worker_concurrency=args.worker_concurrency,
    )
    # With --json the table goes to stderr, so stdout is exactly the JSON document.
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log or a pipe: no need to squeeze the table
    machine = _machine()  # before the run: the load average is then other processes' alone
    # Scenarios that run agentbus's components in this process (projector, notary, workers)
    # measure them as a server process runs them, contenders and ceilings alike.
    tune_collector()
    results, server = asyncio.run(
        _run(chosen, options, args.nats_url, args.postgres_url, console, machine)
    )
    if args.json:
        document = _document(results, options, server, machine)
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    return 0


def _parser(scenarios: dict[str, Scenario]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run agentbus benchmarks: each figure beside its raw ceiling, measured in "
        "the same run. Reports ratios; asserts nothing.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"scenarios to run (default: all of {', '.join(scenarios)})",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--events",
        type=_positive_int,
        metavar="N",
        help="operations per measurement (default: per scenario)",
    )
    size.add_argument(
        "--seconds",
        type=_positive_float,
        metavar="S",
        help="seconds per measurement instead of --events",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=512,
        metavar="N",
        help="operations in flight (default 512)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=5,
        metavar="N",
        help="measurements per figure, median reported (default 5)",
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N", help="operations of each kind before measuring"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker instances, for scenarios that run workers (runs: default 4)",
    )
    parser.add_argument(
        "--worker-concurrency",
        type=_positive_int,
        metavar="N",
        help="work items each worker handles at a time (runs: default 32)",
    )
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        help="use this NATS server instead of an embedded one (it is written to: use a "
        "disposable server)",
    )
    parser.add_argument(
        "--postgres-url",
        metavar="URL",
        help="use this Postgres instead of an embedded one (scenarios that need it)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="also print the results as JSON on stdout (the table then goes to stderr)",
    )
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


async def _run(
    scenarios: Sequence[Scenario],
    options: Options,
    nats_url: str | None,
    postgres_url: str | None,
    console: Console,
    machine: str,
) -> tuple[dict[str, tuple[list[Figure], float]], str]:
    results: dict[str, tuple[list[Figure], float]] = {}
    async with open_env(nats_url, postgres_url) as env:
        version = env.nc.connected_server_version
        server = f"nats-server {version.major}.{version.minor}.{version.patch}"
        for scenario in scenarios:
            env.workspace = fresh_workspace()  # scenarios create theirs: never the same one
            started = time.perf_counter()
            with console.status(f"{scenario.name}: {scenario.description}"):
                figures = await scenario.run(env, options)
            results[scenario.name] = (figures, time.perf_counter() - started)
            elapsed = results[scenario.name][1]
            console.print(_table(scenario, figures, elapsed, options, f"{machine}; {server}"))
    return results, server


def _table(
    scenario: Scenario, figures: Sequence[Figure], seconds: float, options: Options, setup: str
) -> Table:
    if options.seconds:
        size = f" of {options.seconds:g} s"
    elif options.events:
        size = f" of {options.events:,} ops"
    else:
        size = ""
    table = Table(
        title=f"{scenario.name} — {scenario.description}",
        title_justify="left",
        caption=f"{options.concurrency} in flight; median of {options.rounds} rounds{size}; "
        f"ratio = value / ceiling; {seconds:.0f} s in all; {setup}",
        caption_justify="left",
    )
    table.add_column("figure", overflow="fold", min_width=44)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("rounds (min-max)", justify="right", no_wrap=True)
    table.add_column("ceiling", overflow="fold")
    table.add_column("ceiling value", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("goal", justify="right", no_wrap=True)
    table.add_column("CPU µs/op", justify="right", no_wrap=True)
    for figure in figures:
        ratio, met = figure.ratio, figure.goal_met
        table.add_row(
            Text(figure.name),
            f"{_number(figure.value)} {figure.unit}",
            f"{_number(min(figure.samples))}-{_number(max(figure.samples))}"
            if figure.samples
            else "",
            Text(figure.ceiling_name or ""),
            f"{figure.ceiling_value:,.0f}" if figure.ceiling_value else "",
            Text(
                "" if ratio is None else f"{ratio:.2f}",
                style="" if met is None else ("green" if met else "bold red"),
            ),
            "" if figure.goal is None else f"≥ {figure.goal:.2f}",
            "" if figure.cpu_us_per_op is None else f"{figure.cpu_us_per_op:.0f}",
        )
    return table


def _number(value: float) -> str:
    """Whole numbers, but one decimal below 100 (latencies in ms are often a few units)."""
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _machine() -> str:
    # A load average well above 0 says something else competes for the cores: expect noise.
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores (load {load:.1f} before the run), "
        f"Python {platform.python_version()}, {platform.machine()}"
    )


def _document(
    results: dict[str, tuple[list[Figure], float]], options: Options, server: str, machine: str
) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "nats_server": server,
        "options": dataclasses.asdict(options),
        "scenarios": {
            name: {"seconds": round(seconds, 1), "figures": [_figure_json(f) for f in figures]}
            for name, (figures, seconds) in results.items()
        },
    }


def _figure_json(figure: Figure) -> dict[str, Any]:
    return {
        **dataclasses.asdict(figure),
        "name": figure.name.strip(),
        "ratio": figure.ratio,
        "goal_met": figure.goal_met,
    }


if __name__ == "__main__":
    sys.exit(main())
