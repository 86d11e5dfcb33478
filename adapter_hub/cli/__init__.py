"""The `adapter-hub` command line: click commands that parse, call the library and print."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="adapter-hub")
def main() -> None:
    """One frozen backbone, many LoRA adapters."""
