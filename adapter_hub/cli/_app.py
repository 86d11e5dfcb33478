"""What every command shares: the group that turns user errors into one line, the lazily opened Hub,
and output helpers (rich tables for people, --json for scripts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console

from .. import errors


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class HubGroup(click.Group):
    """A click group whose user errors (adapter_hub.errors) print as one line on stderr, exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not errors.is_user_error(exc):
                raise
            raise click.ClickException(one_line(exc)) from None


@dataclass
class State:
    home: str | None = None
    db: str | None = None
    json: bool = False
    _hub: Any = field(default=None, repr=False)

    def hub(self) -> Any:
        if self._hub is None:
            from ..registry import Hub

            self._hub = Hub.open(self.home, self.db)
            click.get_current_context().call_on_close(self._hub.close)
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
