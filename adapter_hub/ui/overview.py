"""Read-only queries the web view needs beyond the Hub's methods: each answers one whole page in a few bulk
queries (never one query per adapter), so a page over 10,000 versions stays fast."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from ..registry import Hub, Lineage, MetricRecord, MetricTable, Task, Version, parse_ref
from ..registry import queries as q
from ..registry.models import AdapterRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow, VersionRow
from ..registry.records import AdapterSummary, Edge
from ..registry.refs import format_ref


@dataclass(frozen=True)
class Best:
    """The best value of the task's metric in one split among an adapter's live versions: the value
    `adapter-hub metrics` (Hub.compare_metrics) marks best when given those versions."""

    value: float
    number: int
    split: str | None


@dataclass(frozen=True)
class AdapterItem:
    summary: AdapterSummary
    best: tuple[Best, ...]  # one a split the task's metric was logged with, no split first
    backbones: tuple[str, ...]


@dataclass
class TaskGroup:
    task: Task
    adapters: list[AdapterItem] = field(default_factory=list)
    more: int = 0  # matching adapters after the ones shown (on the overview: the task's own page lists them)
    skipped: int = 0  # matching adapters before the ones shown (the pages before this one)


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
             limit: int | None = None, offset: int = 0) -> list[TaskGroup]:  # fmt: skip
    """Every task (or TASK) with its adapters (by name, at most LIMIT a task after the first OFFSET), each with
    its best metric and backbones, narrowed by FILTERS. One transaction: a task created meanwhile is either
    wholly there or not at all."""
    text = filters.text.strip().lower()
    with hub._session() as s:
        if task is not None:
            tasks = [q.task_record(q.task_row(s, task))]
        else:
            tasks = [q.task_record(row) for row in s.scalars(select(TaskRow).order_by(TaskRow.name))]
        groups = {t.name: TaskGroup(t) for t in tasks}
        summaries = q.adapter_summaries(s, task)
        backbones = _backbones(s, task)
        tagged = _tagged(s, task, filters.tag) if filters.tag else None
        kept: dict[str, list[AdapterSummary]] = {t.name: [] for t in tasks}
        for summary in summaries:
            key = (summary.task, summary.name)
            if summary.task not in groups:  # created after the tasks were read (PostgreSQL reads committed rows)
                continue
            if text and text not in summary.name.lower() and text not in summary.task.lower():
                continue
            if tagged is not None and key not in tagged:
                continue
            if filters.backbone and filters.backbone not in backbones.get(key, ()):
                continue
            group = groups[summary.task]
            if group.skipped < offset:
                group.skipped += 1
            elif limit is not None and len(kept[summary.task]) >= limit:
                group.more += 1
            else:
                kept[summary.task].append(summary)
        shown = {(a.task, a.name) for listed in kept.values() for a in listed}
        best = _best(s, task, tasks, shown)
    for name, listed in kept.items():
        groups[name].adapters = [
            AdapterItem(a, best.get((a.task, a.name), ()), tuple(backbones.get((a.task, a.name), ()))) for a in listed
        ]
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


def _best(s: Session, task: str | None, tasks: Sequence[Task], wanted: set[Key]) -> dict[Key, tuple[Best, ...]]:
    """Per adapter of WANTED, the best value of its task's metric in each split among its live versions. The
    values are the metric table of `adapter-hub metrics` (queries.metric_table: each version's latest value of
    each (metric, split), by step, then as logged), made once for all the shown live versions; an adapter's best
    is then the best under its task's direction of its own versions' values, in that table's order (its
    tie-break: the first there) — the value `adapter-hub metrics` marks given the adapter's live versions."""
    metric_of = {t.name: t.metric for t in tasks if t.metric}
    names = {a for _t, a in wanted if _t in metric_of}
    if not names:
        return {}
    stmt = (
        select(VersionRow.id, TaskRow.name, AdapterRow.name, VersionRow.number)
        .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
        .join(TaskRow, AdapterRow.task_id == TaskRow.id)
        .where(VersionRow.status == "ready", AdapterRow.name.in_(sorted(names)))
        .order_by(VersionRow.id)
    )
    ids: list[int] = []
    owner: dict[str, tuple[Key, int]] = {}  # ref -> ((task, adapter), number)
    for vid, t, a, number in s.execute(_in_task(stmt, task)):
        if (t, a) in wanted and t in metric_of:
            ids.append(vid)
            owner[format_ref(t, a, number)] = ((t, a), number)
    if not ids:
        return {}
    # the versions by a subquery, not an IN list of thousands of bound ids (slow to render and to send); it may
    # hold versions of adapters not shown (a name shown in another task), which the loop below passes over
    versions = _in_task(
        select(VersionRow.id)
        .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
        .join(TaskRow, AdapterRow.task_id == TaskRow.id)
        .where(VersionRow.status == "ready", AdapterRow.name.in_(sorted(names))),
        task,
    )
    table = q.metric_table(s, versions, sorted(set(metric_of.values())))
    lower = {t.name for t in tasks if t.direction == "min"}
    best: dict[Key, dict[str | None, Best]] = defaultdict(dict)
    for name, split in table.rows:  # no split first, then by split
        values = table.values[table.key(name, split)]
        by_adapter: dict[Key, list[str]] = defaultdict(list)
        for ref in values:
            if ref not in owner:
                continue
            key = owner[ref][0]
            if metric_of[key[0]] == name:  # its task's metric (not another task's)
                by_adapter[key].append(ref)
        for key, refs in by_adapter.items():
            ref = (min if key[0] in lower else max)(refs, key=values.__getitem__)
            best[key][split] = Best(values[ref], owner[ref][1], split)
    return {key: tuple(splits.values()) for key, splits in best.items()}


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


def _links(s: Session, numbers: dict[int, int]) -> dict[int, tuple[list[Link], list[Link]]]:
    """Version number -> (its parents, its children), for the versions of NUMBERS (id -> number), in two
    queries."""
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


@dataclass(frozen=True)
class VersionsPage:
    """One page of an adapter's versions, newest first, with their metrics and lineage links."""

    versions: list[Version]
    table: MetricTable | None  # the metric table of this page's versions (Hub.compare_metrics of them)
    best: dict[str, str]  # "name|split" -> the best of the adapter's live versions (all of them, not the page's)
    links: dict[int, tuple[list[Link], list[Link]]]
    total: int  # versions of the adapter, deleted ones too
    live: int


def adapter_versions(hub: Hub, task: str, adapter: str, *, offset: int, limit: int) -> VersionsPage:
    """LIMIT versions of TASK/ADAPTER after the newest OFFSET (deleted and purged ones too), in one transaction
    and a few bulk queries however many versions it has. The best of each metric is the one `adapter-hub
    metrics` marks among all the adapter's live versions (queries.metric_table: a deleted version competes
    for nothing)."""
    with hub._session() as s:
        adapter_id = q.adapter_row(s, task, adapter).id
        stmt = (
            select(VersionRow.id, VersionRow.number, VersionRow.status)
            .where(VersionRow.adapter_id == adapter_id)
            .order_by(VersionRow.number.desc())
        )
        rows = s.execute(stmt).all()
        shown = rows[offset : offset + limit]
        ids = [r.id for r in shown]
        table = q.metric_table(s, ids, None) if ids else None
        live = [r.id for r in rows if r.status == "ready"]
        best: dict[str, str] = {}
        if table is not None and table.rows and live:
            # the page's metrics only: the best of each is the same whatever other metrics are read
            best = q.metric_table(s, live, sorted({name for name, _split in table.rows})).best
        return VersionsPage(q.version_records(s, ids), table, best, _links(s, {r.id: r.number for r in shown}),
                            len(rows), len(live))  # fmt: skip


def _refs(s: Session, ids: set[int]) -> dict[int, str]:
    return {r.id: r.ref for r in q.ref_rows(s, sorted(ids))}


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


def direct_edges(hub: Hub, ref: str) -> tuple[list[Edge], list[Edge]]:
    """The version's parents and children (the edges to and from it), in two queries, however big its lineage."""
    with hub._session() as s:
        vid = q.resolve_row(s, parse_ref(ref), include_deleted=True).id
        stmt = select(EdgeRow).where(or_(EdgeRow.child_id == vid, EdgeRow.parent_id == vid)).order_by(EdgeRow.id)
        edges = list(s.scalars(stmt))
        refs = _refs(s, {vid} | {e.child_id for e in edges} | {e.parent_id for e in edges})
    records = [(e, Edge(refs[e.child_id], refs[e.parent_id], e.relation, e.weight, e.method, e.params)) for e in edges]
    return [r for e, r in records if e.child_id == vid], [r for e, r in records if e.parent_id == vid]


@dataclass(frozen=True)
class NearLineage:
    lineage: Lineage  # the version and its nearest ancestors and descendants, with the edges between them
    left_out: int  # ancestors and descendants beyond those


def near_lineage(hub: Hub, ref: str, limit: int) -> NearLineage:
    """The version's ancestors and descendants (Hub.lineage), nearest first, at most LIMIT versions in all: one
    query a generation (up and down together), so a chain of 10,000 fine-tunings reads only what is shown."""
    with hub._session() as s:
        root = q.resolve_row(s, parse_ref(ref), include_deleted=True).id
        seen, up, down = {root}, {root}, {root}
        while (up or down) and len(seen) < limit:
            found_up: set[int] = set()
            found_down: set[int] = set()
            for chunk in q.chunks(sorted(up | down)):
                stmt = select(EdgeRow.child_id, EdgeRow.parent_id).where(
                    or_(EdgeRow.child_id.in_([i for i in chunk if i in up]),
                        EdgeRow.parent_id.in_([i for i in chunk if i in down]))
                )  # fmt: skip
                for child, parent in s.execute(stmt):
                    if child in up and parent not in seen:
                        found_up.add(parent)
                    if parent in down and child not in seen:
                        found_down.add(child)
            up, down = set(), set()
            for vid, ahead in sorted([(i, up) for i in found_up] + [(i, down) for i in found_down], key=lambda t: t[0]):
                if vid not in seen and len(seen) < limit:
                    seen.add(vid)
                    ahead.add(vid)
        total = len(q.lineage_ids(s, root)) if up or down else len(seen)  # two recursive queries, ids only
        ids = sorted(seen)
        records = q.version_records(s, ids)
        refs = {i: v.ref for i, v in zip(ids, records)}
        edges = [Edge(refs[e.child_id], refs[e.parent_id], e.relation, e.weight, e.method, e.params)
                 for e in q.lineage_edges(s, seen)]  # fmt: skip
    return NearLineage(Lineage(refs[root], {v.ref: v for v in records}, edges), total - len(seen))
