"""The registry schema as SQLAlchemy 2 typed ORM classes. `migrations/` must produce exactly this."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

RELATIONS = ("finetuned_from", "transferred_from", "composed_from", "imported_from")
STATUSES = ("ready", "deleted", "purged")
DIRECTIONS = ("max", "min")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class BackboneRow(Base):
    __tablename__ = "backbones"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[dict[str, Any] | None]
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (CheckConstraint(_in("direction", DIRECTIONS), name="direction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    domain: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict[str, Any] | None]
    metric: Mapped[str | None] = mapped_column(String(200))
    direction: Mapped[str] = mapped_column(String(3), default="max")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapters: Mapped[list[AdapterRow]] = relationship(back_populates="task")


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("task_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    task: Mapped[TaskRow] = relationship(back_populates="adapters")


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        CheckConstraint("number > 0", name="number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    number: Mapped[int] = mapped_column(Integer)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any] | None]
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    deleted_at: Mapped[datetime | None]
    # The registration key: a retry after an unknown commit outcome finds this row instead of adding one.
    token: Mapped[str | None] = mapped_column(String(64), unique=True)

    adapter: Mapped[AdapterRow] = relationship()
    backbone: Mapped[BackboneRow] = relationship()


class RegistryRow(Base):
    """The registry's identity (one row) and its artifact store. The store records the same id: see stores.py."""

    __tablename__ = "registry"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    registry_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The artifact store every client uses (see stores.py); NULL: each client's own HOME/artifacts.
    store_url: Mapped[str | None] = mapped_column(String(1000))


class UploadRow(Base):
    """A registration between storing its blob and committing its version. gc never removes a blob or
    temp file an upload names; the row goes in the transaction that commits the version."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(32), unique=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class EdgeRow(Base):
    """child was made from parent: fine-tuned, transferred, composed (with weight/method) or imported."""

    __tablename__ = "lineage"
    __table_args__ = (
        UniqueConstraint("child_id", "parent_id", "relation"),
        CheckConstraint(_in("relation", RELATIONS), name="relation"),
        CheckConstraint("child_id <> parent_id", name="no_self_loop"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    parent_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    relation: Mapped[str] = mapped_column(String(32))
    weight: Mapped[float | None] = mapped_column(Double)
    method: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any] | None]


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index(None, "version_id", "name"), Index(None, "name"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Double)
    split: Mapped[str | None] = mapped_column(String(64))
    dataset: Mapped[str | None] = mapped_column(String(200))
    step: Mapped[int | None] = mapped_column(Integer)
    logged_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)


class TagRow(Base):
    __tablename__ = "tags"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
