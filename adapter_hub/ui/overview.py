"""Read-only queries the web view needs beyond the Hub's methods: each answers one whole page in a few bulk
queries (never one query per adapter), so a page over 10,000 versions stays fast."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from ..registry import Hub, MetricRecord, Task, parse_ref
from ..registry import queries as q
from ..registry.models import AdapterRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow, VersionRow
from ..registry.records import AdapterSummary
from ..registry.refs import format_ref


@dataclass(frozen=True)
class Best:
    """The best value of the task's metric among an adapter's live versions (each version's latest value)."""

    value: float
    number: int


@dataclass(frozen=True)
class AdapterItem:
    summary: AdapterSummary
    best: Best | None
    backbones: tuple[str, ...]


@dataclass
class TaskGroup:
    task: Task
    adapters: list[AdapterItem] = field(default_factory=list)
    more: int = 0  # matching adapters left out by the limit (the task's own page lists them all)


@dataclass(frozen=True)
class Filters:
    """What the overview is narrowed to: ``text`` in the task or adapter name (any case), a tag (``KEY`` or
    ``KEY=VALUE``) or a backbone name that one of the adapter's live versions has."""

    text: str = ""
    tag: str = ""
    backbone: str = ""

    @property
    def active(self) -> bool:
        return bool(self.text or self.tag or self.backbone)


Key = tuple[str, str]  # (task, adapter)


def overview(hub: Hub, task: str | None = None, filters: Filters = Filters(), *,
             limit: int | None = None) -> list[TaskGroup]:  # fmt: skip
    """Every task (or TASK) with its adapters (by name, at most LIMIT a task), each with its best metric and
    backbones, narrowed by FILTERS."""
    tasks = [hub.task(task)] if task is not None else hub.tasks()
    summaries = hub.ls(task)
    groups = {t.name: TaskGroup(t) for t in tasks}
    text = filters.text.strip().lower()
    with hub._session() as s:
        backbones = _backbones(s, task)
        tagged = _tagged(s, task, filters.tag) if filters.tag else None
        kept: dict[str, list[AdapterSummary]] = {t.name: [] for t in tasks}
        for summary in summaries:
            key = (summary.task, summary.name)
            if text and text not in summary.name.lower() and text not in summary.task.lower():
                continue
            if tagged is not None and key not in tagged:
                continue
            if filters.backbone and filters.backbone not in backbones.get(key, ()):
                continue
            if limit is not None and len(kept[summary.task]) >= limit:
                groups[summary.task].more += 1
                continue
            kept[summary.task].append(summary)
        shown = {(a.task, a.name) for listed in kept.values() for a in listed}
        best = _best(s, task, {t.name: t for t in tasks}, shown)
    for name, listed in kept.items():
        groups[name].adapters = [AdapterItem(a, best.get((a.task, a.name)), tuple(backbones.get((a.task, a.name), ())))
                                 for a in listed]  # fmt: skip
    return [g for g in groups.values() if g.adapters] if filters.active else list(groups.values())


def _in_task(stmt: Select, task: str | None) -> Select:
    return stmt.where(TaskRow.name == task) if task is not None else stmt


def _backbones(s: Session, task: str | None) -> dict[Key, list[str]]:
    stmt = (
        select(TaskRow.name, AdapterRow.name, BackboneRow.name)
        .join(AdapterRow, AdapterRow.task_id == TaskRow.id)
        .join(VersionRow, VersionRow.adapter_id == AdapterRow.id)
        .join(BackboneRow, VersionRow.backbone_id == BackboneRow.id)
        .where(VersionRow.status == "ready")
        .distinct()
    )
    out: dict[Key, list[str]] = defaultdict(list)
    for t, a, b in s.execute(_in_task(stmt, task)):
        out[t, a].append(b)
    return {k: sorted(v) for k, v in out.items()}


def _best(s: Session, task: str | None, tasks: dict[str, Task], wanted: set[Key]) -> dict[Key, Best]:
    """Per adapter of WANTED, the best of its live versions' latest values (by step, then as logged: the rule
    of Hub.compare_metrics) of the task's metric, under the task's direction."""
    metric_of = {name: t.metric for name, t in tasks.items() if t.metric}
    if not metric_of:
        return {}
    named = select(AdapterRow.id, TaskRow.name, AdapterRow.name).join(TaskRow, AdapterRow.task_id == TaskRow.id)
    adapters = {aid: (t, a) for aid, t, a in s.execute(_in_task(named, task)) if (t, a) in wanted}
    latest: dict[tuple[int, int], tuple[tuple[int, int], float]] = {}
    ids = sorted(adapters)
    for i in range(0, len(ids), 500):  # ids per IN (...) list
        stmt = (
            select(VersionRow.adapter_id, VersionRow.number, MetricRow.name, MetricRow.value, MetricRow.step,
                   MetricRow.id)
            .join(VersionRow, MetricRow.version_id == VersionRow.id)
            .where(VersionRow.adapter_id.in_(ids[i : i + 500]), VersionRow.status == "ready",
                   MetricRow.name.in_(sorted(set(metric_of.values()))))
        )  # fmt: skip
        for aid, number, name, value, step, mid in s.execute(stmt):
            if metric_of.get(adapters[aid][0]) != name:  # another task's metric
                continue
            order = (step if step is not None else -1, mid)
            seen = latest.get((aid, number))
            if seen is None or order > seen[0]:
                latest[aid, number] = (order, value)
    best: dict[Key, Best] = {}
    for (aid, number), (_order, value) in sorted(latest.items()):
        key = adapters[aid]
        lower = tasks[key[0]].direction == "min"
        current = best.get(key)
        if current is None or (value < current.value if lower else value > current.value):
            best[key] = Best(value, number)
    return best


def _tagged(s: Session, task: str | None, tag: str) -> set[Key]:
    key, has_value, value = tag.partition("=")
    stmt = (
        select(TaskRow.name, AdapterRow.name)
        .join(AdapterRow, AdapterRow.task_id == TaskRow.id)
        .join(VersionRow, VersionRow.adapter_id == AdapterRow.id)
        .join(TagRow, TagRow.version_id == VersionRow.id)
        .where(TagRow.key == key.strip(), VersionRow.status == "ready")
        .distinct()
    )
    if has_value:
        stmt = stmt.where(TagRow.value == value.strip())
    return {(t, a) for t, a in s.execute(_in_task(stmt, task))}


@dataclass(frozen=True)
class Link:
    """One lineage edge seen from a version: the other version's ref and how they are related."""

    ref: str
    relation: str
    weight: float | None
    method: str | None


def links(hub: Hub, task: str, adapter: str) -> dict[int, tuple[list[Link], list[Link]]]:
    """Version number -> (its parents, its children), for every version of TASK/ADAPTER, in two queries."""
    with hub._session() as s:
        stmt = select(VersionRow.id, VersionRow.number).join(AdapterRow).join(TaskRow)
        numbers = {vid: n for vid, n in s.execute(stmt.where(TaskRow.name == task, AdapterRow.name == adapter))}
        if not numbers:
            return {}
        ids = list(numbers)
        edges = list(
            s.execute(
                select(EdgeRow.child_id, EdgeRow.parent_id, EdgeRow.relation, EdgeRow.weight, EdgeRow.method)
                .where(or_(EdgeRow.child_id.in_(ids), EdgeRow.parent_id.in_(ids)))
                .order_by(EdgeRow.id)
            )
        )
        others = {e.child_id for e in edges} | {e.parent_id for e in edges}
        refs = _refs(s, others)
    out: dict[int, tuple[list[Link], list[Link]]] = {n: ([], []) for n in numbers.values()}
    for child, parent, relation, weight, method in edges:
        if child in numbers:
            out[numbers[child]][0].append(Link(refs[parent], relation, weight, method))
        if parent in numbers:
            out[numbers[parent]][1].append(Link(refs[child], relation, weight, method))
    return out


def _refs(s: Session, ids: set[int]) -> dict[int, str]:
    stmt = (
        select(VersionRow.id, TaskRow.name, AdapterRow.name, VersionRow.number)
        .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
        .join(TaskRow, AdapterRow.task_id == TaskRow.id)
        .where(VersionRow.id.in_(sorted(ids)))
    )
    return {vid: format_ref(t, a, n) for vid, t, a, n in s.execute(stmt)}


def task_versions(hub: Hub, task: str) -> dict[str, list[tuple[int, str]]]:
    """Adapter name -> [(number, status)] of every version of TASK (a known task), in one query: the compare
    page's picker."""
    stmt = (
        select(AdapterRow.name, VersionRow.number, VersionRow.status)
        .join(VersionRow, VersionRow.adapter_id == AdapterRow.id)
        .join(TaskRow, AdapterRow.task_id == TaskRow.id)
        .where(TaskRow.name == task)
        .order_by(AdapterRow.name, VersionRow.number)
    )
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with hub._session() as s:
        for adapter, number, status in s.execute(stmt):
            out[adapter].append((number, status))
    return dict(out)


def compared_metrics(hub: Hub, refs: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[MetricRecord]]:
    """For the compare page, in one transaction: the name of every metric these versions have (to pick from),
    and the values they logged with a step (of NAMES only, when given), to draw over steps."""
    with hub._session() as s:
        ids = [q.resolve_row(s, parse_ref(r), include_deleted=True).id for r in refs]
        ref_of = dict(zip(ids, refs))
        found = s.scalars(select(MetricRow.name).where(MetricRow.version_id.in_(ids)).distinct())
        all_names = sorted(set(found))
        stmt = select(MetricRow).where(MetricRow.version_id.in_(ids), MetricRow.step.is_not(None))
        if names:
            stmt = stmt.where(MetricRow.name.in_(list(names)))
        stepped = [q.metric_record(m, ref_of[m.version_id]) for m in s.scalars(stmt.order_by(MetricRow.id))]
    return all_names, stepped
