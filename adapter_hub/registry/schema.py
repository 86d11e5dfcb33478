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
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, DBAPIError, InterfaceError, NoSuchModuleError

from .db import connection_failed, make_engine, parse_url, sqlite_path, sqlite_writable, translate
from .errors import DatabaseUnreachable, ReadOnlyRegistry, RegistryBusy, RegistryError, SchemaError, StorageFull

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
            # BEGIN IMMEDIATE: a migration's transaction reads first and then writes, and a read that turns
            # into a write fails at once with "database is locked" while another process reads the file
            conn.execution_options(adapter_hub_write=True)
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


# -- the `db` commands: a database named by its URL, every database error one line -------------------------

# What a database, its driver or its dialect raises when it cannot be opened or refuses a statement.
_OPEN_ERRORS = (DatabaseError, InterfaceError, NoSuchModuleError, ModuleNotFoundError)


def database_error(exc: BaseException, where: str, *, writing: bool = False) -> RegistryError:
    """The one-line error for a database error met opening or migrating database WHERE: a busy, read-only or
    full database as :func:`adapter_hub.registry.db.translate` names it, anything else "cannot open database
    WHERE: reason", the words of :meth:`Hub.open`."""
    if isinstance(exc, DBAPIError) and not connection_failed(exc):
        error = translate(exc, where, writing=writing, committing=False)
        if isinstance(error, RegistryBusy | ReadOnlyRegistry | StorageFull):
            return error
    if isinstance(exc, ModuleNotFoundError):  # the URL's driver (mysqlclient, psycopg, ...) is not installed
        return DatabaseUnreachable(
            f"cannot open database {where}: its driver module {exc.name!r} is not installed (pip install it, "
            "or use a sqlite:// or postgresql+psycopg:// URL)"
        )
    if isinstance(exc, NoSuchModuleError):
        return DatabaseUnreachable(f"cannot open database {where}: {str(exc).strip()} (no such database kind)")
    reason = str(getattr(exc, "orig", None) or exc).strip()
    first = reason.splitlines()[0] if reason else type(exc).__name__
    return DatabaseUnreachable(f"cannot open database {where}: {first}")


@contextlib.contextmanager
def _engine(url: str, *, writing: bool) -> Iterator[tuple[Engine, str]]:
    """An engine for URL and the URL as shown (no password), disposed of afterwards; a database error inside
    becomes one line. A SQLite file this process cannot write is read read-only, as Hub.open reads it."""
    parsed = parse_url(url)
    where = parsed.render_as_string(hide_password=True)
    path = sqlite_path(parsed)
    read_only = not writing and path is not None and path.exists() and not sqlite_writable(path)
    try:
        engine = make_engine(parsed, read_only="ro" if read_only else None)
    except _OPEN_ERRORS as exc:  # an unknown dialect or a driver that is not installed
        raise database_error(exc, where) from None
    try:
        yield engine, where
    except _OPEN_ERRORS as exc:
        raise database_error(exc, where, writing=writing) from None
    finally:
        engine.dispose()


def current_state(url: str) -> SchemaState:
    """The schema state of the database at URL (what `adapter-hub db current` shows); an empty database
    stays untouched."""
    path = sqlite_path(parse_url(url))
    if path is not None and not path.exists():  # a read: no file (nor folder) is created for it
        return SchemaState(current=None, head=head_revision(), empty=True)
    with _engine(url, writing=False) as (engine, _where), engine.connect() as conn:
        return schema_state(conn)


def status(state: SchemaState) -> str:
    """One word on STATE for people: up to date, empty, outdated (`db upgrade` migrates it) or newer."""
    if state.up_to_date:
        return "up to date"
    return "empty" if state.empty else "outdated" if state.known else "newer"


def _refuse_downgrade(state: SchemaState, revision: str, where: str) -> None:
    """A SchemaError when REVISION is older than the database's revision: `db upgrade` only goes forward (a
    downgrade drops what newer revisions added, which the registry's data may need)."""
    script = script_directory()
    targets = script.get_revisions(revision)
    if state.current is None:
        return
    older = {r.revision for r in script.iterate_revisions(state.current, "base")} - {state.current}
    if revision.strip() == "base" or any(t is not None and t.revision in older for t in targets):
        raise SchemaError(
            f"database {where} is at revision {state.current}; {revision!r} is older, and `db upgrade` does not "
            "downgrade a registry"
        )


def upgrade_url(url: str, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Migrate the database at URL to REVISION (default the newest) under the migration lock, and return its
    state before and after. REVISION is a revision id, "head" or "heads"; a database made by a newer
    adapter-hub, or a REVISION the migrations do not hold, is refused with a SchemaError, changing nothing."""
    if not revision.strip():
        raise SchemaError("a schema revision is needed, e.g. head")
    with _engine(url, writing=True) as (engine, where):
        with engine.connect() as conn:
            before = schema_state(conn)
        if not before.known:
            check(before, "the database")
        try:
            # resolved first: alembic fails on some forms it cannot resolve ("head+5") with a bare assertion
            _refuse_downgrade(before, revision, where)
            after = upgrade(engine, revision)
        except CommandError as exc:  # alembic's words for a revision it cannot reach
            raise SchemaError(f"cannot upgrade database {where} to revision {revision!r}: {exc}") from None
    return before, after
