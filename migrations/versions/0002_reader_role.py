"""The role gateway queries run as: subject to row-level security on every read model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOLOGIN: the gateway's own login role switches to it per transaction (SET LOCAL ROLE), so
    # it must be a member of it: GRANT agentbus_reader TO <gateway login> on an external
    # database (the embedded one runs as a superuser, which may switch to any role).
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agentbus_reader') THEN
                CREATE ROLE agentbus_reader NOLOGIN NOBYPASSRLS;
            END IF;
        END
        $$
        """
    )
    op.execute("GRANT USAGE ON SCHEMA public TO agentbus_reader")
    op.execute("GRANT SELECT ON projection_generations TO agentbus_reader")


def downgrade() -> None:
    op.execute("REVOKE ALL ON projection_generations FROM agentbus_reader")
    op.execute("REVOKE USAGE ON SCHEMA public FROM agentbus_reader")
