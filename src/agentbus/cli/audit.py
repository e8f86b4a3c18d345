"""`agentbus audit ...`: verify the hash chain, export checkpoints and the notary's public key,
forget a data subject."""

from __future__ import annotations

import typer

audit_app = typer.Typer(
    help="Tamper evidence (hash chain, signed checkpoints) and erasure.", no_args_is_help=True
)
