"""Projection runtime: generations, checkpoints and dead letters shared by every read model.

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
    # One row per generation of a projection. A generation owns its physical tables
    # (`<table>_g<generation>`); the stable view `<table>` points at the live generation.
    # `position` is the checkpoint: the last stream position whose effects are committed, written
    # in the same transaction as the rows (exactly-once effects).
    op.execute(
        """
        CREATE TABLE projection_generations (
            projection      text        NOT NULL,
            generation      integer     NOT NULL CHECK (generation >= 1),
            version         integer     NOT NULL,
            status          text        NOT NULL
                            CHECK (status IN ('live', 'building', 'retired')),
            position        bigint      NOT NULL DEFAULT 0 CHECK (position >= 0),
            last_event_time timestamptz,
            halted          text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            swapped_at      timestamptz,
            PRIMARY KEY (projection, generation)
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX projection_one_live ON projection_generations (projection) "
        "WHERE status = 'live'"
    )
    # Events a projection could not apply: kept with the error, never skipped silently.
    op.execute(
        """
        CREATE TABLE dead_letters (
            id          bigserial   PRIMARY KEY,
            projection  text        NOT NULL,
            generation  integer     NOT NULL,
            position    bigint      NOT NULL,
            subject     text        NOT NULL,
            event_type  text        NOT NULL,
            error       text        NOT NULL,
            payload     bytea       NOT NULL,
            failed_at   timestamptz NOT NULL DEFAULT now(),
            resolved_at timestamptz,
            UNIQUE (projection, generation, position)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE dead_letters")
    op.execute("DROP TABLE projection_generations")
