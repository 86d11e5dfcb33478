"""The `adapter-hub` command line: click commands that parse, call the library and print."""

from __future__ import annotations

import click

from ._app import HubGroup, State
from .catalog import backbone, task
from .compose_cmds import combine, compose
from .data_cmds import data
from .db_cmds import db
from .demo_cmd import demo
from .inspect_cmds import lineage, ls, metrics, show, versions
from .manage import alias, gc, rm, tag, verify
from .predict_cmd import predict
from .store_cmds import store
from .train_cmds import eval_, train
from .transfer import export, import_
from .ui_cmd import ui


@click.group(cls=HubGroup)
@click.version_option(package_name="adapter-hub")
@click.option("--home", envvar="ADAPTER_HUB_HOME", help="Registry home (hub.db, artifacts/). [~/.adapter_hub]")
@click.option("--db", envvar="ADAPTER_HUB_DB", help="Database as a SQLAlchemy URL. [sqlite:///HOME/hub.db]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option("--store", "store_url", envvar="ADAPTER_HUB_STORE",
              help="Artifact store the registry must use (s3://bucket/prefix, a folder); a new registry records it. "
                   "[the database's]")  # fmt: skip
@click.option("--store-option", "store_options", multiple=True, envvar="ADAPTER_HUB_STORE_OPTIONS",
              metavar="KEY=VALUE", help="An option of the object store's filesystem, e.g. "
              "endpoint_url=http://127.0.0.1:8333 (repeatable; never recorded).")  # fmt: skip
@click.option("--trust-code", is_flag=True,
              help="Run the module:callable factory a registered backbone names (code from the registry).")  # fmt: skip
@click.option("--debug", is_flag=True, envvar="ADAPTER_HUB_DEBUG",
              help="Show the traceback of an unexpected error (a defect) instead of one line.")  # fmt: skip
@click.pass_context
def main(ctx: click.Context, home: str | None, db: str | None, as_json: bool, store_url: str | None,
         store_options: tuple[str, ...], trust_code: bool, debug: bool) -> None:  # fmt: skip
    """One frozen backbone, many LoRA adapters."""
    from ..registry.stores import using_store  # imports no fsspec

    ctx.with_resource(using_store(store_url, store_options))  # every Hub.open of this command
    state = ctx.ensure_object(State)
    state.debug = debug or state.debug
    state.home, state.db, state.json = home, db, as_json or state.json
    state.trust_code = trust_code or state.trust_code
    if state.trust_code:
        from ..backbones import trusting_code  # torch is imported only when needed

        ctx.with_resource(trusting_code())  # every rebuild of this command, until it ends


_COMMANDS = (demo, db, backbone, task, ls, show, versions, lineage, metrics, alias, tag, verify, gc, rm, export)
_COMMANDS += (import_, data, combine, compose, train, eval_, predict)
_COMMANDS += (ui,)
_COMMANDS += (store,)
for _command in _COMMANDS:
    main.add_command(_command)
