"""The Hub: register, resolve, load and inspect adapter versions."""

from __future__ import annotations

import getpass
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError, InterfaceError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import FingerprintMismatch
from . import queries as q
from . import schema
from .db import WRITE, default_home, default_url, make_engine, parse_url
from .errors import AlreadyExists, DatabaseUnreachable, NotFound, RegistryError
from .models import DIRECTIONS, RELATIONS, AdapterRow, AliasRow, BackboneRow, EdgeRow, MetricRow, TagRow, TaskRow
from .models import VersionRow as VRow
from .records import (
    AdapterSummary,
    Backbone,
    Edge,
    GcReport,
    Lineage,
    MetricRecord,
    MetricTable,
    Parent,
    Problem,
    Task,
    Version,
)
from .refs import LATEST, Ref, check_name, parse_ref
from .store import ArtifactStore

MAX_ATTEMPTS = 80
ParentSpec = str | Parent | Sequence[Any] | Mapping[str, Any]


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_parent(spec: ParentSpec) -> Parent:
    if isinstance(spec, Parent):
        parent = spec
    elif isinstance(spec, str):
        parent = Parent(spec)
    elif isinstance(spec, Mapping):
        parent = Parent(**spec)
    else:
        parent = Parent(*spec)
    if parent.relation not in RELATIONS:
        raise RegistryError(f"unknown lineage relation {parent.relation!r}; use one of {', '.join(RELATIONS)}")
    return parent


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None


def _fingerprint_of(backbone: Any) -> str:
    if isinstance(backbone, str):
        fp = backbone.lower()
        if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            raise RegistryError(f"not a sha256 fingerprint: {backbone!r}")
        return fp
    fp = getattr(backbone, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    from ..formats import fingerprint  # a plain nn.Module

    return str(fingerprint(backbone))


class Hub:
    """The registry: a SQL database (any SQLAlchemy URL) plus a content-addressed artifact store."""

    def __init__(self, engine: Engine, home: Path) -> None:
        self.engine = engine
        self.home = Path(home)
        self.store = ArtifactStore(self.home / "artifacts")
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**WRITE), expire_on_commit=False)

    # -- opening -------------------------------------------------------------------------------------

    @staticmethod
    def locate(home: str | Path | None = None, db: str | None = None) -> tuple[Path, str]:
        """The home folder and database URL: arguments, else ADAPTER_HUB_HOME / ADAPTER_HUB_DB."""
        home_path = Path(home).expanduser() if home is not None else default_home()
        return home_path, db or default_url(home_path)

    @classmethod
    def open(cls, home: str | Path | None = None, db: str | None = None, *, create: bool = True) -> Hub:
        """Open the registry; an empty database is migrated to head (under a lock), any other must be
        at head: an older one is refused naming `adapter-hub db upgrade`, a newer one refused too."""
        home_path, url = cls.locate(home, db)
        where = parse_url(url).render_as_string(hide_password=True)
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                state = schema.schema_state(conn)
            if not state.up_to_date and create:
                # Judge again under the migration lock: a concurrent first open may be mid-migration, and
                # an empty database is migrated here. Anything else comes back as it is, for check().
                state = schema.upgrade(engine, only_if_empty=True)
            schema.check(state, f"database {where}")
        except (DatabaseError, InterfaceError, NoSuchModuleError, ModuleNotFoundError) as exc:
            engine.dispose()
            raise DatabaseUnreachable(f"cannot open database {where}: {_one_line(exc)}") from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, home_path)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, write: bool = False) -> Any:
        maker = self._write if write else self._read
        with maker() as s, s.begin():
            yield s

    # -- backbones and tasks -------------------------------------------------------------------------

    def add_backbone(
        self,
        name: str,
        backbone: Any,
        *,
        architecture: str | None = None,
        source: dict[str, Any] | None = None,
        description: str | None = None,
        exist_ok: bool = False,
    ) -> Backbone:
        """Record a backbone by fingerprint: an nn.Module, an AdapterModel, or a sha256 hex string."""
        check_name("backbone", name)
        fp = _fingerprint_of(backbone)
        try:
            with self._session(write=True) as s:
                row = s.scalar(select(BackboneRow).where(BackboneRow.name == name))
                if row is not None:
                    if exist_ok and row.fingerprint == fp:
                        return q.backbone_record(row)
                    same = " (same fingerprint)" if row.fingerprint == fp else ""
                    raise AlreadyExists(f"backbone {name!r} already exists{same}")
                row = BackboneRow(
                    name=name, architecture=architecture, fingerprint=fp, source=source, description=description
                )
                s.add(row)
                s.flush()
                return q.backbone_record(row)
        except IntegrityError:
            raise AlreadyExists(f"backbone {name!r} already exists") from None

    def backbones(self) -> list[Backbone]:
        with self._session() as s:
            return [q.backbone_record(r) for r in s.scalars(select(BackboneRow).order_by(BackboneRow.name))]

    def backbone(self, name: str) -> Backbone:
        with self._session() as s:
            return q.backbone_record(q.backbone_row(s, name))

    def add_task(
        self,
        name: str,
        *,
        domain: str | None = None,
        num_classes: int | None = None,
        output: dict[str, Any] | None = None,
        metric: str | None = None,
        direction: str = "max",
        description: str | None = None,
    ) -> Task:
        check_name("task", name)
        if direction not in DIRECTIONS:
            raise RegistryError(f"metric direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        output = dict(output or {})
        if num_classes is not None:
            if num_classes <= 0:
                raise RegistryError(f"num_classes must be positive, got {num_classes}")
            output["num_classes"] = int(num_classes)
        try:
            with self._session(write=True) as s:
                if s.scalar(select(TaskRow.id).where(TaskRow.name == name)) is not None:
                    raise AlreadyExists(f"task {name!r} already exists")
                row = TaskRow(
                    name=name,
                    domain=domain,
                    output=output or None,
                    metric=metric,
                    direction=direction,
                    description=description,
                )
                s.add(row)
                s.flush()
                return q.task_record(row)
        except IntegrityError:
            raise AlreadyExists(f"task {name!r} already exists") from None

    def tasks(self) -> list[Task]:
        with self._session() as s:
            return [q.task_record(r) for r in s.scalars(select(TaskRow).order_by(TaskRow.name))]

    def task(self, name: str) -> Task:
        with self._session() as s:
            return q.task_record(q.task_row(s, name))

    def add_adapter(self, task: str, name: str, *, description: str | None = None) -> AdapterSummary:
        """Create an adapter with no versions yet (register creates it on first use)."""
        check_name("adapter", name)
        try:
            with self._session(write=True) as s:
                task_row = q.task_row(s, task)
                taken = select(AdapterRow.id).where(AdapterRow.task_id == task_row.id, AdapterRow.name == name)
                if s.scalar(taken) is not None:
                    raise AlreadyExists(f"adapter {task}/{name} already exists")
                s.add(AdapterRow(task_id=task_row.id, name=name, description=description))
        except IntegrityError:
            raise AlreadyExists(f"adapter {task}/{name} already exists") from None
        return self.ls(task, name=name)[0]

    # -- registering ---------------------------------------------------------------------------------

    def register(
        self,
        model: Any,
        adapter_name: str,
        *,
        task: str,
        name: str | None = None,
        parents: Iterable[ParentSpec] = (),
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        backbone: str | None = None,
        created_by: str | None = None,
    ) -> Version:
        """Store the adapter's bytes and commit a new version numbered max+1 under TASK/NAME.

        The artifact is durable on disk before the row commits, so a crash leaves at worst an orphan blob
        (garbage for `gc`). Concurrent registrations of one adapter retry on the unique key, each retry in
        a fresh transaction after a rollback."""
        name = check_name("adapter", name or adapter_name)
        if adapter_name not in model.adapters:
            raise NotFound(f"the model holds no adapter {adapter_name!r}")
        parent_specs = list({(p.ref, p.relation): p for p in map(_as_parent, parents)}.values())
        metric_values = {str(k): float(v) for k, v in (metrics or {}).items()}
        bad = [k for k, v in metric_values.items() if not math.isfinite(v) or not k]
        if bad:
            raise RegistryError(f"metric values must be finite numbers with a name: {', '.join(bad)}")
        fp = model.fingerprint
        with self._session() as s:  # check everything before writing anything
            task_id = q.task_row(s, task).id
            backbone_id = q.backbone_for(s, fp, backbone).id
            parent_ids = [q.resolve_row(s, parse_ref(p.ref)).id for p in parent_specs]
        data = model.adapter_to_bytes(adapter_name)
        config = model.adapter_config(adapter_name).to_dict()
        trainable = int(model.num_trainable_parameters(adapter_name))
        digest = self.store.put(data)
        row_values = dict(
            backbone_id=backbone_id,
            digest=digest,
            size=len(data),
            config=config,
            trainable_params=trainable,
            description=description,
            created_by=created_by or _user(),
        )
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self._session(write=True) as s:
                    version_id = self._insert_version(
                        s, task_id, name, row_values, zip(parent_specs, parent_ids), metric_values, tags or {}
                    )
                break
            except IntegrityError:  # another writer took the number (or created the adapter): retry
                if attempt == MAX_ATTEMPTS - 1:
                    raise RegistryError(f"could not register {task}/{name}: too much contention") from None
                time.sleep(random.uniform(0, min(0.25, 0.002 * 2**attempt)))
        with self._session() as s:
            return q.version_records(s, [version_id])[0]

    @staticmethod
    def _insert_version(
        s: Session,
        task_id: int,
        name: str,
        values: dict[str, Any],
        parents: Iterable[tuple[Parent, int]],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
    ) -> int:
        adapter_id = s.scalar(select(AdapterRow.id).where(AdapterRow.task_id == task_id, AdapterRow.name == name))
        if adapter_id is None:
            adapter = AdapterRow(task_id=task_id, name=name)
            s.add(adapter)
            s.flush()
            adapter_id = adapter.id
        last = s.scalar(select(func.max(VRow.number)).where(VRow.adapter_id == adapter_id)) or 0
        version = VRow(adapter_id=adapter_id, number=last + 1, status="ready", **values)
        s.add(version)
        s.flush()
        for parent, parent_id in parents:
            s.add(
                EdgeRow(
                    child_id=version.id,
                    parent_id=parent_id,
                    relation=parent.relation,
                    weight=parent.weight,
                    method=parent.method,
                    params=parent.params,
                )
            )
        for metric, value in metrics.items():
            split = metric.split("/", 1)[0] if "/" in metric else None
            s.add(MetricRow(version_id=version.id, name=metric, value=value, split=split))
        for key, value in tags.items():
            s.add(TagRow(version_id=version.id, key=str(key), value=str(value)))
        s.flush()
        return version.id

    # -- resolving and loading -----------------------------------------------------------------------

    def resolve(self, ref: str | Ref, *, include_deleted: bool = False) -> Version:
        with self._session() as s:
            row = q.resolve_row(s, parse_ref(ref), include_deleted=include_deleted)
            return q.version_records(s, [row.id])[0]

    def versions(self, adapter: str, *, include_deleted: bool = False) -> list[Version]:
        """Every version of TASK/ADAPTER, oldest first."""
        ref = parse_ref(adapter)
        with self._session() as s:
            adapter_row = q.adapter_row(s, ref.task, ref.adapter)
            stmt = select(VRow.id).where(VRow.adapter_id == adapter_row.id).order_by(VRow.number)
            if not include_deleted:
                stmt = stmt.where(VRow.status == "ready")
            return q.version_records(s, list(s.scalars(stmt)))

    def ls(self, task: str | None = None, *, name: str | None = None) -> list[AdapterSummary]:
        with self._session() as s:
            if task is not None:
                q.task_row(s, task)
            return q.adapter_summaries(s, task, name)

    def read_artifact(self, ref: str | Ref) -> tuple[Version, bytes]:
        version = self.resolve(ref)
        return version, self.store.read(version.digest, version.ref)

    def load_into(self, model: Any, ref: str | Ref, *, name: str | None = None, force: bool = False) -> Version:
        """Attach a registered version to `model` as adapter `name` (default: the adapter's name),
        after checking the backbone fingerprint and the artifact digest."""
        version = self.resolve(ref)
        if not force and model.fingerprint != version.fingerprint:
            raise FingerprintMismatch(
                f"{version.ref} was made for backbone {version.backbone!r} "
                f"(fingerprint {version.fingerprint[:12]}…), the model's backbone is "
                f"{model.fingerprint[:12]}…; pass force to load it anyway"
            )
        data = self.store.read(version.digest, version.ref)
        model.adapter_from_bytes(name or version.adapter, data, force=force)
        return version

    # -- lineage, metrics, aliases, tags -------------------------------------------------------------

    def lineage(self, ref: str | Ref) -> Lineage:
        """The version, all its ancestors and all its descendants, with the edges between them."""
        with self._session() as s:
            root = q.resolve_row(s, parse_ref(ref), include_deleted=True)
            ids = sorted(q.lineage_ids(s, root.id))
            records = q.version_records(s, ids)
            refs = {i: v.ref for i, v in zip(ids, records)}
            return Lineage(
                root=refs[root.id],
                versions={v.ref: v for v in records},
                edges=[
                    Edge(refs[e.child_id], refs[e.parent_id], e.relation, e.weight, e.method, e.params)
                    for e in q.lineage_edges(s, set(ids))
                ],
            )

    def log_metric(
        self,
        ref: str | Ref,
        name: str,
        value: float,
        *,
        split: str | None = None,
        dataset: str | None = None,
        step: int | None = None,
    ) -> MetricRecord:
        value = float(value)
        if not name or not math.isfinite(value):
            raise RegistryError(f"metric {name!r} needs a name and a finite value, got {value}")
        with self._session(write=True) as s:
            version = q.resolve_row(s, parse_ref(ref))
            row = MetricRow(version_id=version.id, name=name, value=value, split=split, dataset=dataset, step=step)
            s.add(row)
            s.flush()
            return q.metric_record(row, q.ref_rows(s, [version.id])[0].ref)

    def metrics(self, ref: str | Ref) -> list[MetricRecord]:
        with self._session() as s:
            version = q.resolve_row(s, parse_ref(ref), include_deleted=True)
            return q.metric_records(s, [version.id])

    def compare_metrics(self, refs: Sequence[str | Ref], names: Sequence[str] | None = None) -> MetricTable:
        """The latest value of each metric (per split) of each version, and the best version per row."""
        with self._session() as s:
            rows = [q.resolve_row(s, parse_ref(r), include_deleted=True) for r in refs]
            return q.metric_table(s, [r.id for r in rows], names)

    def set_alias(self, ref: str | Ref, alias: str) -> Version:
        check_name("alias", alias)
        if alias == LATEST or alias.isdigit():
            raise RegistryError(f"alias {alias!r} is reserved")
        with self._session(write=True) as s:
            version = q.resolve_row(s, parse_ref(ref))
            row = s.scalar(select(AliasRow).where(AliasRow.adapter_id == version.adapter_id, AliasRow.name == alias))
            if row is None:
                s.add(AliasRow(adapter_id=version.adapter_id, name=alias, version_id=version.id))
            else:
                row.version_id = version.id
            s.flush()
            return q.version_records(s, [version.id])[0]

    def remove_alias(self, ref: str | Ref) -> None:
        parsed = parse_ref(ref)
        if parsed.alias is None:
            raise RegistryError(f"{parsed} names no alias; expected TASK/ADAPTER@ALIAS")
        with self._session(write=True) as s:
            q.resolve_row(s, parsed, include_deleted=True)  # raises with a clear message when unknown
            adapter = q.adapter_row(s, parsed.task, parsed.adapter)
            row = s.scalar(select(AliasRow).where(AliasRow.adapter_id == adapter.id, AliasRow.name == parsed.alias))
            s.delete(row)

    def set_tag(self, ref: str | Ref, key: str, value: str) -> Version:
        if not key:
            raise RegistryError("a tag needs a non-empty key")
        with self._session(write=True) as s:
            version = q.resolve_row(s, parse_ref(ref), include_deleted=True)
            row = s.get(TagRow, (version.id, key))
            if row is None:
                s.add(TagRow(version_id=version.id, key=key, value=str(value)))
            else:
                row.value = str(value)
            s.flush()
            return q.version_records(s, [version.id])[0]

    # -- deleting, verifying, collecting -------------------------------------------------------------

    def delete(self, ref: str | Ref) -> Version:
        """Soft delete: the version keeps its number and row but no longer resolves; its aliases go."""
        with self._session(write=True) as s:
            version = q.resolve_row(s, parse_ref(ref))
            version.status = "deleted"
            for alias in s.scalars(select(AliasRow).where(AliasRow.version_id == version.id)):
                s.delete(alias)
            s.flush()
            return q.version_records(s, [version.id])[0]

    def verify(self, ref: str | Ref | None = None) -> list[Problem]:
        """Check the blob of one version (or of every version that still has one) against its digest."""
        with self._session() as s:
            if ref is not None:
                ids = [q.resolve_row(s, parse_ref(ref), include_deleted=True).id]
            else:
                ids = list(s.scalars(select(VRow.id).where(VRow.status != "purged").order_by(VRow.id)))
            refs = q.ref_rows(s, ids)
        checked: dict[str, str | None] = {}
        problems = []
        for r in refs:
            if r.digest not in checked:
                checked[r.digest] = self.store.problem(r.digest, r.size)
            if checked[r.digest] is not None:
                problems.append(Problem(r.ref, r.digest, str(checked[r.digest])))
        return problems

    def gc(self, *, grace_s: float = 3600.0, purge_deleted: bool = False, dry_run: bool = False) -> GcReport:
        """Remove blobs no version references (and stale temp files), once older than `grace_s` — a
        register in flight has written its blob but not yet committed its row. With purge_deleted,
        soft-deleted versions give up their blobs too (they become 'purged': the row stays)."""
        purged: list[str] = []
        if purge_deleted:
            with self._session(write=not dry_run) as s:
                live = select(VRow.digest).where(VRow.status == "ready")
                stmt = select(VRow.id).where(VRow.status == "deleted", VRow.digest.not_in(live))
                ids = list(s.scalars(stmt))
                purged = [r.ref for r in q.ref_rows(s, ids)]
                if not dry_run:
                    for row in s.scalars(select(VRow).where(VRow.id.in_(ids))):
                        row.status = "purged"
        with self._session() as s:
            referenced = set(s.scalars(select(VRow.digest).where(VRow.status != "purged").distinct()))
        removed, freed = [], 0
        for digest, path in self.store.digests():
            if digest not in referenced and self.store.age_s(path) >= grace_s:
                removed.append(digest)
                freed += path.stat().st_size if dry_run else self.store.remove(path)
        temps = [p for p in self.store.temp_files() if self.store.age_s(p) >= grace_s]
        if not dry_run:
            for path in temps:
                freed += self.store.remove(path)
        return GcReport(removed=removed, freed_bytes=freed, temp_files=len(temps), purged_versions=purged)
