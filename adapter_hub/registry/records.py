"""What the Hub returns: plain frozen records, detached from any database session."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .refs import format_ref


def aware(value: datetime | None) -> Any:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Backbone(_Record):
    name: str
    architecture: str | None
    fingerprint: str
    source: dict[str, Any] | None
    description: str | None
    created_at: datetime


@dataclass(frozen=True)
class Task(_Record):
    name: str
    domain: str | None
    description: str | None
    output: dict[str, Any] | None
    metric: str | None
    direction: str
    created_at: datetime


@dataclass(frozen=True)
class Version(_Record):
    task: str
    adapter: str
    number: int
    digest: str
    size: int
    backbone: str
    fingerprint: str
    config: dict[str, Any] | None
    trainable_params: int | None
    status: str
    description: str | None
    created_at: datetime
    created_by: str | None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return format_ref(self.task, self.adapter, self.number)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **super().to_dict()}


@dataclass(frozen=True)
class AdapterSummary(_Record):
    task: str
    name: str
    versions: int  # live (not deleted) versions
    latest: int | None
    aliases: dict[str, int]
    updated_at: datetime | None


@dataclass(frozen=True)
class Parent:
    """A lineage edge to declare at register time: this version was made from `ref`."""

    ref: str
    relation: str = "finetuned_from"
    weight: float | None = None
    method: str | None = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class Edge(_Record):
    child: str
    parent: str
    relation: str
    weight: float | None
    method: str | None
    params: dict[str, Any] | None


@dataclass(frozen=True)
class Lineage(_Record):
    root: str
    versions: dict[str, Version]
    edges: list[Edge]

    def parents(self, ref: str) -> list[Edge]:
        return [e for e in self.edges if e.child == ref]

    def children(self, ref: str) -> list[Edge]:
        return [e for e in self.edges if e.parent == ref]

    def ancestors(self, ref: str | None = None) -> set[str]:
        return self._walk(ref or self.root, up=True)

    def descendants(self, ref: str | None = None) -> set[str]:
        return self._walk(ref or self.root, up=False)

    def _walk(self, start: str, *, up: bool) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            cur = todo.pop()
            for e in self.parents(cur) if up else self.children(cur):
                nxt = e.parent if up else e.child
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "versions": {k: v.to_dict() for k, v in self.versions.items()},
            "edges": [e.to_dict() for e in self.edges],
        }


@dataclass(frozen=True)
class MetricRecord(_Record):
    ref: str
    name: str
    value: float
    split: str | None
    dataset: str | None
    step: int | None
    logged_at: datetime


@dataclass(frozen=True)
class MetricTable(_Record):
    """Latest value of each (metric, split) for each ref; `best` per row under the task's direction."""

    refs: list[str]
    rows: list[tuple[str, str | None]]
    values: dict[str, dict[str, float]]  # "name|split" -> ref -> value
    best: dict[str, str]  # "name|split" -> ref

    @staticmethod
    def key(name: str, split: str | None) -> str:
        return f"{name}|{split or ''}"

    def value(self, ref: str, name: str, split: str | None = None) -> float | None:
        return self.values.get(self.key(name, split), {}).get(ref)


@dataclass(frozen=True)
class Problem(_Record):
    ref: str
    digest: str
    problem: str


@dataclass(frozen=True)
class GcReport(_Record):
    removed: list[str]
    freed_bytes: int
    temp_files: int
    purged_versions: list[str]
    expired_uploads: int = 0  # registrations that outlived the grace period without committing
