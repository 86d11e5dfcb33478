"""Engines for any SQLAlchemy URL, tuned for a registry shared by several processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from .errors import DatabaseUnreachable

# Connections of an engine with this execution option open write transactions. On SQLite they start with
# BEGIN IMMEDIATE, which takes the write lock at once: a deferred transaction that later upgrades from
# read to write fails with "database is locked" without waiting, whatever the busy timeout.
WRITE = {"adapter_hub_write": True}
BUSY_TIMEOUT_S = 60.0


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


def make_engine(url: str | URL) -> Engine:
    url = parse_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    path = sqlite_path(url)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    if path is None:
        kwargs = {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool}
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnreachable(f"cannot open database {url}: {exc}") from None
    engine = create_engine(url, **kwargs)
    _tune_sqlite(engine, wal=path is not None)
    return engine


def _tune_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, see _begin
        cursor = dbapi_connection.cursor()
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a crash loses at most the last commits, never consistency. An artifact is
            # fsynced before its row commits, so a lost commit leaves an orphan blob, not a dangling row.
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("adapter_hub_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
