"""Engines for any SQLAlchemy URL, tuned for a registry shared by several processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.pool import StaticPool

from .errors import ConnectionLost, DatabaseUnreachable, ReadOnlyRegistry, RegistryBusy, RegistryError, StorageFull

# Connections of an engine with this execution option open write transactions. On SQLite they start with
# BEGIN IMMEDIATE, which takes the write lock at once: a deferred transaction that later upgrades from
# read to write fails with "database is locked" without waiting, whatever the busy timeout.
WRITE = {"adapter_hub_write": True}
BUSY_ENV = "ADAPTER_HUB_BUSY_TIMEOUT"


def busy_timeout_s() -> float:
    """How long a SQLite writer waits for another's write lock: ADAPTER_HUB_BUSY_TIMEOUT seconds, else 60."""
    try:
        value = float(os.environ.get(BUSY_ENV) or 60.0)
    except ValueError:
        raise DatabaseUnreachable(f"{BUSY_ENV} must be a number of seconds, got {os.environ[BUSY_ENV]!r}") from None
    if not 0 <= value <= 86400:
        raise DatabaseUnreachable(f"{BUSY_ENV} must be between 0 and 86400 seconds, got {value:g}")
    return value


def default_home() -> Path:
    return Path(os.environ.get("ADAPTER_HUB_HOME") or "~/.adapter_hub").expanduser()


def default_url(home: Path) -> str:
    return os.environ.get("ADAPTER_HUB_DB") or f"sqlite:///{home / 'hub.db'}"


def parse_url(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnreachable(f"not a database URL: {str(url)!r} ({exc})") from None


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL, None for other databases or an in-memory one."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def sqlite_writable(path: Path) -> bool:
    """Whether this process may write the SQLite file and create its journal beside it (a read-only file,
    folder or mount answers False; os.access also knows read-only filesystems)."""
    folder = path.parent if path.parent != Path("") else Path(".")
    if path.exists():
        return os.access(path, os.W_OK) and os.access(folder, os.W_OK)
    return not folder.exists() or os.access(folder, os.W_OK)


def make_engine(url: str | URL, *, read_only: str | None = None) -> Engine:
    """An engine for `url`. For SQLite, read_only="ro" opens the file read-only (no journal set-up, no
    write lock), "immutable" also without locking, for a file no process can write (a read-only share
    whose WAL index cannot be created)."""
    url = parse_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    path = sqlite_path(url)
    timeout = busy_timeout_s()
    kwargs: dict[str, Any] = {"connect_args": {"timeout": timeout}}
    if path is None:
        kwargs = {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool}
    elif read_only:
        flag = "mode=ro" if read_only == "ro" else "immutable=1"
        url = url.set(database=f"file:{path.resolve()}?{flag}").update_query_dict({"uri": "true"})
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnreachable(f"cannot open database {url}: {exc}") from None
    engine = create_engine(url, **kwargs)
    _tune_sqlite(engine, wal=path is not None and not read_only, timeout=timeout)
    return engine


def _use_wal(cursor: Any, timeout: float) -> None:
    """Put the file in WAL mode (kept in the file: done once). Switching needs the file to itself, and SQLite
    answers "database is locked" at once, without its busy wait, when another process opens the new file at
    the same moment: so the switch is retried for up to the busy timeout."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _tune_sqlite(engine: Engine, *, wal: bool, timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, see _begin
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        if wal:
            _use_wal(cursor, timeout)
            # WAL + NORMAL: a crash loses at most the last commits, never consistency. An artifact is
            # fsynced before its row commits, so a lost commit leaves an orphan blob, not a dangling row.
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("adapter_hub_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# SQLSTATE classes and codes of PostgreSQL that mean the connection (or the server) went away.
_PG_GONE = ("08", "57P01", "57P02", "57P03")
_PG_FULL = ("53100",)
_PG_BUSY = ("55P03", "40001", "40P01", "57014")  # lock not available, serialization, deadlock, timeout


def connection_failed(exc: BaseException) -> bool:
    """Whether a database error means the connection broke or could not be made (as opposed to bad SQL,
    a constraint or a lock)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", exc)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state:
        return str(state).startswith(_PG_GONE)
    name = type(orig).__name__
    text = str(orig).lower()
    if type(orig).__module__.startswith("psycopg"):
        # psycopg raises OperationalError/InterfaceError without a SQLSTATE when the socket dies
        return name in ("OperationalError", "InterfaceError")
    return "unable to open database file" in text or "disk i/o error" in text


def translate(exc: DBAPIError, where: str, *, writing: bool, committing: bool) -> RegistryError | None:
    """The registry error a database error stands for, saying what happened to the change; None for an
    integrity error (the caller's business: a retry or "already exists") and for bad SQL (a bug)."""
    if isinstance(exc, (IntegrityError, ProgrammingError)):
        return None
    orig = getattr(exc, "orig", exc)
    text = " ".join(str(orig).split()) or type(orig).__name__
    lowered = text.lower()
    # SQLSTATE on PostgreSQL, the result code's name on SQLite (3.11+); the text only where neither says.
    state = str(getattr(orig, "sqlstate", "") or "")
    code = str(getattr(orig, "sqlite_errorname", "") or "")
    # Only a lost connection leaves a COMMIT's outcome unknown: a busy, full or read-only database (SQLite
    # or PostgreSQL) refuses the statement or rolls the transaction back.
    outcome = "nothing was written" if writing else "nothing was changed"
    if code == "SQLITE_FULL" or state in _PG_FULL or "database or disk is full" in lowered:
        return StorageFull(f"the filesystem holding database {where} is full ({text}); {outcome}")
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or state in _PG_BUSY or (
        not code and "database is locked" in lowered
    ):
        return RegistryBusy(
            f"registry {where} is busy: another process held its write lock for more than "
            f"{busy_timeout_s():g} s ({BUSY_ENV} sets the wait) ({text}); {outcome}, try again"
        )
    if code.startswith("SQLITE_READONLY") or state == "25006" or (not code and "readonly database" in lowered):
        return ReadOnlyRegistry(f"registry {where} is read-only ({text}); {outcome}")
    if connection_failed(exc):
        if committing:
            outcome = "the change may or may not have been written"
        return ConnectionLost(f"lost the connection to the database {where} ({text}); {outcome}",
                              outcome_unknown=committing)  # fmt: skip
    if committing and not code:
        outcome = "the change may or may not have been written"
    # anything else the server refused (too many connections, a timeout, a damaged file…): one line
    return RegistryError(f"database {where} refused the command ({text}); {outcome}")
