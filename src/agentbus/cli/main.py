"""`agentbus`: run the platform, and operate it (streams, database, schemas)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agentbus import __version__
from agentbus.cli.audit import audit_app
from agentbus.cli.replay import replay as replay_command
from agentbus.errors import AgentbusError, EmbeddedServerError
from agentbus.logs import configure_logging
from agentbus.settings import Settings

T = TypeVar("T")


def _group(help: str) -> typer.Typer:
    """A command group. Help texts are Markdown: paragraphs reflow to the terminal's width and
    brackets (`[erased]`) are text, not rich markup."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode="markdown")


app = typer.Typer(
    rich_markup_mode="markdown",
    name="agentbus",
    help="Event-sourced message bus for AI-agent gateways (NATS JetStream + Postgres).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
streams_app = _group("JetStream stream definitions (streams/).")
db_app = _group("Postgres read-model database.")
schemas_app = _group("JSON Schemas and AsyncAPI of the events.")
projections_app = _group("Read models: status, blue-green rebuild, dead letters.")
dlq_app = _group("Events a projection could not apply.")
projections_app.add_typer(dlq_app, name="dlq")
admin_app = _group("Workspaces, users and API keys.")
admin_workspace_app = _group("Workspaces.")
admin_user_app = _group("Users (password login).")
admin_key_app = _group("API keys.")
admin_app.add_typer(admin_workspace_app, name="workspace")
admin_app.add_typer(admin_user_app, name="user")
admin_budget_app = _group("Token budgets (hard limits).")
admin_app.add_typer(admin_key_app, name="apikey")
admin_app.add_typer(admin_budget_app, name="budget")
app.add_typer(admin_app, name="admin")
app.add_typer(projections_app, name="projections")
app.add_typer(streams_app, name="streams")
app.add_typer(db_app, name="db")
app.add_typer(schemas_app, name="schemas")
app.add_typer(audit_app, name="audit")
app.command("replay")(replay_command)

# Piped output (scripts, CI) gets wide lines instead of rich's 80-column truncation.
out = Console() if Console().is_terminal else Console(width=200)
err = Console(stderr=True) if Console(stderr=True).is_terminal else Console(stderr=True, width=200)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where embedded servers keep data. [default: ./.agentbus]"),
]


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one clear line per bad setting, not a traceback
        for problem in exc.errors():
            name = "AGENTBUS_" + "_".join(str(part) for part in problem["loc"]).upper()
            message = problem["msg"].removeprefix("Value error, ")
            err.print(
                f"[bold red]error:[/] {escape(name)}: {escape(message)}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; agentbus errors become one clear line on stderr and exit code 1."""
    try:
        return asyncio.run(coro)
    except AgentbusError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _nats_url(settings: Settings) -> str:
    return settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"


@app.callback()
def _main() -> None:
    """Configure nothing global here: each command reads Settings once."""


@app.command()
def version() -> None:
    """Print the agentbus version."""
    out.print(__version__)


@app.command()
def up(
    data_dir: DataDirOption = None,
    host: Annotated[
        str | None, typer.Option(help="HTTP bind address. [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port. [default: 8080]")] = None,
    nats_port: Annotated[
        int | None, typer.Option(help="Embedded nats-server port. [default: 4222]")
    ] = None,
) -> None:
    """Start everything in one process: embedded nats-server and Postgres (unless
    AGENTBUS_NATS_URL / AGENTBUS_DATABASE_URL point elsewhere), streams, migrations, and
    every role. Ctrl-C or SIGTERM stops it all; data stays in the data dir."""
    settings = _settings(data_dir=data_dir, host=host, port=port, nats_port=nats_port)
    configure_logging(settings.log_format, settings.log_level)
    _run(_up(settings))


@app.command()
def serve(
    role: Annotated[
        str, typer.Option(help="gateway, projector, worker, or all (comma-separated ok).")
    ] = "all",
    host: Annotated[str | None, typer.Option(help="HTTP bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
) -> None:
    """Run roles against external NATS and Postgres (AGENTBUS_NATS_URL, AGENTBUS_DATABASE_URL).
    Streams and migrations must have been applied (`agentbus streams apply`, `agentbus db
    upgrade`)."""
    from agentbus.runtime.roles import ROLES, Role

    settings = _settings(host=host, port=port)
    configure_logging(settings.log_format, settings.log_level)
    names = [r.strip() for r in role.split(",") if r.strip()]
    roles: set[Role] = set()
    for name in names:
        if name == "all":
            roles.update(ROLES)
        elif name in ROLES:
            roles.add(name)
        else:
            raise typer.BadParameter(f"unknown role {name!r}; choose from {', '.join(ROLES)}, all")
    if settings.nats_url is None or settings.database_url is None:
        err.print(
            "[bold red]error:[/] serve needs AGENTBUS_NATS_URL and AGENTBUS_DATABASE_URL "
            "(use `agentbus up` for the embedded servers)"
        )
        raise typer.Exit(2)
    _run(_serve(settings, settings.nats_url, settings.database_url, roles))


@app.command()
def chat(
    message: Annotated[
        str | None, typer.Argument(help="What to say; without it, read lines interactively.")
    ] = None,
    session: Annotated[str, typer.Option(help="Session id (created if new).")] = "terminal",
    workspace: Annotated[str, typer.Option(help="Workspace.")] = "demo",
    agent: Annotated[str, typer.Option(help="Agent of a new session.")] = "echo",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a reply.")] = 60.0,
) -> None:
    """Talk to an agent through the real pipeline: the message becomes an event, a worker runs
    the agent, its reply streams live and is stored in the session. Needs `agentbus up` (or
    AGENTBUS_NATS_URL pointing at a running deployment)."""
    settings = _settings()
    configure_logging(settings.log_format, "warning")
    _run(_chat(settings, message, session, workspace, agent, timeout))


async def _chat(
    settings: Settings,
    message: str | None,
    session_id: str,
    workspace: str,
    agent: str,
    timeout: float,
) -> None:
    from agentbus.audit.erasure import open_sealed_store
    from agentbus.cli.chat import say
    from agentbus.events.subjects import AggregateRef
    from agentbus.store.connection import connect_nats

    session = AggregateRef(workspace, "session", session_id)
    nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
    store = await open_sealed_store(nc, settings)
    try:
        lines = [message] if message is not None else None
        while True:
            if lines is None:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
            elif lines:
                text = lines.pop()
            else:
                break
            if not text.strip():
                continue
            out.print(f"[bold]{agent}>[/] ", end="")
            reply = await say(
                nc,
                store,
                session,
                text,
                agent=agent,
                timeout=timeout,
                redactor=settings.redactor,
                on_delta=lambda piece: out.print(piece, end="", markup=False, highlight=False),
            )
            out.print()
            out.print(
                f"[dim](run {reply.run_id}, stored in session {workspace}/{session_id})[/]",
                highlight=False,
            )
    finally:
        await nc.close()


# --------------------------------------------------------------------------- up / serve


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One `agentbus up` per data dir at a time."""
    lock_path = data_dir / "agentbus.lock"
    handle = lock_path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise EmbeddedServerError(
                f"data dir {data_dir} is in use by another agentbus (pid {owner})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


async def _up(settings: Settings) -> None:
    from agentbus.runtime.embedded import (
        EmbeddedNats,
        EmbeddedPostgres,
        ensure_data_dir,
        port_is_free,
    )

    data_dir = ensure_data_dir(settings.data_dir)
    # The lock first: a second `up` on the same data dir (and so, usually, the same port) is
    # told that, rather than that the port is busy.
    with _data_dir_lock(data_dir):
        if settings.port and not port_is_free(settings.host, settings.port):
            raise EmbeddedServerError(
                f"HTTP port {settings.host}:{settings.port} is busy: "
                "stop what uses it or pass --port"
            )
        nats_server: EmbeddedNats | None = None
        postgres: EmbeddedPostgres | None = None
        try:
            with err.status("starting nats-server…"):
                if settings.nats_url is None:
                    nats_server = EmbeddedNats(data_dir / "nats", port=settings.nats_port)
                    nats_url = await asyncio.to_thread(nats_server.start)
                else:
                    nats_url = settings.nats_url
            with err.status("starting Postgres…"):
                if settings.database_url is None:
                    postgres = EmbeddedPostgres(data_dir / "pg")
                    database_url = await asyncio.to_thread(postgres.start)
                else:
                    database_url = settings.database_url
            await _start_platform(
                settings, nats_url, database_url, {"gateway", "projector", "worker"}, data_dir
            )
        finally:
            if postgres is not None:
                await asyncio.to_thread(postgres.stop)
            if nats_server is not None:
                await asyncio.to_thread(nats_server.stop)
            err.print("agentbus stopped")


async def _serve(settings: Settings, nats_url: str, database_url: str, roles: set[Any]) -> None:
    await _start_platform(settings, nats_url, database_url, roles, None, prepare=False)


async def _start_platform(
    settings: Settings,
    nats_url: str,
    database_url: str,
    roles: set[Any],
    data_dir: Path | None,
    *,
    prepare: bool = True,
) -> None:
    from agentbus.db.migrations import upgrade
    from agentbus.resources import resource
    from agentbus.runtime.platform import Platform
    from agentbus.runtime.roles import run_roles, tune_collector
    from agentbus.store.streams import apply_streams, load_stream_specs

    tune_collector()
    platform = await Platform.connect(settings, nats_url, database_url)
    try:
        bootstrap_key = None
        demo_password = None
        if prepare:
            with err.status("applying streams and migrations…"):
                await apply_streams(platform.nc, load_stream_specs(resource("streams")))
                await upgrade(database_url)
            from agentbus.cli.admin import bootstrap, create_demo

            bootstrap_key = await bootstrap(platform.nc, platform.store)
            if bootstrap_key is not None and "gateway" in roles:
                demo_password = await create_demo(platform.store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready() -> None:
            _print_running(settings, nats_url, database_url, roles, data_dir)
            if bootstrap_key is not None:
                err.print(
                    "[bold yellow]first start:[/] system API key (shown once, store it now):\n"
                    f"  {bootstrap_key.token}",
                    highlight=False,
                )
            if demo_password is not None:
                err.print(
                    f"[bold yellow]first start:[/] web chat at http://{settings.host}:"
                    f"{settings.port}/ : log in as [bold]admin[/] with password "
                    f"[bold]{demo_password}[/] (workspace demo; shown once)",
                    highlight=False,
                )

        try:
            await run_roles(
                platform, roles, host=settings.host, port=settings.port, stop=stop, on_ready=ready
            )
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await platform.close()


def _print_running(
    settings: Settings, nats_url: str, database_url: str, roles: set[Any], data_dir: Path | None
) -> None:
    table = Table(
        title=f"agentbus {__version__} is running",
        title_justify="left",
        show_header=False,
        box=None,
        padding=(0, 2),
    )
    table.add_column(style="bold")
    table.add_column()
    if "gateway" in roles:
        base = f"http://{settings.host}:{settings.port}"
        table.add_row("HTTP", f"{base}  (health {base}/healthz, API docs {base}/docs)")
    table.add_row("NATS", nats_url)
    table.add_row("Postgres", database_url)
    table.add_row("roles", ", ".join(sorted(roles)))
    if data_dir is not None:
        table.add_row("data", str(data_dir))
    table.add_row("stop", "Ctrl-C (or SIGTERM)")
    err.print(table)


# --------------------------------------------------------------------------- streams


@streams_app.command("apply")
def streams_apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff, change nothing.")] = (
        False
    ),
    force: Annotated[bool, typer.Option("--force", help="Also apply destructive changes.")] = False,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Stream definitions. [default: streams/]")
    ] = None,
) -> None:
    """Create or update the JetStream streams from their definitions, printing the diff.
    Destructive changes (storage, retention, removed subjects, ...) need --force."""
    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    _run(_streams_apply(settings, directory, dry_run=dry_run, force=force))


async def _streams_apply(
    settings: Settings, directory: Path | None, *, dry_run: bool, force: bool
) -> None:
    from agentbus.resources import resource
    from agentbus.store.connection import connect_nats
    from agentbus.store.streams import apply_streams, load_stream_specs, plan_streams, render_plans

    specs = load_stream_specs(directory or resource("streams"))
    nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
    try:
        plans = await plan_streams(nc, specs)
        out.print(render_plans(plans))
        if dry_run:
            out.print("dry run: nothing changed")
            return
        await apply_streams(nc, specs, force=force)
        changed = [p for p in plans if p.action != "unchanged"]
        out.print(f"applied: {len(changed)} changed, {len(plans) - len(changed)} unchanged")
    finally:
        await nc.close()


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOption = None) -> None:
    """Apply the migrations in migrations/ to AGENTBUS_DATABASE_URL (or the embedded Postgres
    in the data dir, started for the occasion if `agentbus up` is not running)."""
    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _run(_db_upgrade(settings))


async def _db_upgrade(settings: Settings) -> None:
    from agentbus.db.migrations import upgrade
    from agentbus.runtime.embedded import EmbeddedPostgres, ensure_data_dir

    postgres: EmbeddedPostgres | None = None
    url = settings.database_url
    if url is None:
        postgres = EmbeddedPostgres(ensure_data_dir(settings.data_dir) / "pg")
        url = await asyncio.to_thread(postgres.start)
    try:
        before, after = await upgrade(url)
    finally:
        # Leave a server that `agentbus up` runs alone; stop one we started ourselves.
        if postgres is not None and not _locked_by_other(settings.data_dir):
            await asyncio.to_thread(postgres.stop)
    if before == after:
        out.print(f"database is up to date (revision {after})")
    else:
        out.print(f"database migrated: {before or 'empty'} -> {after}")


def _locked_by_other(data_dir: Path) -> bool:
    lock_path = data_dir / "agentbus.lock"
    if not lock_path.exists():
        return False
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# --------------------------------------------------------------------------- projections


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[Any]:
    """NATS + Postgres for an operator command: the external URLs, or the embedded servers of
    a running `agentbus up` (its NATS port and its data dir's Postgres)."""
    from agentbus.runtime.embedded import EmbeddedPostgres, ensure_data_dir
    from agentbus.runtime.platform import Platform

    postgres: EmbeddedPostgres | None = None
    database_url = settings.database_url
    if database_url is None:
        postgres = EmbeddedPostgres(ensure_data_dir(settings.data_dir) / "pg")
        database_url = await asyncio.to_thread(postgres.start)
    try:
        platform = await Platform.connect(settings, _nats_url(settings), database_url)
        try:
            yield platform
        finally:
            await platform.close()
    finally:
        if postgres is not None and not _locked_by_other(settings.data_dir):
            await asyncio.to_thread(postgres.stop)


@projections_app.command("status")
def projections_status(data_dir: DataDirOption = None) -> None:
    """Per projection: version, checkpoint, stream position, lag, state, dead letters."""
    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _run(_projections_status(settings))


async def _projections_status(settings: Settings) -> None:
    from agentbus.projections.health import projection_health

    async with _connected(settings) as platform:
        health = await projection_health(platform.engine, platform.store)
    table = Table(title="projections")
    for column in (
        "projection",
        "gen",
        "version",
        "status",
        "checkpoint",
        "stream",
        "lag",
        "lag s",
        "state",
        "dead letters",
    ):
        table.add_column(
            column, justify="right" if column not in ("projection", "status", "state") else "left"
        )
    colours = {
        "running": "green",
        "catching up": "yellow",
        "rebuilding": "cyan",
        "stalled": "red",
        "failed": "bold red",
    }
    for h in health:
        table.add_row(
            h.projection,
            str(h.generation),
            str(h.version),
            h.status,
            str(h.position),
            str(h.stream_position),
            str(h.lag_events),
            f"{h.lag_seconds:.1f}",
            f"[{colours[h.state]}]{h.state}[/]",
            str(h.dead_letters),
        )
    out.print(table)
    for h in health:
        if h.halted:
            out.print(f"[bold red]{h.projection} halted:[/] {h.halted}", highlight=False)
    if not health:
        out.print(
            "no projection has run yet: start `agentbus up` or `agentbus serve --role projector`"
        )


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(help="Projection to rebuild, e.g. sessions.")],
    data_dir: DataDirOption = None,
) -> None:
    """Rebuild NAME blue-green: a new generation is built from position 0 into new tables
    while the live one keeps serving; the views swap atomically once it has caught up."""
    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _run(_projections_rebuild(settings, name))


async def _projections_rebuild(settings: Settings, name: str) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from agentbus.projections.catalog import projection_named
    from agentbus.projections.generations import list_generations, start_rebuild
    from agentbus.projections.runtime import Progress as Step
    from agentbus.projections.runtime import ProjectionWorker

    try:
        projection = projection_named(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    async with _connected(settings) as platform:
        generation = await start_rebuild(platform.engine, projection)
        out.print(
            f"rebuilding {name} as generation {generation.generation} "
            f"(version {generation.version})"
        )
        stop = asyncio.Event()
        started = asyncio.get_running_loop().time()
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>9} ev/s"),
            TimeRemainingColumn(),
            console=err,
        ) as bar:
            task = bar.add_task(name, total=max(1, await platform.store.last_position()), rate="-")

            def show(step: Step) -> None:
                elapsed = asyncio.get_running_loop().time() - started
                bar.update(
                    task,
                    completed=step.position,
                    rate=f"{step.applied / elapsed:,.0f}" if elapsed > 0 else "-",
                )

            worker = ProjectionWorker(
                projection, generation.generation, platform.store, platform.engine, on_progress=show
            )
            runner = asyncio.create_task(worker.run(stop))
            try:
                while True:
                    async with platform.engine.connect() as connection:
                        current = {
                            g.generation: g
                            for g in await list_generations(connection, name, include_retired=True)
                        }
                    mine = current.get(generation.generation)
                    if mine is None or mine.status != "building":
                        break
                    # Another process may hold the lock and do the work: follow its checkpoint.
                    bar.update(
                        task,
                        completed=mine.position,
                        total=max(1, await platform.store.last_position()),
                    )
                    if runner.done():
                        runner.result()
                        break
                    await asyncio.sleep(0.5)
            finally:
                stop.set()
                await runner
        final = mine.status if mine is not None else "gone"
        if final != "live":
            raise EmbeddedServerError(f"generation {generation.generation} ended as {final}")
        out.print(
            f"{name}: generation {generation.generation} is live "
            f"(position {mine.position if mine else '?'})"
        )


@dlq_app.command("list")
def dlq_list(
    name: Annotated[str | None, typer.Argument(help="Only this projection.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Unresolved dead letters: position, type, error."""
    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _run(_dlq_list(settings, name))


async def _dlq_list(settings: Settings, name: str | None) -> None:
    from agentbus.projections.deadletters import list_dead_letters

    async with _connected(settings) as platform:
        letters = await list_dead_letters(platform.engine, name)
    if not letters:
        out.print("no dead letters")
        return
    table = Table(title="dead letters")
    for column in ("id", "projection", "gen", "position", "type", "error", "failed at"):
        table.add_column(column)
    for letter in letters:
        table.add_row(
            str(letter.id),
            letter.projection,
            str(letter.generation),
            str(letter.position),
            letter.event_type,
            letter.error,
            letter.failed_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@dlq_app.command("retry")
def dlq_retry(
    name: Annotated[str, typer.Argument(help="Projection whose dead letters to retry.")],
    data_dir: DataDirOption = None,
) -> None:
    """Apply NAME's dead letters again (a halted projection resumes and retries in order)."""
    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, settings.log_level)
    _run(_dlq_retry(settings, name))


async def _dlq_retry(settings: Settings, name: str) -> None:
    from agentbus.projections.catalog import projection_named
    from agentbus.projections.deadletters import retry_dead_letters

    try:
        projection = projection_named(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    async with _connected(settings) as platform:
        result = await retry_dead_letters(platform.engine, platform.store, projection)
    if result.unhalted:
        out.print(f"{name} was halted: released; it retries the failed event in order now")
        return
    out.print(f"resolved {len(result.resolved)}, still failing {len(result.failed)}")
    for letter_id, error in result.failed.items():
        out.print(f"  {letter_id}: {error}", highlight=False)
    if result.failed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- admin


def _admin(work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run `work(store)` against NATS (AGENTBUS_NATS_URL or the embedded port)."""
    settings = _settings()
    configure_logging(settings.log_format, "warning")

    async def go() -> T:
        from agentbus.audit.erasure import open_sealed_store
        from agentbus.store.connection import connect_nats

        nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
        try:
            store = await open_sealed_store(nc, settings)
            return await work(store)
        finally:
            await nc.close()

    return _run(go())


RoleOption = Annotated[str, typer.Option(help="owner, admin, member, viewer or auditor.")]


def _role(value: str) -> Any:
    if value not in ("owner", "admin", "member", "viewer", "auditor"):
        raise typer.BadParameter(f"unknown role {value!r}")
    return value


@admin_app.command("init")
def admin_init() -> None:
    """Issue the bootstrap system key (once per deployment; `agentbus up` does it too)."""
    from agentbus.cli.admin import bootstrap

    async def work(store: Any) -> Any:
        return await bootstrap(store._nc, store)

    key = _admin(work)
    if key is None:
        out.print("already bootstrapped: issue more keys with `agentbus admin apikey issue`")
        return
    out.print(f"system API key (shown once, store it now):\n{key.token}", highlight=False)


@admin_workspace_app.command("create")
def admin_workspace_create(
    workspace: Annotated[str, typer.Argument(help="Workspace id (lowercase, digits, _ -).")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    owner: Annotated[str | None, typer.Option(help="User id to make its owner.")] = None,
) -> None:
    """Create a workspace (and optionally make a user its owner)."""
    from agentbus.cli.admin import create_workspace

    _admin(lambda store: create_workspace(store, workspace, name or workspace, owner))
    out.print(f"workspace {workspace} created")


@admin_workspace_app.command("member")
def admin_workspace_member(
    workspace: Annotated[str, typer.Argument()],
    user: Annotated[str, typer.Argument()],
    role: RoleOption = "member",
) -> None:
    """Add a user to a workspace with a role (or change their role)."""
    from agentbus.cli.admin import add_member

    _admin(lambda store: add_member(store, workspace, user, _role(role)))
    out.print(f"{user} is {role} in {workspace}")


@admin_workspace_app.command("redaction")
def admin_workspace_redaction(
    workspace: Annotated[str, typer.Argument()],
    mode: Annotated[
        str, typer.Argument(help="mask (secrets and personal data masked) or keep (as sent).")
    ],
) -> None:
    """Mask secrets and personal data in the workspace's inbound text, or keep it as sent."""
    from agentbus.cli.admin import set_redaction

    if mode not in ("mask", "keep"):
        raise typer.BadParameter(f"unknown mode {mode!r}: mask or keep")
    changed = _admin(lambda store: set_redaction(store, workspace, mode))  # type: ignore[arg-type]
    state = "masked" if mode == "mask" else "kept as sent"
    out.print(f"{workspace}: inbound text {state}" + ("" if changed else " (already so)"))


@admin_user_app.command("create")
def admin_user_create(
    user: Annotated[str, typer.Argument(help="User id (lowercase, digits, _ -).")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    password: Annotated[
        str | None, typer.Option(help="Password (asked for when not given).")
    ] = None,
) -> None:
    """Create a user who logs in to the web chat with a password."""
    from agentbus.cli.admin import create_user

    secret = password or typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(secret) < 8:
        raise typer.BadParameter("passwords have at least 8 characters")
    _admin(lambda store: create_user(store, user, name or user, secret))
    out.print(f"user {user} created")


@admin_user_app.command("disable")
def admin_user_disable(user: Annotated[str, typer.Argument()]) -> None:
    """Disable a user: refused from their next request on."""
    from agentbus.cli.admin import set_user_enabled

    _admin(lambda store: set_user_enabled(store, user, False))
    out.print(f"user {user} disabled")


@admin_user_app.command("enable")
def admin_user_enable(user: Annotated[str, typer.Argument()]) -> None:
    """Enable a disabled user again."""
    from agentbus.cli.admin import set_user_enabled

    _admin(lambda store: set_user_enabled(store, user, True))
    out.print(f"user {user} enabled")


@admin_key_app.command("issue")
def admin_key_issue(
    workspace: Annotated[str, typer.Argument(help="The key's workspace.")],
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
    role: RoleOption = "member",
) -> None:
    """Issue an API key for a workspace; prints it once."""
    from agentbus.cli.admin import issue_key

    key = _admin(lambda store: issue_key(store, name, workspace, _role(role)))
    out.print(
        f"API key {key.key_id} ({role} in {workspace}), shown once:\n{key.token}", highlight=False
    )


@admin_key_app.command("revoke")
def admin_key_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (the part after ab_).")],
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Revoke an API key: refused from its next request on."""
    from agentbus.cli.admin import revoke_key

    _admin(lambda store: revoke_key(store, key_id, reason))
    out.print(f"API key {key_id} revoked")


@admin_budget_app.command("set")
def admin_budget_set(
    workspace: Annotated[str, typer.Argument()],
    tokens: Annotated[int, typer.Option(help="Tokens per period (a hard limit).")],
    period: Annotated[str, typer.Option(help="none, daily or monthly (UTC).")] = "monthly",
    alert_at: Annotated[
        float | None, typer.Option(help="Fraction of the limit that raises an alert.")
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Budget of one agent instead.")] = None,
) -> None:
    """Set a workspace's (or one agent's) token budget."""
    from agentbus.cli.admin import actor
    from agentbus.domain.budget import set_budget

    if period not in ("none", "daily", "monthly"):
        raise typer.BadParameter(f"unknown period {period!r}: none, daily or monthly")
    if tokens < 0:
        raise typer.BadParameter("tokens must be >= 0")
    _admin(
        lambda store: set_budget(
            store,
            workspace,
            limit_tokens=tokens,
            period=period,  # type: ignore[arg-type]
            by=actor(),
            alert_at=alert_at,
            agent=agent,
        )
    )
    scope = f"agent {agent}" if agent else "workspace"
    out.print(f"{workspace}: {scope} budget {tokens:,} tokens per {period} period")


# --------------------------------------------------------------------------- schemas


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Target folder. [default: schemas/]")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only report drift; exit 1 if any.")
    ] = False,
) -> None:
    """Write one JSON Schema (2020-12) per event type and an AsyncAPI 3.0 document."""
    from agentbus.events.catalog import default_registry
    from agentbus.events.schemas import check_schema_files, write_schema_files
    from agentbus.resources import resource

    target = directory or resource("schemas")
    registry = default_registry()
    if check:
        drift = check_schema_files(target, registry)
        for line in drift:
            out.print(line, highlight=False)
        if drift:
            out.print("schemas drifted: run `agentbus schemas export`")
            raise typer.Exit(1)
        out.print(f"schemas in {target} match the event models")
        return
    result = write_schema_files(target, registry)
    out.print(
        f"{target}: {len(result.written)} written, {len(result.unchanged)} unchanged",
        highlight=False,
    )


def main() -> None:
    app()
