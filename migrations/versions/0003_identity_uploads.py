"""Registry identity, pending uploads, deletion time and registration keys.

- ``registry``: one row with the registry's id; the artifact store records the same id, so a store is
  never collected or written against a database it does not belong to.
- ``uploads``: a row for every registration between storing its blob and committing its version; gc
  never removes a blob (or temp file) that such a row names.
- ``versions.deleted_at``: when a version was soft-deleted (the grace period of purging counts from it).
- ``versions.token``: the registration key; a retry of a registration whose commit outcome was unknown
  finds the version it made instead of creating a second one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The identity survives a downgrade (see below): a store bound to this registry stays bound.
    if "registry" not in sa.inspect(op.get_bind()).get_table_names():
        op.create_table(
            "registry",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("registry_id", sa.String(36), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.CheckConstraint("id = 1", name=op.f("ck_registry_single_row")),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_registry")),
        )
    registry = sa.table("registry", sa.column("id"), sa.column("registry_id"), sa.column("created_at"))
    if op.get_bind().execute(sa.select(registry.c.id)).first() is None:
        row = {"id": 1, "registry_id": str(uuid.uuid4()), "created_at": datetime.now(timezone.utc)}
        op.bulk_insert(registry, [row])
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("token", name=op.f("uq_uploads_token")),
    )
    op.create_index(op.f("ix_uploads_digest"), "uploads", ["digest"])
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("token", sa.String(64), nullable=True))
        batch.create_unique_constraint(op.f("uq_versions_token"), ["token"])


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_constraint(op.f("uq_versions_token"), type_="unique")
        batch.drop_column("token")
        batch.drop_column("deleted_at")
    op.drop_index(op.f("ix_uploads_digest"), table_name="uploads")
    op.drop_table("uploads")
    # "registry" stays: the artifact store records this id, and an upgrade again must find the same one.
