"""Queries shared by the Hub's methods: lookups with helpful errors, and rows turned into records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Select, case, func, literal, select
from sqlalchemy.orm import Session

from .errors import NotFound
from .models import AdapterRow, AliasRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow, VersionRow
from .records import AdapterSummary, Backbone, MetricRecord, MetricTable, Task, Version, aware
from .refs import Ref, format_ref, suggest

_CHUNK = 500  # ids per IN (...) list


def chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    """IDS in slices of at most _CHUNK, each small enough for one IN (...) list on every database."""
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def backbone_record(row: BackboneRow) -> Backbone:
    return Backbone(row.name, row.architecture, row.fingerprint, row.source, row.description, aware(row.created_at))


def task_record(row: TaskRow) -> Task:
    return Task(row.name, row.domain, row.description, row.output, row.metric, row.direction, aware(row.created_at))


def backbone_row(s: Session, name: str) -> BackboneRow:
    row = s.scalar(select(BackboneRow).where(BackboneRow.name == name))
    if row is None:
        names = s.scalars(select(BackboneRow.name))
        raise NotFound(f"unknown backbone {name!r}{suggest(name, names)}")
    return row


def backbone_for(s: Session, fingerprint: str, name: str | None) -> BackboneRow:
    """The backbone a model's fingerprint names (or the one asked for, checked against it)."""
    from ..errors import FingerprintMismatch

    if name is not None:
        row = backbone_row(s, name)
        if row.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"the model's backbone (fingerprint {fingerprint[:12]}…) is not backbone {name!r} "
                f"(fingerprint {row.fingerprint[:12]}…)"
            )
        return row
    stmt = select(BackboneRow).where(BackboneRow.fingerprint == fingerprint).order_by(BackboneRow.id).limit(1)
    row = s.scalar(stmt)
    if row is None:
        raise NotFound(
            f"no registered backbone has the model's fingerprint {fingerprint[:12]}…; "
            "add it first (Hub.add_backbone or `adapter-hub backbone add`)"
        )
    return row


def task_row(s: Session, name: str) -> TaskRow:
    row = s.scalar(select(TaskRow).where(TaskRow.name == name))
    if row is None:
        names = s.scalars(select(TaskRow.name))
        raise NotFound(f"unknown task {name!r}{suggest(name, names)}")
    return row


def adapter_row(s: Session, task: str, name: str) -> AdapterRow:
    stmt = select(AdapterRow).join(TaskRow).where(TaskRow.name == task, AdapterRow.name == name)
    row = s.scalar(stmt)
    if row is None:
        task_row(s, task)
        paths = (f"{t}/{a}" for t, a in s.execute(select(TaskRow.name, AdapterRow.name).join(AdapterRow.task)))
        raise NotFound(f"unknown adapter {task}/{name}{suggest(f'{task}/{name}', paths)}")
    return row


def _numbers(s: Session, adapter_id: int) -> str:
    nums = list(s.scalars(select(VersionRow.number).where(VersionRow.adapter_id == adapter_id)))
    return f"versions 1..{max(nums)}" if nums else "no versions"


def resolve_row(s: Session, ref: Ref, *, include_deleted: bool = False) -> VersionRow:
    adapter = adapter_row(s, ref.task, ref.adapter)
    if ref.alias is not None:
        stmt = (
            select(VersionRow)
            .join(AliasRow, AliasRow.version_id == VersionRow.id)
            .where(AliasRow.adapter_id == adapter.id, AliasRow.name == ref.alias)
        )
        row = s.scalar(stmt)
        if row is None:
            names = list(s.scalars(select(AliasRow.name).where(AliasRow.adapter_id == adapter.id)))
            known = f"; its aliases: {', '.join(sorted(names))}" if names else "; it has no aliases"
            raise NotFound(f"{ref.adapter_path} has no alias {ref.alias!r}{known}")
        return row
    if ref.number is not None:
        stmt = select(VersionRow).where(VersionRow.adapter_id == adapter.id, VersionRow.number == ref.number)
        row = s.scalar(stmt)
        if row is None:
            raise NotFound(f"{ref} does not exist: {ref.adapter_path} has {_numbers(s, adapter.id)}")
    else:
        stmt = (
            select(VersionRow)
            .where(VersionRow.adapter_id == adapter.id, VersionRow.status == "ready")
            .order_by(VersionRow.number.desc())
            .limit(1)
        )
        row = s.scalar(stmt)
        if row is None:
            raise NotFound(f"{ref.adapter_path} has no live version")
    if row.status != "ready" and not include_deleted:
        raise NotFound(f"{ref} was deleted")
    return row


@dataclass(frozen=True)
class RefRow:
    id: int
    ref: str
    digest: str
    size: int


def ref_rows(s: Session, ids: Iterable[int]) -> list[RefRow]:
    ids = list(ids)
    out: dict[int, RefRow] = {}
    for chunk in chunks(ids):
        stmt = (
            select(VersionRow.id, TaskRow.name, AdapterRow.name, VersionRow.number, VersionRow.digest, VersionRow.size)
            .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
            .join(TaskRow, AdapterRow.task_id == TaskRow.id)
            .where(VersionRow.id.in_(chunk))
        )
        for vid, task, adapter, number, digest, size in s.execute(stmt):
            out[vid] = RefRow(vid, format_ref(task, adapter, number), digest, size)
    return [out[i] for i in ids if i in out]


def version_records(s: Session, ids: Sequence[int]) -> list[Version]:
    """Records for these version ids, in the same order; aliases and tags fetched in bulk."""
    rows: dict[int, tuple[VersionRow, str, str, str, str]] = {}
    aliases: dict[int, list[str]] = defaultdict(list)
    tags: dict[int, dict[str, str]] = defaultdict(dict)
    for chunk in chunks(ids):
        stmt = (
            select(VersionRow, TaskRow.name, AdapterRow.name, BackboneRow.name, BackboneRow.fingerprint)
            .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
            .join(TaskRow, AdapterRow.task_id == TaskRow.id)
            .join(BackboneRow, VersionRow.backbone_id == BackboneRow.id)
            .where(VersionRow.id.in_(chunk))
        )
        for v, *names in s.execute(stmt):
            rows[v.id] = (v, *names)
        for vid, alias in s.execute(select(AliasRow.version_id, AliasRow.name).where(AliasRow.version_id.in_(chunk))):
            aliases[vid].append(alias)
        for vid, key, value in s.execute(
            select(TagRow.version_id, TagRow.key, TagRow.value).where(TagRow.version_id.in_(chunk))
        ):
            tags[vid][key] = value
    out = []
    for vid in ids:
        v, task, adapter, backbone, fingerprint = rows[vid]
        out.append(
            Version(
                task=task,
                adapter=adapter,
                number=v.number,
                digest=v.digest,
                size=v.size,
                backbone=backbone,
                fingerprint=fingerprint,
                config=v.config,
                trainable_params=v.trainable_params,
                status=v.status,
                description=v.description,
                created_at=aware(v.created_at),
                created_by=v.created_by,
                aliases=tuple(sorted(aliases[vid])),
                tags=dict(sorted(tags[vid].items())),
            )
        )
    return out


def adapter_summaries(s: Session, task: str | None, name: str | None = None) -> list[AdapterSummary]:
    ready = VersionRow.status == "ready"
    stats_query = select(
        VersionRow.adapter_id.label("adapter_id"),
        func.count(case((ready, VersionRow.id))).label("live"),
        func.max(case((ready, VersionRow.number))).label("latest"),
        func.max(VersionRow.created_at).label("updated"),
    ).group_by(VersionRow.adapter_id)
    if task is not None:
        wanted = select(AdapterRow.id).join(TaskRow, AdapterRow.task_id == TaskRow.id).where(TaskRow.name == task)
        stats_query = stats_query.where(VersionRow.adapter_id.in_(wanted))
    stats = stats_query.subquery()
    stmt = (
        select(AdapterRow.id, TaskRow.name, AdapterRow.name, stats.c.live, stats.c.latest, stats.c.updated)
        .join(TaskRow, AdapterRow.task_id == TaskRow.id)
        .outerjoin(stats, stats.c.adapter_id == AdapterRow.id)
        .order_by(TaskRow.name, AdapterRow.name)
    )
    if task is not None:
        stmt = stmt.where(TaskRow.name == task)
    if name is not None:
        stmt = stmt.where(AdapterRow.name == name)
    rows = s.execute(stmt).all()
    aliases: dict[int, dict[str, int]] = defaultdict(dict)
    alias_stmt = select(AliasRow.adapter_id, AliasRow.name, VersionRow.number).join(
        VersionRow, AliasRow.version_id == VersionRow.id
    )
    if task is not None:
        alias_stmt = (
            alias_stmt.join(AdapterRow, AliasRow.adapter_id == AdapterRow.id).join(TaskRow).where(TaskRow.name == task)
        )
    for adapter_id, alias, number in s.execute(alias_stmt):
        aliases[adapter_id][alias] = number
    return [
        AdapterSummary(t, a, int(count or 0), latest, dict(sorted(aliases[aid].items())), aware(updated))
        for aid, t, a, count, latest, updated in rows
    ]


def lineage_ids(s: Session, root_id: int) -> set[int]:
    """The root, its ancestors and its descendants: two recursive queries, however deep the graph."""
    ids = {root_id}
    for up in (True, False):
        src, dst = (EdgeRow.child_id, EdgeRow.parent_id) if up else (EdgeRow.parent_id, EdgeRow.child_id)
        reach = select(literal(root_id).label("id")).cte("reach", recursive=True)
        reach = reach.union(select(dst.label("id")).join(reach, src == reach.c.id))
        ids.update(s.scalars(select(reach.c.id)))
    return ids


def lineage_edges(s: Session, ids: set[int]) -> list[EdgeRow]:
    """Every edge between two of these versions."""
    ordered = sorted(ids)
    found: list[EdgeRow] = []
    for chunk in chunks(ordered):
        stmt = select(EdgeRow).where(EdgeRow.child_id.in_(chunk), EdgeRow.parent_id.in_(ordered))
        found.extend(s.scalars(stmt))
    return sorted(found, key=lambda e: e.id)


def metric_record(row: MetricRow, ref: str) -> MetricRecord:
    return MetricRecord(ref, row.name, row.value, row.split, row.dataset, row.step, aware(row.logged_at))


def metric_records(s: Session, ids: Sequence[int]) -> list[MetricRecord]:
    refs = {r.id: r.ref for r in ref_rows(s, ids)}
    out = []
    for chunk in chunks(ids):
        stmt = select(MetricRow).where(MetricRow.version_id.in_(chunk)).order_by(MetricRow.id)
        out.extend(metric_record(m, refs[m.version_id]) for m in s.scalars(stmt))
    return out


_LOWER_IS_BETTER = ("loss", "error", "perplexity", "mse", "mae", "latency")


def metric_table(s: Session, ids: Sequence[int] | Select, names: Sequence[str] | None) -> MetricTable:
    """The metric table of these versions (`adapter-hub metrics`): each version's latest value of each (metric,
    split), by step, then as logged, and the best of each under its task's direction (else lower-is-better by
    name). ``ids``: version ids in the table's column order, or a SELECT of version ids (columns in id order) —
    for thousands of versions (the web view's overview), which an IN list of bound ids would make slow."""
    if isinstance(ids, Select):
        subquery = ids.scalar_subquery()
        where_version, where_metric = VersionRow.id.in_(subquery), MetricRow.version_id.in_(subquery)
        refs = {
            vid: format_ref(task, adapter, number)
            for vid, task, adapter, number in s.execute(
                select(VersionRow.id, TaskRow.name, AdapterRow.name, VersionRow.number)
                .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
                .join(TaskRow, AdapterRow.task_id == TaskRow.id)
                .where(where_version)
                .order_by(VersionRow.id)
            )
        }
        ordered = list(refs.values())
    else:
        where_version, where_metric = VersionRow.id.in_(ids), MetricRow.version_id.in_(ids)
        refs = {r.id: r.ref for r in ref_rows(s, ids)}
        ordered = list(dict.fromkeys(refs[i] for i in ids))
    directions: dict[str, str] = {}
    stmt = (
        select(TaskRow.metric, TaskRow.direction)
        .join(AdapterRow, AdapterRow.task_id == TaskRow.id)
        .join(VersionRow, VersionRow.adapter_id == AdapterRow.id)
        .where(where_version, TaskRow.metric.is_not(None))
        .distinct()  # one row per task, not per version
    )
    for metric, direction in s.execute(stmt):
        directions[metric] = direction
    values: dict[str, dict[str, float]] = defaultdict(dict)
    rows: dict[str, tuple[str, str | None]] = {}
    # plain columns, not ORM objects: a table over thousands of versions (the web view's) reads tens of thousands
    mstmt = select(MetricRow.version_id, MetricRow.name, MetricRow.split, MetricRow.value, MetricRow.step,
                   MetricRow.id).where(where_metric)  # fmt: skip
    if names:
        mstmt = mstmt.where(MetricRow.name.in_(list(names)))
    # the latest value wins: by step, then by insertion order
    metric_rows = sorted(s.execute(mstmt), key=lambda m: (m.step if m.step is not None else -1, m.id))
    for m in metric_rows:
        key = MetricTable.key(m.name, m.split)
        rows[key] = (m.name, m.split)
        values[key][refs[m.version_id]] = m.value
    best = {}
    for key, (name, _split) in rows.items():
        base = name.rsplit("/", 1)[-1]
        direction = directions.get(name) or directions.get(base)
        if direction is None:
            direction = "min" if any(w in base.lower() for w in _LOWER_IS_BETTER) else "max"
        pick = min if direction == "min" else max
        best[key] = pick(values[key], key=lambda ref, k=key: values[k][ref])
    order = sorted(rows, key=lambda k: (rows[k][0], rows[k][1] or ""))
    return MetricTable(ordered, [rows[k] for k in order], {k: dict(values[k]) for k in order}, best)
