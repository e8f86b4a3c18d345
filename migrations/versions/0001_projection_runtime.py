"""Projection runtime: checkpoints and dead letters shared by every read model.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per projection version: the last stream position whose effects are committed.
    # Written in the same transaction as the projection's rows (exactly-once effects).
    op.execute(
        """
        CREATE TABLE projection_checkpoints (
            projection  text        NOT NULL,
            version     integer     NOT NULL,
            position    bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (projection, version)
        )
        """
    )
    # Events a projection could not apply: kept with the error, never skipped silently.
    op.execute(
        """
        CREATE TABLE dead_letters (
            id          bigserial   PRIMARY KEY,
            projection  text        NOT NULL,
            version     integer     NOT NULL,
            position    bigint      NOT NULL,
            subject     text        NOT NULL,
            event_type  text        NOT NULL,
            error       text        NOT NULL,
            payload     bytea       NOT NULL,
            failed_at   timestamptz NOT NULL DEFAULT now(),
            retried_at  timestamptz,
            UNIQUE (projection, version, position)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE dead_letters")
    op.execute("DROP TABLE projection_checkpoints")
