"""`agentbus replay`: export the event history as CloudEvents JSON Lines, filtered, resumable.

Reads NATS directly (AGENTBUS_NATS_URL, or the embedded nats-server of `agentbus up`), as the
other operator commands do. See docs/replay.md."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Final

import typer
from rich.markup import escape

from agentbus.audit.replay import (
    InvalidReplayFilter,
    Replay,
    ReplayFilter,
    ResumePoint,
    export_line,
    resume_point,
)
from agentbus.errors import AgentbusError
from agentbus.settings import Settings

OPTIONS: Final = {
    "workspace": "--workspace",
    "aggregate": "--aggregate",
    "id": "--id",
    "types": "--type",
    "from_position": "--from-position",
    "to_position": "--to-position",
    "since": "--since",
    "until": "--until",
    "after": "--after",
    "limit": "--limit",
}
_FLUSH_EVERY: Final = 0.5  # seconds: an interrupted or killed export loses at most this much
_TAIL: Final = 64 * 1024  # first guess at the bytes holding a file's last line


class ReplayUsage(AgentbusError):
    """Options that do not go together, or a file that cannot be written or resumed."""


@dataclass
class Export:
    """What an export did so far: read by the summary, even after Ctrl-C or an error."""

    replay: Replay | None = None
    written: int = 0
    first: int | None = None
    """Position of the first event written."""
    last: int | None = None
    """Position of the last event written."""
    command: list[str] = field(default_factory=list)
    """The options to repeat when continuing (filters, output, limit)."""


def replay(
    workspace: Annotated[
        str | None, typer.Option("--workspace", "-w", metavar="WS", help="Only this workspace.")
    ] = None,
    aggregate: Annotated[
        str | None,
        typer.Option(
            "--aggregate", metavar="KIND", help="Only this aggregate kind (run, session...)."
        ),
    ] = None,
    aggregate_id: Annotated[
        str | None,
        typer.Option("--id", metavar="ID", help="Only this aggregate (needs --aggregate)."),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option(
            "--type", metavar="TYPE", help="Only this CloudEvents type (repeatable): any of them."
        ),
    ] = None,
    from_position: Annotated[
        int | None,
        typer.Option(
            "--from-position", metavar="POSITION", help="First stream position (inclusive)."
        ),
    ] = None,
    to_position: Annotated[
        int | None,
        typer.Option("--to-position", metavar="POSITION", help="Last stream position (inclusive)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="TIME",
            help="Stored at or after this ISO 8601 time (UTC if no zone).",
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", metavar="TIME", help="Stored before this ISO 8601 time (UTC if no zone)."
        ),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option("--after", metavar="CURSOR", help="Continue after this cursor (a position)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="Write to FILE (default: stdout)."),
    ] = None,
    append: Annotated[
        bool, typer.Option("--append", help="Add to an existing --output file.")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="FILE",
            help="Continue the export in FILE after its last line (creates it if missing).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", help="At most this many events.")
    ] = None,
) -> None:
    """Export events as CloudEvents JSON Lines (one per line, with its stream position as the
    `position` attribute), oldest first, up to the stream's end when the export starts. Prints
    the cursor to continue from on stderr; --after CURSOR (or --resume FILE) continues with no
    gap and no duplicate."""
    from agentbus.cli.main import _run, _settings, err
    from agentbus.events.catalog import default_registry
    from agentbus.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_format, "warning")

    def fail(message: str) -> typer.Exit:
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return typer.Exit(1)

    try:
        if resume is not None and (output is not None or append or after is not None):
            raise ReplayUsage("--resume FILE continues FILE: leave out --output, --append, --after")
        if append and output is None:
            raise ReplayUsage("--append needs --output FILE")
        if output is not None and output.exists() and not append:
            raise ReplayUsage(f"{output} exists: add --append to continue it, or --resume {output}")
        replay_filter = ReplayFilter.create(
            registry=default_registry(),
            workspace=workspace,
            aggregate=aggregate,
            id=aggregate_id,
            types=types or (),
            from_position=from_position,
            to_position=to_position,
            since=_time(since, "since"),
            until=_time(until, "until"),
        )
        if after is not None and after < 0:
            raise InvalidReplayFilter("after", f"a cursor is a position >= 0, got {after}")
        if limit is not None and limit < 1:
            raise InvalidReplayFilter("limit", f"must be at least 1, got {limit}")
        target = output
        if resume is not None:
            point = _resume_point(resume)
            after, target, append = point.position, resume, True
            _cut(resume, point)
    except InvalidReplayFilter as exc:
        raise fail(f"{OPTIONS.get(exc.field, exc.field)}: {exc.message}") from None
    except AgentbusError as exc:
        raise fail(str(exc)) from None

    export = Export(
        command=_arguments(
            [
                ("--workspace", workspace),
                ("--aggregate", aggregate),
                ("--id", aggregate_id),
                *(("--type", name) for name in types or ()),
                ("--from-position", from_position),
                ("--to-position", to_position),
                ("--since", since),
                ("--until", until),
                ("--limit", limit),
            ]
        )
    )
    if target is not None:
        export.command += ["--output", str(target), "--append"]
    interrupted = False
    try:
        with _sink(target, append=append) as sink:
            show = err.is_terminal and not (target is None and sys.stdout.isatty())
            _run(_export(settings, replay_filter, after or 0, limit, sink, export, show))
    except KeyboardInterrupt:
        interrupted = True
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        _summary(export, target, interrupted)
    if interrupted:
        raise typer.Exit(130)


def _arguments(options: list[tuple[str, str | int | None]]) -> list[str]:
    """The given options as arguments again (for the `next:` command)."""
    return [part for option, value in options if value is not None for part in (option, str(value))]


async def _export(
    settings: Settings,
    replay_filter: ReplayFilter,
    after: int,
    limit: int | None,
    sink: IO[bytes],
    export: Export,
    show_progress: bool,
) -> None:
    from agentbus.audit.erasure import open_sealed_store
    from agentbus.cli.main import _nats_url
    from agentbus.store.connection import connect_nats

    nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
    try:
        # Sealed personal fields opened, or [erased] once forgotten (docs/erasure.md).
        store = await open_sealed_store(nc, settings)
        replay = export.replay = await Replay.start(store, replay_filter, after=after, limit=limit)
        flushed = time.monotonic()
        with _progress(replay, export, show_progress) as tick:
            async for recorded in replay.events():
                sink.write(export_line(recorded))
                export.written += 1
                export.last = recorded.position
                if export.first is None:
                    export.first = recorded.position
                if export.written % 256 == 0:
                    tick()
                    if time.monotonic() - flushed > _FLUSH_EVERY:
                        sink.flush()
                        flushed = time.monotonic()
            tick()
    finally:
        with contextlib.suppress(Exception):
            sink.flush()
        with contextlib.suppress(Exception):
            await asyncio.shield(nc.close())


@contextlib.contextmanager
def _progress(replay: Replay, export: Export, show: bool) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr (position, events, events/s) when `show`; else nothing."""
    if not show or replay.range.empty:
        yield lambda: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agentbus.cli.main import err

    span = replay.range
    started = time.monotonic()
    with Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        TextColumn("position {task.fields[position]:,}/{task.fields[last]:,}"),
        TextColumn("{task.fields[events]:,} events"),
        TextColumn("{task.fields[rate]} ev/s"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(
            "replay",
            total=span.last - span.first + 1,
            position=span.first - 1,
            last=span.last,
            events=0,
            rate="-",
        )

        def tick() -> None:
            elapsed = time.monotonic() - started
            bar.update(
                task,
                completed=max(0, replay.reached - span.first + 1),
                position=replay.reached,
                events=export.written,
                rate=f"{export.written / elapsed:,.0f}" if elapsed > 0 else "-",
            )

        yield tick


@contextlib.contextmanager
def _sink(target: Path | None, *, append: bool) -> Iterator[IO[bytes]]:
    if target is None:
        yield sys.stdout.buffer
        return
    with target.open("ab" if append else "xb") as handle:
        yield handle


def _summary(export: Export, target: Path | None, interrupted: bool) -> None:
    """What was written, and the command that continues (stderr)."""
    from agentbus.cli.main import err

    replay = export.replay
    if replay is None:
        return
    where = str(target) if target is not None else "stdout"
    span = f" (positions {export.first}-{export.last})" if export.first is not None else ""
    state = "interrupted: " if interrupted else ""
    err.print(
        f"{state}{export.written:,} event{'' if export.written == 1 else 's'} written to "
        f"{where}{span}; "
        f"read through position {replay.next_after}",
        highlight=False,
    )
    if replay.complete:
        err.print(
            f"complete: every matching event through position {replay.range.last}",
            highlight=False,
        )
    command = shlex.join(["agentbus", "replay", *export.command, "--after", str(replay.next_after)])
    err.print(f"next: {command}", highlight=False, soft_wrap=True)


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidReplayFilter(
            name, f"{value!r} is not an ISO 8601 time (e.g. 2025-06-01T12:00:00Z)"
        ) from None


def _resume_point(path: Path) -> ResumePoint:
    """Where the export in `path` continues: after its last whole line (0: empty or missing)."""
    if not path.exists():
        return ResumePoint(0, 0)
    size = path.stat().st_size
    want = _TAIL
    with path.open("rb") as handle:
        while True:
            offset = max(0, size - want)
            handle.seek(offset)
            try:
                point = resume_point(handle.read(), offset)
            except ValueError as exc:
                raise ReplayUsage(f"cannot resume {path}: {exc}") from None
            if point is not None:
                return point
            want *= 4


def _cut(path: Path, point: ResumePoint) -> None:
    """Drop a torn last line (a crash mid-write): it is written again."""
    if path.exists() and path.stat().st_size > point.length:
        with path.open("r+b") as handle:
            handle.truncate(point.length)
