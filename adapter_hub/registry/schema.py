"""Schema state and migrations: create an empty database, refuse an outdated or newer one."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .db import sqlite_path
from .errors import SchemaError

UPGRADE_HINT = "run `adapter-hub db upgrade`"
_PG_LOCK_KEY = zlib.crc32(b"adapter_hub.migrations")


def migrations_dir() -> Path:
    """`adapter_hub.migrations` when installed; the checkout's `migrations/` when run from source."""
    spec = importlib.util.find_spec("adapter_hub.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None, "the migrations have no head"
    return head


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str
    empty: bool  # no tables at all: a new database

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def known(self) -> bool:
        """The current revision is one of ours (older or equal): False means newer code made it."""
        if self.current is None:
            return True
        try:
            return script_directory().get_revision(self.current) is not None
        except Exception:
            return False


def schema_state(conn: Connection) -> SchemaState:
    current = MigrationContext.configure(conn).get_current_revision()
    empty = current is None and not inspect(conn).get_table_names()
    return SchemaState(current=current, head=head_revision(), empty=empty)


def check(state: SchemaState, where: str) -> None:
    """Raise SchemaError unless the database is at head (an empty one is the caller's business)."""
    if state.up_to_date:
        return
    if state.current is None:
        raise SchemaError(f"{where} holds tables but no adapter-hub schema version; it is not a registry")
    if not state.known:
        raise SchemaError(
            f"{where} has schema revision {state.current}, newer than this adapter-hub (head {state.head}); "
            "upgrade adapter-hub to open it"
        )
    raise SchemaError(
        f"{where} has schema revision {state.current}, older than this adapter-hub (head {state.head}); " + UPGRADE_HINT
    )


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection held under a lock that every migrating process takes: no two race on DDL."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                if conn.in_transaction():
                    conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
            return
        path = sqlite_path(engine.url)
        if path is None:
            yield conn
            return
        with _file_lock(path.with_name(path.name + ".lock")):
            yield conn


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "nt":  # pragma: no cover
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# Tables whose rows are the registry's data; a database with none of them filled holds nothing to lose.
_DATA_TABLES = ("backbones", "tasks", "adapters", "versions")


def holds_data(conn: Connection) -> bool:
    tables = set(inspect(conn).get_table_names())
    return any(conn.execute(text(f"SELECT 1 FROM {t} LIMIT 1")).first() for t in _DATA_TABLES if t in tables)


def upgrade(engine: Engine, revision: str = "head", *, only_if_new: bool = False) -> SchemaState:
    """Migrate to `revision` under the lock. With only_if_new, touch only a database with no tables, or
    one whose creation was interrupted: at one of our older revisions and holding no data yet (a first
    open killed mid-migration is finished by the next open instead of asking for `db upgrade`)."""
    with migration_lock(engine) as conn:
        state = schema_state(conn)
        new = state.empty or (state.current is not None and state.known and not holds_data(conn))
        conn.commit()
        if only_if_new and not new:
            return state
        command.upgrade(alembic_config(conn), revision)
        state = schema_state(conn)
        conn.commit()
        return state


def downgrade(engine: Engine, revision: str) -> SchemaState:
    with migration_lock(engine) as conn:
        command.downgrade(alembic_config(conn), revision)
        state = schema_state(conn)
        conn.commit()
        return state
