"""What every command shares: the group that turns user errors into one line, the lazily opened Hub,
and output helpers (rich tables for people, --json for scripts)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from .. import errors
from ..registry.render import visible


def one_line(exc: BaseException) -> str:
    """The error as one line, control characters escaped: a message may quote stored text (a path in a
    registry record, a database's own words), which must not reach the terminal raw."""
    text = " ".join(str(exc).split())
    return visible(text or type(exc).__name__, 2000)


class HubGroup(click.Group):
    """A click group whose user errors (adapter_hub.errors) print as one line on stderr, exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", errors.AdapterHubWarning)
            shown = warnings.showwarning

            def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
                if issubclass(category, errors.AdapterHubWarning):  # ours: one line, no source location
                    click.echo(f"warning: {one_line(Exception(str(message)))}", err=True)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except click.UsageError as exc:  # a subcommand's arguments (parsed inside this invoke)
                raise usage_line(exc) from None
            except (click.ClickException, click.exceptions.Exit, click.Abort):  # click's own ways out
                raise
            except Exception as exc:
                if errors.is_user_error(exc):
                    raise click.ClickException(one_line(exc)) from None
                state = ctx.find_object(State)
                if state is not None and state.debug:
                    raise
                if isinstance(exc, OSError) and exc.strerror:
                    # the system refused (a permission, a full or read-only disk, a path that went away): the
                    # user's environment, said in the system's words, naming the file
                    where = f"{exc.filename}: " if exc.filename else ""
                    raise click.ClickException(f"{where}{exc.strerror}") from None
                # The last resort: every input a user can give is checked where it enters and refused with its
                # own line; an exception that still gets here is a defect, shown as one line, not a traceback.
                raise click.ClickException(
                    f"unexpected {type(exc).__name__}: {one_line(exc)} — a defect in adapter-hub; rerun with "
                    "--debug for the traceback"
                ) from None

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:  # fmt: skip
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:  # the group's own options (--home, --db, ...)
            raise usage_line(exc) from None


def usage_line(exc: click.UsageError) -> click.ClickException:
    """A usage error (a bad option value, an unknown option, a missing argument) as one line with exit code 1,
    like every other refusal, pointing at the command's --help instead of printing the usage block. A group
    called without its subcommand keeps click's help page."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return exc
    where = exc.ctx.command_path if exc.ctx is not None else "adapter-hub"
    return click.ClickException(f"{one_line(Exception(exc.format_message()))} (`{where} --help` lists the options)")


@dataclass
class State:
    home: str | None = None
    db: str | None = None
    json: bool = False
    trust_code: bool = False  # --trust-code: rebuilds may run a registry record's module:callable
    debug: bool = False  # --debug: an unexpected exception shows its traceback instead of one line
    _hub: Any = field(default=None, repr=False)

    def hub(self) -> Any:
        if self._hub is None:
            from ..registry import Hub

            self._hub = Hub.open(self.home, self.db)
            click.get_current_context().call_on_close(self._hub.close)
            if self._hub.read_only:  # said once; a write then fails with its own one line
                click.echo(f"note: registry {self._hub.where} is read-only here: reading only", err=True)
        return self._hub

    def locate(self) -> tuple[Any, str]:
        from ..registry import Hub

        return Hub.locate(self.home, self.db)


pass_state = click.make_pass_decorator(State, ensure=True)


def json_option(f: Any) -> Any:
    """`--json` on a command, the same as the global `adapter-hub --json`."""

    def _set(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(State).json = True

    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_set, help="JSON output.")(f)


def console() -> Console:
    return Console(soft_wrap=False)


# A table cell shows at most this many characters of a stored string (then "… (N chars)"); --json has it all.
CELL_LIMIT = 200


def plain(value: Any, limit: int | None = None) -> str:
    """A user-set string for click.echo: control characters (ANSI escapes included) as visible escapes,
    cut after LIMIT characters when one is given."""
    return visible(str(value), limit)


def cell(value: Any, *, limit: int | None = CELL_LIMIT, style: str = "") -> Text:
    """A user-set string for a rich table, title or tree: a Text, so it is never read as markup ("[/bold]" and
    "[link=…]" print literally); only STYLE, ours, is applied. Refs and names (letters, digits, '.', '_', '-',
    at most 200 each) pass limit=None, so that they can be copied whole."""
    return Text(plain(value, limit), style=style)


def key_option(f: Any) -> Any:
    """`--key` on a command that registers a version."""
    return click.option(
        "--key",
        help="Registration key (up to 64 characters): running the command again with the same key returns the "
        "version it made instead of adding another, e.g. after a lost connection.",
    )(f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def short(digest: str) -> str:
    return digest[:12]


def when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    units = ["B", "KiB", "MiB", "GiB"]
    value = float(n)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
