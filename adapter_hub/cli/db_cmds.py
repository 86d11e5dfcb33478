"""adapter-hub db upgrade|current"""

from __future__ import annotations

import click

from ..registry import schema
from ._app import State, emit_json, pass_state


@click.group()
def db() -> None:
    """Database schema migrations."""


@db.command()
@click.argument("revision", default="head")
@pass_state
def upgrade(state: State, revision: str) -> None:
    """Migrate the database to REVISION (default: the newest)."""
    _home, url = state.locate()
    before, after = schema.upgrade_url(url, revision)
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
    st = schema.current_state(url)
    status = schema.status(st)
    if state.json:
        emit_json({"current": st.current, "head": st.head, "status": status})
    else:
        click.echo(f"current: {st.current or '-'}  head: {st.head}  ({status})")
