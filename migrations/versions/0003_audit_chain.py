"""Audit: the notary's hash chain over a stream, and its signed checkpoints.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Not read models: these tables are evidence, written once by the notary and never rebuilt
    # from the stream (rebuilding would re-hash whatever the stream holds now and launder any
    # tampering). They span the whole stream, not one workspace: no row-level security, and
    # the gateway's reader role gets no grant on them.
    #
    # The notary's head per stream: the last chained position and its link. Moved in the same
    # transaction as the links it covers, fenced on the old position (one writer at a time).
    op.execute(
        """
        CREATE TABLE audit_chain (
            stream     text        PRIMARY KEY,
            position   bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
            link       bytea       NOT NULL CHECK (length(link) = 32),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # One row per chained event: its link, and the SHA-256 of its stored bytes (which tells a
    # moved event from a modified one).
    op.execute(
        """
        CREATE TABLE audit_links (
            stream   text   NOT NULL,
            position bigint NOT NULL CHECK (position >= 1),
            link     bytea  NOT NULL CHECK (length(link) = 32),
            digest   bytea  NOT NULL CHECK (length(digest) = 32),
            PRIMARY KEY (stream, position)
        )
        """
    )
    # Signed statements "the link at `position` was `link` at `time`" (Ed25519 over the
    # canonical bytes defined in agentbus.audit.chain.checkpoint_message).
    op.execute(
        """
        CREATE TABLE audit_checkpoints (
            stream    text        NOT NULL,
            position  bigint      NOT NULL CHECK (position >= 1),
            link      bytea       NOT NULL CHECK (length(link) = 32),
            time      timestamptz NOT NULL,
            key_id    text        NOT NULL,
            signature bytea       NOT NULL,
            PRIMARY KEY (stream, position)
        )
        """
    )
    # Append-only: a mistake or a casual UPDATE cannot rewrite the evidence. (An owner can
    # still disable the trigger; the signed checkpoints and a witness's copy of them are what
    # catches that.)
    op.execute(
        """
        CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: audit evidence is never changed or deleted',
                TG_TABLE_NAME;
        END
        $$
        """
    )
    for table in ("audit_links", "audit_checkpoints"):
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
        )


def downgrade() -> None:
    op.execute("DROP TABLE audit_checkpoints")
    op.execute("DROP TABLE audit_links")
    op.execute("DROP TABLE audit_chain")
    op.execute("DROP FUNCTION audit_append_only()")
