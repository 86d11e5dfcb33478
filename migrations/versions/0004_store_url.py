"""The registry's artifact store, recorded in the database.

- ``registry.store_url``: the URL of the store every client of this registry reads and writes (an object
  store such as ``s3://bucket/prefix``, or a shared folder); NULL means each client's own ``HOME/artifacts``,
  the layout before this revision. Credentials are never part of it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("registry") as batch:
        batch.add_column(sa.Column("store_url", sa.String(1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registry") as batch:
        batch.drop_column("store_url")
