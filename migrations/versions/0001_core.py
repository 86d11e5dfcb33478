"""Core registry: backbones, tasks, adapters, versions and lineage.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backbones",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("architecture", sa.String(200), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("source", sa.JSON(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backbones")),
        sa.UniqueConstraint("name", name=op.f("uq_backbones_name")),
    )
    op.create_index(op.f("ix_backbones_fingerprint"), "backbones", ["fingerprint"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("domain", sa.String(200), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("metric", sa.String(200), nullable=True),
        sa.Column("direction", sa.String(3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("direction IN ('max', 'min')", name=op.f("ck_tasks_direction")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_tasks_name")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_adapters_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("task_id", "name", name=op.f("uq_adapters_task_id_name")),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("trainable_params", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.CheckConstraint("number > 0", name=op.f("ck_versions_number")),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name=op.f("fk_versions_adapter_id_adapters")),
        sa.ForeignKeyConstraint(["backbone_id"], ["backbones.id"], name=op.f("fk_versions_backbone_id_backbones")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_versions")),
        sa.UniqueConstraint("adapter_id", "number", name=op.f("uq_versions_adapter_id_number")),
    )
    op.create_index(op.f("ix_versions_backbone_id"), "versions", ["backbone_id"])
    op.create_index(op.f("ix_versions_digest"), "versions", ["digest"])
    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("child_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.Column("relation", sa.String(32), nullable=False),
        sa.Column("weight", sa.Double(), nullable=True),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "relation IN ('finetuned_from', 'transferred_from', 'composed_from', 'imported_from')",
            name=op.f("ck_lineage_relation"),
        ),
        sa.CheckConstraint("child_id <> parent_id", name=op.f("ck_lineage_no_self_loop")),
        sa.ForeignKeyConstraint(["child_id"], ["versions.id"], name=op.f("fk_lineage_child_id_versions")),
        sa.ForeignKeyConstraint(["parent_id"], ["versions.id"], name=op.f("fk_lineage_parent_id_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage")),
        sa.UniqueConstraint("child_id", "parent_id", "relation", name=op.f("uq_lineage_child_id_parent_id_relation")),
    )
    op.create_index(op.f("ix_lineage_parent_id"), "lineage", ["parent_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_lineage_parent_id"), table_name="lineage")
    op.drop_table("lineage")
    op.drop_index(op.f("ix_versions_digest"), table_name="versions")
    op.drop_index(op.f("ix_versions_backbone_id"), table_name="versions")
    op.drop_table("versions")
    op.drop_table("adapters")
    op.drop_table("tasks")
    op.drop_index(op.f("ix_backbones_fingerprint"), table_name="backbones")
    op.drop_table("backbones")
