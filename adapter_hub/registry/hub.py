"""The Hub: register, resolve, load and inspect adapter versions."""

from __future__ import annotations

import contextlib
import getpass
import math
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Text, cast, delete, func, select, update
from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, DBAPIError, IntegrityError, InterfaceError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from .. import checks
from ..errors import FingerprintMismatch
from . import limits, schema, stores
from . import queries as q
from .db import (
    WRITE,
    connection_failed,
    default_home,
    default_url,
    make_engine,
    parse_url,
    sqlite_path,
    sqlite_writable,
    translate,
)
from .errors import (
    AlreadyExists,
    ArtifactError,
    ConnectionLost,
    DatabaseUnreachable,
    NotFound,
    ReadOnlyRegistry,
    RegistryBusy,
    RegistryError,
    SchemaError,
    StoreMismatch,
)
from .models import (
    DIRECTIONS,
    RELATIONS,
    AdapterRow,
    AliasRow,
    BackboneRow,
    EdgeRow,
    MetricRow,
    RegistryRow,
    TagRow,
    TaskRow,
    UploadRow,
    utcnow,
)
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
    aware,
)
from .refs import LATEST, Ref, check_key, check_name, parse_ref
from .store import ArtifactStore, sha256_hex
from .stores import Store

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


FILES_KEY = "files"  # where a backbone's source records the digest of its files (Hub.add_backbone(files=))


def _files_digest(source: Any) -> str | None:
    """The sha256 a backbone source records for its files, or None. Only a well-formed digest counts: a
    store path is built from it."""
    files = source.get(FILES_KEY) if isinstance(source, dict) else None
    digest = files.get("sha256") if isinstance(files, dict) else None
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


class _UploadExpired(Exception):
    """gc collected this registration's upload (it outlived the grace period): store the blob again."""


def _digest_lock_key(digest: str) -> int:
    return int(digest[:15], 16)  # 60 bits: a PostgreSQL advisory lock key (bigint)


class Hub:
    """The registry: a SQL database (any SQLAlchemy URL) plus a content-addressed artifact store.

    `read_only` is True when the database could only be opened for reading (a read-only file, folder or
    share): reads work, every write raises ReadOnlyRegistry."""

    def __init__(self, engine: Engine, home: Path, *, read_only: bool = False, where: str | None = None,
                 store: Store | None = None, store_url: str | None = None) -> None:  # fmt: skip
        self.engine = engine
        self.home = Path(home)
        self.store: Store = store if store is not None else ArtifactStore(self.home / "artifacts")
        # the store URL the database recorded when this Hub opened (None: each client's HOME/artifacts); a
        # registration commits only while the database still records it (see _check_store)
        self.store_url = store_url
        self.read_only = read_only
        self.where = where or engine.url.render_as_string(hide_password=True)
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**WRITE), expire_on_commit=False)

    # -- opening -------------------------------------------------------------------------------------

    @staticmethod
    def locate(home: str | Path | None = None, db: str | None = None) -> tuple[Path, str]:
        """The home folder and database URL: arguments, else ADAPTER_HUB_HOME / ADAPTER_HUB_DB."""
        if home is not None and not str(home).strip():
            raise RegistryError("--home is empty: give the registry's folder (or leave it out for ~/.adapter_hub)")
        if db is not None and not db.strip():
            raise RegistryError("--db is empty: give a SQLAlchemy URL (or leave it out for HOME/hub.db)")
        home_path = Path(home).expanduser() if home is not None else default_home()
        if home_path.exists() and not home_path.is_dir():
            raise RegistryError(f"registry home {home_path} is a file, not a folder (--home / ADAPTER_HUB_HOME)")
        if db is not None and (path := sqlite_path(parse_url(db))) is not None and not path.parent.is_dir():
            # the home is created on first use; a folder named only inside --db is more likely a typo
            raise RegistryError(f"cannot open database {db}: folder {path.parent} does not exist")
        return home_path, db or default_url(home_path)

    @classmethod
    def open(
        cls,
        home: str | Path | None = None,
        db: str | None = None,
        *,
        create: bool = True,
        store: str | stores.Recorded | None = None,
        store_options: Mapping[str, Any] | None = None,
    ) -> Hub:
        """Open the registry; an empty database is migrated to head (under a lock), any other must be
        at head: an older one is refused naming `adapter-hub db upgrade`, a newer one refused too.

        The artifact store is the one the database records (each client's HOME/artifacts when it records
        none). `store` (else :func:`~adapter_hub.registry.stores.using_store`, else $ADAPTER_HUB_STORE) names
        the store this client expects: a registry this very open creates records it (after checking it: reachable,
        no other registry's, no blobs); an existing registry that records another store, or none, is refused in
        one line and records nothing (`adapter-hub store set|copy` changes a registry's store). `store_options`:
        the filesystem's options (an endpoint, a region), never recorded. ``store=stores.RECORDED`` takes the
        database's store whatever the client configured, without checking or binding it (the `store` commands,
        which must work on a registry whose store is unreachable or broken).

        A SQLite file this process cannot write is opened read-only. A new (missing, empty) database is
        never created beside an artifact store that holds blobs, and a store that belongs to another
        registry is refused: both mean a mistyped --db / ADAPTER_HUB_DB. So is a recorded store that is empty
        and records no registry while the registry holds artifacts (another endpoint, a share not mounted). A
        connection that fails at once is tried again after a second."""
        home_path, url = cls.locate(home, db)
        parsed = parse_url(url)
        where = parsed.render_as_string(hide_password=True)
        admin = isinstance(store, stores.Recorded)
        wanted, options = stores.configured(store, store_options, home_path)
        named_default = wanted is not None and wanted == stores.default_local(home_path)
        if named_default:
            wanted = None  # the default folder, named explicitly: what a registry that records none uses
        # the store a new registry would use: never created beside one that holds another registry's blobs
        first_store = stores.open_store(wanted, options) if wanted else ArtifactStore(home_path / "artifacts")
        path = sqlite_path(parsed)
        read_only = path is not None and path.exists() and not sqlite_writable(path)
        if path is not None and not read_only and (not path.exists() or path.stat().st_size == 0):
            _refuse_new_beside(first_store, where)
        modes: list[str | None] = ["ro", "immutable"] if read_only else [None]
        for attempt in range(3):
            mode = modes[min(attempt, len(modes) - 1)]
            try:
                engine = make_engine(parsed, read_only=mode)
            except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:  # no such dialect or driver
                raise schema.database_error(exc, where) from None
            try:
                with engine.connect() as conn:
                    state = schema.schema_state(conn)
                break
            except (DatabaseError, InterfaceError) as exc:
                engine.dispose()
                cannot = any(m in _one_line(exc) for m in ("unable to open", "readonly database"))
                if attempt < len(modes) - 1 and path is not None and cannot:
                    # A WAL database whose index this user cannot create: read it as immutable, which is
                    # exact only while no write-ahead log holds commits the file lacks.
                    wal = path.with_name(path.name + "-wal")
                    if wal.exists() and wal.stat().st_size > 0:
                        raise DatabaseUnreachable(
                            f"cannot read database {where}: its write-ahead log {wal.name} holds changes this "
                            "user cannot apply (the file is read-only); open it once as its owner to fold them in"
                        ) from None
                    continue
                if not read_only and attempt == 0 and connection_failed(exc):
                    time.sleep(1.0 + random.uniform(0, 0.5))  # a transient disconnect: once more
                    continue
                raise schema.database_error(exc, where) from None
            except (NoSuchModuleError, ModuleNotFoundError) as exc:
                engine.dispose()
                raise schema.database_error(exc, where) from None
        try:
            creating = False
            if not state.up_to_date and create and not read_only:
                if state.empty:
                    _refuse_new_beside(first_store, where)  # checked before anything is created
                # Judge again under the migration lock: a concurrent first open may be mid-migration, and
                # a new database is migrated here (also one whose first migration was interrupted).
                try:
                    state = schema.upgrade(engine, only_if_new=True)
                except (DatabaseError, InterfaceError):
                    raise
                except Exception as exc:  # alembic and SQLAlchemy raise several types for a damaged schema
                    raise SchemaError(
                        f"database {where} holds no data but its schema (revision {state.current}) could not be "
                        f"brought to {state.head}: {_one_line(exc)}; remove it or run `adapter-hub db upgrade`"
                    ) from None
                creating = True
            schema.check(state, f"database {where}")
            hub = cls(engine, home_path, read_only=read_only, where=where)
            if creating and wanted is not None:
                hub._record_new_store(wanted, first_store)
            recorded = hub._recorded_store()
            if not admin:
                hub._refuse_other_store(recorded, stores.default_local(home_path) if named_default else wanted)
            if recorded is None:
                hub.store = ArtifactStore(home_path / "artifacts")
            elif recorded == wanted:
                hub.store = first_store
            elif admin:  # the `store` commands repair a registry whose store cannot even be set up
                try:
                    hub.store = stores.open_store(recorded, options)
                except RegistryError as exc:
                    hub.store = stores.unavailable(recorded, exc)
            else:
                hub.store = stores.open_store(recorded, options)
            hub.store_url = recorded
            if not admin:  # the `store` commands work on a registry whose store is unreachable or broken
                hub.store.check()
                hub._bind_store()
        except (DatabaseError, InterfaceError, NoSuchModuleError, ModuleNotFoundError) as exc:
            engine.dispose()
            raise schema.database_error(exc, where) from None
        except BaseException:
            engine.dispose()
            raise
        return hub

    def registry_id(self) -> str:
        with self._session() as s:
            row = s.get(RegistryRow, 1)
            if row is None:
                raise StoreMismatch(f"database {self.where} records no registry id; it is damaged")
            return row.registry_id

    def _recorded_store(self) -> str | None:
        with self._session() as s:
            return s.scalar(select(RegistryRow.store_url).where(RegistryRow.id == 1))

    def _record_new_store(self, wanted: str, store: Store) -> None:
        """A registry this open created records the store its client named. The store was checked before the
        database was created; it is checked again, bound and recorded with the registry row locked (FOR UPDATE:
        a registration commits wholly before, and is seen here, or after, and is refused by _check_store), and
        only while the registry records no store and holds no artifact (a concurrent first client may have
        recorded its own, or registered into its HOME/artifacts). Any failure records nothing."""
        with self._session(write=True) as s:
            recorded = s.scalar(select(RegistryRow.store_url).where(RegistryRow.id == 1).with_for_update())
            if recorded is not None or self._holds_artifacts(s):
                return  # judged by _refuse_other_store, as for any client
            db_id = s.scalar(select(RegistryRow.registry_id).where(RegistryRow.id == 1))
            _refuse_new_beside(store, self.where, db_id)
            if store.bind(db_id) != db_id:
                raise StoreMismatch(
                    f"the artifact store {store.url} was just bound to another registry than database {self.where} "
                    f"({db_id}); nothing was recorded: check --store / {stores.STORE_ENV}"
                )
            s.execute(update(RegistryRow).where(RegistryRow.id == 1).values(store_url=wanted))

    def _refuse_other_store(self, recorded: str | None, wanted: str | None) -> None:
        """A client that names a store (--store, $ADAPTER_HUB_STORE) other than the one the database records is
        refused in one line: only a new registry records its client's store, and `store set|copy` changes it."""
        if wanted is None or wanted == (recorded or stores.default_local(self.home)):
            return
        if recorded is None:
            raise StoreMismatch(
                f"database {self.where} keeps its artifacts in each machine's HOME/artifacts, not in {wanted} "
                f"(--store / {stores.STORE_ENV}); to move them run `adapter-hub store copy {wanted} --set`, or "
                "drop --store"
            )
        raise StoreMismatch(
            f"database {self.where} keeps its artifacts in {recorded}, not in {wanted} (--store / "
            f"{stores.STORE_ENV}); drop --store to use the registry's store, or change it with `adapter-hub "
            "store copy|set`"
        )

    def _holds_artifacts(self, s: Session) -> bool:
        """Whether any version or backbone of the registry has a blob (whatever its status)."""
        return s.scalar(select(VRow.id).limit(1)) is not None or bool(self._backbone_file_digests(s))

    def _check_store(self, s: Session, *, lock: bool = True) -> None:
        """Inside a write transaction: refuse to commit against a store the registry no longer uses (`store
        set` changed it since this Hub opened). The row is read FOR SHARE: `store set` updates it FOR UPDATE
        after checking every blob, so a registration commits wholly before or after that check."""
        stmt = select(RegistryRow.store_url).where(RegistryRow.id == 1)
        recorded = s.scalar(stmt.with_for_update(read=True) if lock else stmt)
        if recorded != self.store_url:
            raise StoreMismatch(
                f"the artifact store of registry {self.where} changed to {stores.shown(recorded, self.home)} since "
                "this client opened it; nothing was written: open the registry again"
            )

    def _bind_store(self) -> None:
        """Check that the artifact store belongs to this database; bind a store that records no owner yet: an
        empty one of a registry without artifacts, or one written before stores recorded their registry (it
        holds blobs the database references). A recorded store that is empty and unbound while the registry
        holds artifacts is a lookalike (another endpoint, a share not mounted): refused, never bound."""
        db_id = self.registry_id()
        owner = self.store.identity()
        if owner == db_id:
            return
        problem = self.foreign_store_problem(self.store, db_id, owner)
        if problem is not None:
            raise StoreMismatch(f"{problem}; check --db / ADAPTER_HUB_DB and --home")
        if self.store_url is not None and not self.store.has_blobs():
            with self._session() as s:
                holds = self._holds_artifacts(s)
            if holds:
                raise StoreMismatch(
                    f"the artifact store {self.store.url} holds no blob and does not record this registry: a "
                    "different endpoint, or a share that is not mounted? Check --store-option endpoint_url / "
                    "AWS_ENDPOINT_URL and the mount; nothing was written"
                )
        if not self.read_only:
            # a store this user cannot write stays unbound: reads still work, and gc refuses it
            with contextlib.suppress(ArtifactError):
                owner = self.store.bind(db_id)
                if owner != db_id:  # another registry bound this new store a moment ago
                    raise StoreMismatch(
                        f"the artifact store {self.store.url} was just bound to another registry ({owner}) "
                        f"than database {self.where} ({db_id}); check --db / ADAPTER_HUB_DB and --home"
                    )

    def foreign_store_problem(self, store: Store, db_id: str, owner: str | None = None) -> str | None:
        """Why STORE belongs to another registry (it records another, or it records none and holds blobs none of
        which this database references), else None. OWNER: the identity the store records, when read already."""
        owner = owner if owner is not None else store.identity()
        if owner == db_id:
            return None
        if owner is not None:
            return (
                f"the artifact store {store.url} belongs to another registry ({owner}) than database {self.where} "
                f"({db_id})"
            )
        if store.has_blobs() and not self._references(store):
            return (
                f"the artifact store {store.url} holds blobs that database {self.where} does not reference; it "
                "belongs to another registry"
            )
        return None

    def _references(self, store: Store) -> bool:
        """Whether STORE holds a blob of a version of this registry (a store written before identities existed)."""
        with self._session() as s:
            digests = list(s.scalars(select(VRow.digest).where(VRow.status != "purged").distinct()))
        return any(store.has(d) for d in digests)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error. Errors that mean a
        lost connection, a busy or read-only database or a full disk become one-line registry errors that
        say whether anything was written (a failure during COMMIT leaves that unknown)."""
        if write and self.read_only:
            raise ReadOnlyRegistry(f"registry {self.where} is read-only for this user; nothing was written")
        maker = self._write if write else self._read
        committing = False
        with maker() as s:
            try:
                s.begin()
                yield s
                s.flush()
                committing = True
                s.commit()
            except DBAPIError as exc:
                _quiet_rollback(s)
                error = translate(exc, self.where, writing=write, committing=committing)
                if error is None:
                    raise
                raise error from None
            except BaseException:
                _quiet_rollback(s)
                raise

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
        files: bytes | None = None,
    ) -> Backbone:
        """Record a backbone by fingerprint: an nn.Module, an AdapterModel, or a sha256 hex string.

        ``files``: bytes the backbone needs besides its weights (a Transformers tokenizer's files), stored in
        the artifact store by sha256 as an adapter is (upload row first, blob durable before the backbone row
        commits) and recorded in the source as ``files: {"sha256", "size"}``. gc keeps the blob as long as a
        backbone's source names it; :meth:`backbone_files` reads it back, checked against its digest."""
        check_name("backbone", name)
        limits.check("architecture", architecture)
        limits.check("backbone description", description)
        if source is not None and FILES_KEY in source:
            raise RegistryError(f"a backbone source's {FILES_KEY!r} entry is set by the registry: pass files=")
        if files is not None:
            source = {**(source or {}), FILES_KEY: {"sha256": sha256_hex(files), "size": len(files)}}
        limits.json_value("backbone source", source)
        fp = _fingerprint_of(backbone)

        def insert(s: Session) -> Backbone:
            row = s.scalar(select(BackboneRow).where(BackboneRow.name == name))
            if row is not None:
                if exist_ok and row.fingerprint == fp:
                    return q.backbone_record(row)
                same = " (same fingerprint)" if row.fingerprint == fp else ""
                raise AlreadyExists(f"backbone {name!r} already exists{same}")
            row = BackboneRow(name=name, architecture=architecture, fingerprint=fp, source=source,
                              description=description)  # fmt: skip
            s.add(row)
            s.flush()
            return q.backbone_record(row)

        try:
            if files is None:
                with self._session(write=True) as s:
                    return insert(s)
            with self._session() as s:  # a taken name is refused before any bytes are stored
                taken = s.scalar(select(BackboneRow).where(BackboneRow.name == name))
                if taken is not None:
                    return insert(s)  # the existing record (exist_ok, same fingerprint) or AlreadyExists
            digest = sha256_hex(files)
            upload = self._start_upload(files, digest)
            try:
                for _ in range(MAX_ATTEMPTS):
                    try:
                        with self._session(write=True) as s:
                            # the digest's lock: gc's check-then-delete of this blob runs wholly before or after
                            self._lock_digest(s, digest)
                            self._check_store(s)
                            if s.execute(delete(UploadRow).where(UploadRow.token == upload)).rowcount != 1:
                                raise _UploadExpired
                            return insert(s)
                    except _UploadExpired:
                        upload = self._start_upload(files, digest)
                raise RegistryError(f"could not store the files of backbone {name!r}: gc removed the upload repeatedly")
            except BaseException:
                self._drop_upload(upload)  # the transaction rolled back: the blob is an orphan for gc
                raise
        except IntegrityError:
            raise AlreadyExists(f"backbone {name!r} already exists") from None

    def backbone_files(self, name: str) -> bytes:
        """The files recorded with backbone ``name`` (Hub.add_backbone(files=...)), checked against their
        sha256; NotFound when it records none, ArtifactError when the blob is missing or corrupt."""
        record = self.backbone(name)
        digest = _files_digest(record.source)
        if digest is None:
            raise NotFound(f"backbone {name!r} records no files")
        return self.store.read(digest, f"backbone {name!r}")

    def _backbone_file_digests(self, s: Session) -> dict[str, str]:
        """digest -> backbone name, for every backbone that records files."""
        found = {}
        for backbone_name, source in s.execute(select(BackboneRow.name, BackboneRow.source)):
            digest = _files_digest(source)
            if digest is not None:
                found[digest] = backbone_name
        return found

    def backbones(self) -> list[Backbone]:
        with self._session() as s:
            return [q.backbone_record(r) for r in s.scalars(select(BackboneRow).order_by(BackboneRow.name))]

    def backbone(self, name: str) -> Backbone:
        check_name("backbone", name)  # a NUL byte in a query is a DataError on PostgreSQL
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
        limits.check("task domain", domain)
        limits.check("task metric", metric)
        limits.check("task description", description)
        if metric is not None and not metric.strip():
            raise RegistryError("a task's metric name cannot be empty (leave --metric out for none)")
        if direction not in DIRECTIONS:
            raise RegistryError(f"metric direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        output = dict(output or {})
        if num_classes is not None:
            output["num_classes"] = checks.num_classes(num_classes, RegistryError)
        limits.json_value("task output", output)
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
        check_name("task", name)
        with self._session() as s:
            return q.task_record(q.task_row(s, name))

    def add_adapter(self, task: str, name: str, *, description: str | None = None) -> AdapterSummary:
        """Create an adapter with no versions yet (register creates it on first use)."""
        check_name("task", task)
        check_name("adapter", name)
        limits.check("adapter description", description)
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
        key: str | None = None,
    ) -> Version:
        """Store the adapter's bytes and commit a new version numbered max+1 under TASK/NAME.

        An upload row is committed before the blob is stored and removed in the transaction that commits
        the version, so `gc` never collects a blob (or temp file) a registration is about to use. The
        artifact is durable before the row commits: a crash leaves at worst an orphan blob and a stale
        upload row, which gc collects after its grace period. Concurrent registrations of one adapter retry
        on the unique key, each retry in a fresh transaction after a rollback.

        `key` identifies the registration: a second call with the same key returns the version the first
        made instead of adding another. Without one a key is made up; when the connection is lost during
        COMMIT the version is looked up by it, and the error says the key to retry with."""
        name = check_name("adapter", name or adapter_name)
        check_name("task", task)
        if backbone is not None:
            check_name("backbone", backbone)
        if key is not None and (earlier := self._by_key(check_key(key), task, name)) is not None:
            return earlier
        key = key or uuid.uuid4().hex
        if adapter_name not in model.adapters:
            raise NotFound(f"the model holds no adapter {adapter_name!r}")
        parent_specs = list({(p.ref, p.relation): p for p in map(_as_parent, parents)}.values())
        metric_values = {str(k): v for k, v in (metrics or {}).items()}
        if "" in metric_values:
            raise RegistryError("every metric needs a name")
        for metric, value in metric_values.items():
            # the split recorded with a metric is its name's first part ("val" of "val/accuracy")
            split = metric.split("/", 1)[0] if "/" in metric else None
            metric_values[metric] = limits.metric(metric, value, split=split)
        for tag_key, tag_value in (tags or {}).items():
            limits.tag(str(tag_key), str(tag_value))
        for parent in parent_specs:
            parse_ref(parent.ref)
            limits.check("lineage weight", parent.weight)
            limits.check("lineage method", parent.method)
            limits.json_value("lineage parameters", parent.params)
        limits.check("version description", description)
        limits.check("created_by", created_by)
        fp = model.fingerprint
        with self._session() as s:  # check everything before writing anything
            task_id = q.task_row(s, task).id
            backbone_id = q.backbone_for(s, fp, backbone).id
            parent_ids = [q.resolve_row(s, parse_ref(p.ref)).id for p in parent_specs]
        data = model.adapter_to_bytes(adapter_name)
        config = model.adapter_config(adapter_name).to_dict()
        trainable = int(model.num_trainable_parameters(adapter_name))
        digest = sha256_hex(data)
        row_values = dict(
            backbone_id=backbone_id,
            digest=digest,
            size=len(data),
            config=config,
            trainable_params=trainable,
            description=description,
            created_by=created_by or _user(),
            token=key,
        )
        edges = _unique_edges(list(zip(parent_specs, parent_ids)))
        upload = self._start_upload(data, digest)
        try:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    with self._session(write=True) as s:
                        # the digest's lock: gc's check-then-delete of this blob runs wholly before or after
                        self._lock_digest(s, digest)
                        self._check_store(s)
                        if s.execute(delete(UploadRow).where(UploadRow.token == upload)).rowcount != 1:
                            raise _UploadExpired
                        version_id = self._insert_version(s, task_id, name, row_values, edges, metric_values,
                                                          tags or {})  # fmt: skip
                        # the record comes from the committing transaction: nothing is read after COMMIT
                        return q.version_records(s, [version_id])[0]
                except _UploadExpired:
                    upload = self._start_upload(data, digest)
                except RegistryError as exc:
                    if not isinstance(exc, ConnectionLost):
                        self._drop_upload(upload)  # busy, full, read-only…: let gc take the blob at once
                    raise
                except IntegrityError:
                    if (earlier := self._by_key(key, task, name)) is not None:
                        return earlier  # the same registration committed meanwhile (same key)
                    # another writer took the number (or created the adapter): retry
                    if attempt == MAX_ATTEMPTS - 1:
                        raise RegistryError(f"could not register {task}/{name}: too much contention") from None
                    time.sleep(random.uniform(0, min(0.25, 0.002 * 2**attempt)))
            raise RegistryError(f"could not register {task}/{name}: too much contention")
        except ConnectionLost as exc:
            if not exc.outcome_unknown:  # it broke before COMMIT: the transaction was rolled back
                raise ConnectionLost(f"{exc}; {task}/{name} was not registered") from None
            outcome = self._after_lost_commit(exc, key, task, name)
            if isinstance(outcome, Version):
                return outcome
            raise outcome from None

    def _start_upload(self, data: bytes, digest: str) -> str:
        """Commit an upload row for `digest`, then store the blob; returns the upload's token. The row and
        gc's check-then-delete of a blob exclude each other (the write lock on SQLite, an advisory lock
        per digest on PostgreSQL), so a blob gc is deleting is stored again, never lost."""
        for _ in range(MAX_ATTEMPTS):
            token = uuid.uuid4().hex
            with self._session(write=True) as s:
                self._lock_digest(s, digest)
                s.add(UploadRow(token=token, digest=digest))
            try:
                self.store.put(data, token)
                return token
            except FileNotFoundError:
                continue  # gc expired this upload and took its temp file: start over
            except BaseException:
                self._drop_upload(token)
                raise
        raise RegistryError("could not store the artifact: gc removed the upload repeatedly")

    def _drop_upload(self, token: str) -> None:
        try:
            with self._session(write=True) as s:
                s.execute(delete(UploadRow).where(UploadRow.token == token))
        except RegistryError:
            pass  # a stale upload row only delays gc by the grace period

    def _lock_digest(self, s: Session, digest: str) -> None:
        if self.engine.dialect.name == "postgresql":
            s.execute(sql("SELECT pg_advisory_xact_lock(:k)"), {"k": _digest_lock_key(digest)})

    def _by_key(self, key: str, task: str, name: str) -> Version | None:
        """The version a registration with this key made, if any (refused if it is another adapter's)."""
        with self._session() as s:
            vid = s.scalar(select(VRow.id).where(VRow.token == key))
            if vid is None:
                return None
            version = q.version_records(s, [vid])[0]
        if (version.task, version.adapter) != (task, name):
            raise RegistryError(f"registration key {key!r} was used for {version.ref}, not {task}/{name}")
        return version

    def _after_lost_commit(self, exc: ConnectionLost, key: str, task: str, name: str) -> Version | RegistryError:
        """After a lost connection: the version if it committed, else an error that says what is known."""
        for delay in (0.5, 1.0, 2.0, 4.0):
            try:
                earlier = self._by_key(key, task, name)
            except (ConnectionLost, RegistryBusy):
                time.sleep(delay)
                continue
            if earlier is not None:
                return earlier
            # A COMMIT the server received may still become visible later: a retry must use the same key.
            return ConnectionLost(
                f"{exc}; {task}/{name} is not registered so far: register it again with key {key!r} (the same "
                "key never makes a second version)", outcome_unknown=True
            )
        return ConnectionLost(
            f"{exc}; whether {task}/{name} was registered is unknown: register it again with key {key!r} "
            "(the same key never makes a second version)", outcome_unknown=True
        )

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
        """Every version of TASK/ADAPTER, oldest first. TASK/ADAPTER:N or TASK/ADAPTER@ALIAS names its
        adapter too, once that version exists: one that does not is NotFound, not a list without it."""
        ref = parse_ref(adapter)
        with self._session() as s:
            if ref.number is not None or ref.alias is not None:  # a version that does not exist is an error
                q.resolve_row(s, ref, include_deleted=include_deleted)
            adapter_row = q.adapter_row(s, ref.task, ref.adapter)
            stmt = select(VRow.id).where(VRow.adapter_id == adapter_row.id).order_by(VRow.number)
            if not include_deleted:
                stmt = stmt.where(VRow.status == "ready")
            return q.version_records(s, list(s.scalars(stmt)))

    def ls(self, task: str | None = None, *, name: str | None = None) -> list[AdapterSummary]:
        if task is not None:
            check_name("task", task)
        if name is not None:
            check_name("adapter", name)
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
        if not name:
            raise RegistryError(f"metric {name!r} needs a name")
        value = limits.metric(name, value, split=split, dataset=dataset, step=step)
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
        for name in names or ():
            limits.check("metric name", name)
            if not name.strip():
                raise RegistryError("a metric name cannot be empty")
        with self._session() as s:
            rows = [q.resolve_row(s, parse_ref(r), include_deleted=True) for r in refs]
            return q.metric_table(s, [r.id for r in rows], names)

    def set_alias(self, ref: str | Ref, alias: str) -> Version:
        check_name("alias", alias)
        if alias == LATEST or alias.isdigit():
            raise RegistryError(f"alias {alias!r} is reserved")

        def upsert(s: Session) -> Version:
            version = q.resolve_row(s, parse_ref(ref))
            row = s.scalar(select(AliasRow).where(AliasRow.adapter_id == version.adapter_id, AliasRow.name == alias))
            if row is None:
                s.add(AliasRow(adapter_id=version.adapter_id, name=alias, version_id=version.id))
            else:
                row.version_id = version.id
            s.flush()
            return q.version_records(s, [version.id])[0]

        return self._upsert(upsert, f"alias {alias!r}")

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
        limits.tag(key, str(value))

        def upsert(s: Session) -> Version:
            version = q.resolve_row(s, parse_ref(ref), include_deleted=True)
            row = s.get(TagRow, (version.id, key))
            if row is None:
                s.add(TagRow(version_id=version.id, key=key, value=str(value)))
            else:
                row.value = str(value)
            s.flush()
            return q.version_records(s, [version.id])[0]

        return self._upsert(upsert, f"tag {key!r}")

    def _upsert(self, write: Callable[[Session], Version], what: str) -> Version:
        """Run an insert-or-update in a write transaction. Two writers inserting the same key at once
        (PostgreSQL; SQLite serialises writers) collide on the unique key: the loser runs again and updates."""
        for _ in range(3):
            try:
                with self._session(write=True) as s:
                    return write(s)
            except IntegrityError:
                time.sleep(random.uniform(0, 0.05))
        raise RegistryError(f"could not set {what}: too much contention")

    # -- deleting, verifying, collecting -------------------------------------------------------------

    def delete(self, ref: str | Ref) -> Version:
        """Soft delete: the version keeps its number and row but no longer resolves; its aliases go."""
        with self._session(write=True) as s:
            version = q.resolve_row(s, parse_ref(ref))
            version.status = "deleted"
            version.deleted_at = utcnow()
            for alias in s.scalars(select(AliasRow).where(AliasRow.version_id == version.id)):
                s.delete(alias)
            s.flush()
            return q.version_records(s, [version.id])[0]

    def verify(self, ref: str | Ref | None = None) -> list[Problem]:
        """Check the blob of one version (or of every version that still has one, and every backbone's
        recorded files) against its digest."""
        with self._session() as s:
            if ref is not None:
                ids = [q.resolve_row(s, parse_ref(ref), include_deleted=True).id]
            else:
                ids = list(s.scalars(select(VRow.id).where(VRow.status != "purged").order_by(VRow.id)))
            refs = q.ref_rows(s, ids)
            backbone_files = self._backbone_file_digests(s) if ref is None else {}
        wanted: dict[str, int | None] = {r.digest: r.size for r in refs}
        wanted.update({d: None for d in backbone_files if d not in wanted})
        checked = self.store.problems(wanted)  # an object store reads them in batches, side by side
        problems = []
        for r in refs:
            if checked[r.digest] is not None:
                problems.append(Problem(r.ref, r.digest, str(checked[r.digest])))
        for digest, backbone_name in sorted(backbone_files.items(), key=lambda item: item[1]):
            problem = checked[digest]
            if problem is not None:
                problems.append(Problem(f"backbone {backbone_name}", digest, problem))
        return problems

    def gc(self, *, grace_s: float = 3600.0, purge_deleted: bool = False, dry_run: bool = False) -> GcReport:
        """Remove blobs no version and no backbone references (and stale temp files), once older than `grace_s`. With
        purge_deleted, versions deleted more than `grace_s` ago give up their blobs too (they become
        'purged': the row stays).

        Correctness does not rest on the grace period: each blob is re-checked and deleted inside a write
        transaction that excludes registrations of the same content (see `_start_upload`), so a blob that
        a live version or a registration in flight uses is never removed, whatever the grace. gc refuses a
        store that does not record this registry as its owner."""
        if not dry_run and self.read_only:
            raise ReadOnlyRegistry(f"registry {self.where} is read-only for this user; gc removes nothing")
        if not math.isfinite(grace_s) or grace_s < 0:
            raise RegistryError(f"the grace period must be a finite number of seconds >= 0, got {grace_s}")
        with self._session() as s:
            self._check_store(s, lock=False)  # a client opened before `store set` collects nothing
        owner, db_id = self.store.identity(), self.registry_id()
        if owner != db_id:
            raise StoreMismatch(
                f"the artifact store {self.store.url} does not record database {self.where} as its registry "
                f"({'it records ' + owner if owner else 'it records none'}); gc removes nothing"
            )
        now = utcnow()
        cutoff = now - timedelta(seconds=min(grace_s, 1e9))
        purged: list[str] = []
        if purge_deleted:
            with self._session(write=not dry_run) as s:
                live = select(VRow.digest).where(VRow.status == "ready")
                old = (VRow.deleted_at.is_(None)) | (VRow.deleted_at <= cutoff)
                stmt = select(VRow.id).where(VRow.status == "deleted", old, VRow.digest.not_in(live))
                ids = list(s.scalars(stmt))
                purged = [r.ref for r in q.ref_rows(s, ids)]
                if not dry_run:
                    for row in s.scalars(select(VRow).where(VRow.id.in_(ids))):
                        row.status = "purged"
        # Temp files are listed before the uploads are read: an upload row commits before its temp file
        # exists, so a temp file seen here whose row is absent below belongs to no registration in flight.
        temps = list(self.store.temp_files())
        blobs = list(self.store.digests())
        with self._session() as s:
            referenced = set(s.scalars(select(VRow.digest).where(VRow.status != "purged").distinct()))
            referenced.update(self._backbone_file_digests(s))
            uploads = {t: (d, aware(at)) for t, d, at in s.execute(select(UploadRow.token, UploadRow.digest,
                                                                                UploadRow.started_at))}  # fmt: skip
        stale = {t for t, (_d, at) in uploads.items() if at is not None and at <= cutoff}
        in_flight = {d for t, (d, _at) in uploads.items() if t not in stale}
        removed, freed, expired = [], 0, 0
        for token in sorted(stale):
            if dry_run:
                continue
            with self._session(write=True) as s:
                self._lock_digest(s, uploads[token][0])
                expired += s.execute(delete(UploadRow).where(UploadRow.token == token)).rowcount
        for digest, path in blobs:
            if digest in referenced or digest in in_flight or self.store.age_s(path) < grace_s:
                continue
            if dry_run:
                removed.append(digest)
                freed += self.store.size_of(path)
                continue
            with self._session(write=True) as s:
                # the decision again, under the lock that registrations of this digest take
                self._lock_digest(s, digest)
                # one statement, so one snapshot on PostgreSQL's READ COMMITTED as well
                used = select(VRow.id).where(VRow.digest == digest, VRow.status != "purged").exists()
                pending = select(UploadRow.id).where(UploadRow.digest == digest).exists()
                # a backbone's files: any source whose JSON text holds the digest keeps it (a superset of
                # the sources that record it, so never a blob a backbone needs)
                needed = select(BackboneRow.id).where(cast(BackboneRow.source, Text).contains(digest)).exists()
                if not s.scalar(select(used | pending | needed)):
                    size = self.store.remove(path)
                    if size:
                        removed.append(digest)
                        freed += size
        removable = [p for t, p in temps if (t not in uploads or t in stale) and self.store.age_s(p) >= grace_s]
        if not dry_run:
            for path in removable:
                freed += self.store.remove(path)
        else:
            freed += sum(self.store.size_of(p) for p in removable)
        return GcReport(removed=removed, freed_bytes=freed, temp_files=len(removable), purged_versions=purged,
                        expired_uploads=expired if not dry_run else len(stale))  # fmt: skip


def _unique_edges(edges: list[tuple[Parent, int]]) -> list[tuple[Parent, int]]:
    """One edge per (parent version, relation): two refs may name one version (`t/a:1`, `t/a@prod`)."""
    seen: dict[tuple[int, str], Parent] = {}
    for parent, parent_id in edges:
        earlier = seen.setdefault((parent_id, parent.relation), parent)
        if (earlier.weight, earlier.method, earlier.params) != (parent.weight, parent.method, parent.params):
            raise RegistryError(
                f"{earlier.ref} and {parent.ref} name the same version as {parent.relation} with different "
                "weights or methods; name it once"
            )
    return [(parent, pid) for (pid, _rel), parent in seen.items()]


def _refuse_new_beside(store: Store, where: str, registry_id: str | None = None) -> None:
    """A new registry is never created beside an artifact store in use (one that holds blobs, or records another
    registry): that is a mistyped database or --store."""
    store.check()  # an unreachable store says so, in its own words, before anything is created
    if store.has_blobs():
        raise StoreMismatch(
            f"database {where} is missing or empty, but the artifact store {store.url} holds blobs of a registry; "
            "not creating a new registry beside them (check --db / ADAPTER_HUB_DB and --home)"
        )
    owner = store.identity()
    if owner is not None and owner != registry_id:
        raise StoreMismatch(
            f"database {where} is new, but the artifact store {store.url} belongs to another registry ({owner}); "
            "not using it (check --db / ADAPTER_HUB_DB, --home and --store)"
        )


def _quiet_rollback(s: Session) -> None:
    with contextlib.suppress(Exception):  # the connection is gone: the server rolls back by itself
        s.rollback()
