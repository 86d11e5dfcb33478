"""adapter-hub store show|set|copy: the registry's artifact store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ._app import State, emit_json, json_option, pass_state, plain, size

if TYPE_CHECKING:
    from ..registry import Hub


@click.group()
def store() -> None:
    """The registry's artifact store: a folder, or an object store such as s3://bucket/prefix."""


def _hub(state: State) -> Hub:
    """The registry with the store its database records, whatever --store says: these commands change it."""
    from ..registry import Hub
    from ..registry.stores import RECORDED

    hub = Hub.open(state.home, state.db, store=RECORDED)
    click.get_current_context().call_on_close(hub.close)
    return hub


@store.command("show")
@json_option
@pass_state
def show(state: State) -> None:
    """The store the database records, the one in use here, and whose registry it is."""
    from ..registry import store_admin

    hub = _hub(state)
    found = store_admin.info(hub)
    if state.json:
        emit_json(found.to_dict())
        return
    click.echo(f"recorded: {plain(found.recorded) if found.recorded else 'none (each machine uses HOME/artifacts)'}")
    click.echo(f"in use:   {plain(found.in_use)}")
    if found.problem is not None:
        click.echo(f"registry: {found.registry_id} (the store cannot be read: {plain(found.problem)})")
    else:
        click.echo(f"registry: {found.registry_id} (the store records {found.store_identity or 'none yet'})")


@store.command("set")
@click.argument("url")
@json_option
@pass_state
def set_(state: State, url: str) -> None:
    """Make URL the registry's store for every client (`local`: each machine's HOME/artifacts). Refused unless it
    holds every blob the registry references: `store copy URL --set` copies them first."""
    from ..registry import store_admin
    from ..registry.stores import configured

    found = store_admin.set_store(_hub(state), url, configured(None, None)[1])
    if state.json:
        emit_json(found.to_dict())
    else:
        click.echo(f"the registry's artifact store is now {plain(found.in_use)}")


@store.command("copy")
@click.argument("url")
@click.option("--set", "set_as_store", is_flag=True, help="Then make URL the registry's store.")
@json_option
@pass_state
def copy(state: State, url: str, set_as_store: bool) -> None:
    """Copy every blob the registry references into the store at URL (`local`: this machine's HOME/artifacts),
    each one read back and checked against its sha256."""
    from ..registry import store_admin
    from ..registry.stores import configured

    report = store_admin.copy(_hub(state), url, configured(None, None)[1], set_as_store=set_as_store)
    if state.json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"copied {report.copied} blob(s) ({size(report.copied_bytes)}) to {plain(report.target)}, "
        f"{report.present} already there; all verified"
        + (f"; the registry's artifact store is now {plain(report.target)}" if report.set_as_store else "")
    )
