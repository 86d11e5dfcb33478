"""adapter-hub db upgrade|current"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, InterfaceError, NoSuchModuleError

from ..registry import schema
from ..registry.db import make_engine, parse_url
from ..registry.errors import DatabaseUnreachable
from ._app import State, emit_json, pass_state

T = TypeVar("T")


def _guard(url: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (DatabaseError, InterfaceError, NoSuchModuleError, ModuleNotFoundError) as exc:
        where = parse_url(url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseUnreachable(f"cannot open database {where}: {reason}") from None


def _state(engine: Engine) -> schema.SchemaState:
    with engine.connect() as conn:
        return schema.schema_state(conn)


@click.group()
def db() -> None:
    """Database schema migrations."""


@db.command()
@click.argument("revision", default="head")
@pass_state
def upgrade(state: State, revision: str) -> None:
    """Migrate the database to REVISION (default: the newest)."""
    _home, url = state.locate()
    engine = make_engine(url)
    try:
        before = _guard(url, lambda: _state(engine))
        if not before.known:
            schema.check(before, "the database")
        after = _guard(url, lambda: schema.upgrade(engine, revision))
    finally:
        engine.dispose()
    if state.json:
        emit_json({"from": before.current, "to": after.current, "head": after.head})
    elif before.current == after.current:
        click.echo(f"database already at revision {after.current}")
    else:
        click.echo(f"database upgraded from {before.current or 'empty'} to {after.current}")


@db.command()
@pass_state
def current(state: State) -> None:
    """Show the database's schema revision and the one this code needs."""
    _home, url = state.locate()
    engine = make_engine(url)
    try:
        st = _guard(url, lambda: _state(engine))
    finally:
        engine.dispose()
    status = "up to date" if st.up_to_date else ("empty" if st.empty else "outdated" if st.known else "newer")
    if state.json:
        emit_json({"current": st.current, "head": st.head, "status": status})
    else:
        click.echo(f"current: {st.current or '-'}  head: {st.head}  ({status})")
