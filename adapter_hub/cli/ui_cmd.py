"""adapter-hub ui: the registry in a web browser (read-only)."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..errors import ConfigError
from ._app import State, pass_state, plain


def _set(field: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """`--home` / `--db` after the command too, the same as before it."""

    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            setattr(ctx.ensure_object(State), field, value)

    return callback


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default answers this machine only.")  # fmt: skip
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")  # fmt: skip
@click.option("--home", expose_value=False, callback=_set("home"), help="Registry home, as the global --home.")
@click.option("--db", expose_value=False, callback=_set("db"), help="Database URL, as the global --db.")
@pass_state
def ui(state: State, host: str, port: int) -> None:
    """Browse the registry in a web browser: tasks, versions, lineage graphs, metric comparisons (read-only)."""
    try:
        from ..ui import serve  # Flask is imported only for this command
    except ModuleNotFoundError as exc:
        raise ConfigError(f"adapter-hub ui needs {exc.name}: pip install 'flask>=3' 'plotly>=5'") from None

    from ..registry.stores import configured

    # --store / --store-option live in this thread's context; the pages open the registry in request threads
    store, options = configured(None, None)
    serve(state.home, state.db, host=host, port=port, say=lambda line: click.echo(plain(line)),
          open_options={"store": store, "store_options": options})  # fmt: skip
