"""`agentbus audit ...`: verify the hash chain, export checkpoints and the notary's public key,
forget a data subject."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

audit_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Tamper evidence (hash chain, signed checkpoints) and erasure.",
    no_args_is_help=True,
)


# --------------------------------------------------------------------------- tamper evidence
# (`agentbus.cli.main` imports this module, so its helpers are imported inside the commands.)

StreamOption = Annotated[
    str, typer.Option("--stream", help="The stream whose chain to use (tests use others).")
]


@audit_app.command("verify")
def audit_verify(
    first: Annotated[int, typer.Option("--from", help="First position to verify.")] = 1,
    last: Annotated[
        int | None,
        typer.Option("--to", help="Last position (default: the stream's end or the chain's head)."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="Trust this Ed25519 public key (PEM or hex), not the deployment's own.",
        ),
    ] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints",
            help="Check against these exported checkpoints (JSON Lines), not the database's.",
        ),
    ] = None,
    stream: StreamOption = "EVENTS",
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Re-read the stream, recompute the hash chain, and report OK or the first position
    where an event was modified, removed, inserted or reordered (exit 1)."""
    from agentbus.cli.main import _run, _settings
    from agentbus.logs import configure_logging

    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, "warning")
    ok = _run(_verify(settings, stream, first, last, public_key, checkpoints))
    if not ok:
        raise typer.Exit(1)


async def _verify(
    settings: Any,
    stream: str,
    first: int,
    last: int | None,
    public_key_file: Path | None,
    checkpoints_file: Path | None,
) -> bool:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from agentbus.audit.notary import notary_key, stream_subjects
    from agentbus.audit.verify import verify
    from agentbus.cli.main import _connected, err, out
    from agentbus.store.eventstore import EventStore

    trusted = None if public_key_file is None else _read_public_key(public_key_file)
    witness = None if checkpoints_file is None else _read_checkpoints(checkpoints_file)
    async with _connected(settings) as platform:
        if trusted is None:
            trusted = (await notary_key(platform.nc)).public
        store = EventStore(
            platform.nc, platform.store.registry, stream=stream, timeout=settings.store_timeout
        )
        subjects = await stream_subjects(store)
        with Progress(
            TextColumn("[bold]verifying {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as bar:
            task = bar.add_task(stream, total=None)
            report = await verify(
                store,
                platform.engine,
                trusted,
                subjects=subjects,
                first=first,
                last=last,
                witness=witness,
                on_progress=lambda at, end: bar.update(task, completed=at, total=end),
            )
    span = f"{report.stream} positions {report.first}..{report.last}"
    if report.finding is not None:
        f = report.finding
        out.print(
            f"[bold red]TAMPERED:[/] {span}: position {f.position} {f.kind}: {f.detail}",
            highlight=False,
            soft_wrap=True,
        )
        return False
    tail = (
        f"; {report.unchained} later event(s) not chained yet (the notary lags)"
        if report.unchained
        else ""
    )
    out.print(
        f"[bold green]OK:[/] {span}: {report.walked} event(s) recomputed, "
        f"{report.checkpoints} signed checkpoint(s) verified with key {report.key_id}{tail}",
        highlight=False,
        soft_wrap=True,
    )
    return True


def _read_public_key(path: Path) -> Any:
    from agentbus.audit.chain import load_public_key
    from agentbus.errors import AuditError

    try:
        return load_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read the public key {path}: {exc}") from None


def _read_checkpoints(path: Path) -> list[Any]:
    import orjson

    from agentbus.audit.chain import Checkpoint
    from agentbus.errors import AuditError

    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise AuditError(f"cannot read the checkpoints {path}: {exc}") from None
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            found.append(Checkpoint.from_json(orjson.loads(line)))
        except (orjson.JSONDecodeError, ValueError, AttributeError) as exc:
            raise AuditError(f"{path}:{number}: not a checkpoint: {exc}") from None
    return found


@audit_app.command("public-key")
def audit_public_key(
    output: Annotated[
        Path | None, typer.Option("--output", help="Write the PEM here instead of stdout.")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="64 hex digits instead of PEM.")] = False,
) -> None:
    """Print the notary's Ed25519 public key (PEM), for a witness to verify checkpoints."""
    from agentbus.audit.chain import key_id, public_key_pem, raw_public_key
    from agentbus.audit.notary import notary_key
    from agentbus.cli.main import _nats_url, _run, _settings, err, out
    from agentbus.logs import configure_logging
    from agentbus.store.connection import connect_nats

    settings = _settings()
    configure_logging(settings.log_format, "warning")

    async def fetch() -> Any:
        nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
        try:
            return (await notary_key(nc)).public
        finally:
            await nc.close()

    public = _run(fetch())
    rendered = raw_public_key(public).hex() + "\n" if raw else public_key_pem(public)
    if output is None:
        out.print(rendered, end="", highlight=False, soft_wrap=True)
        return
    output.write_text(rendered)
    err.print(f"wrote {output} (key id {key_id(public)})", highlight=False)


@audit_app.command("checkpoints")
def audit_checkpoints(
    output: Annotated[
        Path | None, typer.Option("--output", help="Write them here instead of stdout.")
    ] = None,
    stream: StreamOption = "EVENTS",
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Export the signed checkpoints as JSON Lines (stream, position, link, time, key_id,
    signature) for an outside witness to keep."""
    import orjson

    from agentbus.audit import records
    from agentbus.cli.main import _connected, _run, _settings, err
    from agentbus.db.engine import driver_connection
    from agentbus.logs import configure_logging

    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, "warning")

    async def export() -> list[Any]:
        async with _connected(settings) as platform, platform.engine.connect() as connection:
            return await records.checkpoints(await driver_connection(connection), stream)

    found = _run(export())
    document = b"".join(orjson.dumps(c.to_json()) + b"\n" for c in found)
    if output is None:
        sys.stdout.write(document.decode())
        return
    output.write_bytes(document)
    err.print(f"wrote {len(found)} checkpoint(s) of {stream} to {output}", highlight=False)


@audit_app.command("notarize")
def audit_notarize(
    stream: StreamOption = "EVENTS",
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Chain every event on the stream now and sign a checkpoint at the end, then exit (the
    projector role does this continuously; this is for a deployment that does not run it)."""
    from agentbus.audit.notary import NotaryOptions, notarize
    from agentbus.cli.main import _connected, _run, _settings, out
    from agentbus.logs import configure_logging
    from agentbus.store.eventstore import EventStore

    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, "warning")

    async def work() -> int:
        async with _connected(settings) as platform:
            store = EventStore(
                platform.nc, platform.store.registry, stream=stream, timeout=settings.store_timeout
            )
            return await notarize(platform.nc, store, platform.engine, NotaryOptions())

    position = _run(work())
    out.print(f"{stream}: chained and checkpointed through position {position}")


# --------------------------------------------------------------------------- erasure


@audit_app.command("forget")
def audit_forget(
    subject: Annotated[str, typer.Argument(help="The data subject: a message author, a user id.")],
    workspace: Annotated[
        str,
        typer.Option("--workspace", "-w", help="The subject's workspace (`_system` for users)."),
    ],
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (recorded in the event).")
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who asks. [default: the OS user]")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    settle: Annotated[
        float,
        typer.Option("--settle", hidden=True, help="Seconds between destroying and recording."),
    ] = 1.0,
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Forget a data subject: destroy their key (crypto-shredding). Their sealed fields read
    as [erased] from then on, in every process, replay and read model; the stream's bytes do
    not change, so the hash chain still verifies. Idempotent. docs/erasure.md."""
    import getpass

    from agentbus.cli.main import _run, _settings, out
    from agentbus.events.subjects import validate_token
    from agentbus.logs import configure_logging

    settings = _settings(data_dir=data_dir)
    configure_logging(settings.log_format, "warning")
    _run(_validated(validate_token, workspace))
    if not yes:
        typer.confirm(
            f"Destroy the key of {subject!r} in workspace {workspace}? "
            "Everything sealed for them becomes unreadable, for good",
            abort=True,
        )
    who = by or getpass.getuser() or "cli"
    done = _run(_forget(settings, workspace, subject, who, reason, settle))
    name = f"{subject!r} in workspace {workspace}"
    match done.outcome:
        case "destroyed":
            out.print(
                f"forgot {name}: destroyed key {done.key_id}; recorded at position "
                f"{done.position}; removed {done.live_purged} live output message(s) of "
                "their runs. Their sealed fields now read as [erased]; the read models "
                "erase their copies when they reach that position.",
                highlight=False,
                markup=False,
            )
        case "completed":
            out.print(
                f"{name}: the key was already destroyed; recorded the erasure at position "
                f"{done.position} (a forget that had stopped before recording it); removed "
                f"{done.live_purged} live output message(s) of their runs.",
                highlight=False,
                markup=False,
            )
        case "already_forgotten":
            out.print(
                f"{name} was already forgotten (at {done.forgotten_at:%Y-%m-%d %H:%M:%S %Z})"
                + (
                    f"; removed {done.live_purged} live output message(s) of their runs "
                    "left by a forget that had stopped."
                    if done.live_purged
                    else ": nothing to do."
                ),
                highlight=False,
                markup=False,
            )
        case "unknown":
            out.print(
                f"no key for {name}: nothing of theirs was sealed, nothing to do.",
                highlight=False,
                markup=False,
            )


async def _validated(check: Any, workspace: str) -> None:
    check(workspace, "workspace")


async def _forget(
    settings: Any, workspace: str, subject: str, by: str, reason: str | None, settle: float
) -> Any:
    from agentbus.audit.erasure import forget, open_sealed_store
    from agentbus.cli.main import _nats_url
    from agentbus.store.connection import connect_nats

    nc = await connect_nats(_nats_url(settings), timeout=settings.connect_timeout)
    try:
        store = await open_sealed_store(nc, settings)
        assert store.sealer is not None
        return await forget(
            store, store.sealer, workspace, subject, by=by, reason=reason, settle=settle
        )
    finally:
        await nc.close()
