"""adapter-hub export | import: a version as an adapter-hub file or a PEFT directory."""

from __future__ import annotations

from pathlib import Path

import click

from ..registry.export import FORMATS as FORMAT_NAMES
from ._app import State, emit_json, key_option, pass_state, plain

FORMATS = click.Choice(FORMAT_NAMES)


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=FORMATS, default="safetensors", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing exported file (or PEFT files in DEST).")
@pass_state
def export(state: State, ref: str, dest: str, fmt: str, overwrite: bool) -> None:
    """Write version REF into directory DEST: its verified adapter file DEST/TASK+ADAPTER-vN.safetensors, or
    (--format peft) DEST as a PEFT LoRA directory. DEST is created if missing (its parent must exist); an
    existing file, or a non-empty DEST for peft, is replaced only with --overwrite."""
    from ..pipelines import export_ref

    version, target = export_ref(state.hub(), ref, dest, fmt=fmt, overwrite=overwrite, trust_code=state.trust_code)
    click.echo(f"exported {version.ref} to {plain(target)}")


@click.command("import")
@click.argument("source", type=click.Path(exists=True))
@click.option("--task", required=True)
@click.option("--adapter", required=True)
@click.option("--backbone", required=True, help="A registered backbone (rebuilt to load the adapter onto).")
@click.option("--format", "fmt", type=FORMATS, help="Default: peft for a directory, safetensors for a file.")
@click.option("--peft-name", default="default", show_default=True, help="Adapter name inside a PEFT directory.")
@click.option("--parent", "parents", multiple=True, help="A registered version this one comes from.")
@click.option("--description")
@click.option("--force", is_flag=True, help="Load an adapter file made for another backbone.")
@key_option
@pass_state
def import_(
    state: State,
    source: str,
    task: str,
    adapter: str,
    backbone: str,
    fmt: str | None,
    peft_name: str,
    parents: tuple[str, ...],
    description: str | None,
    force: bool,
    key: str | None,
) -> None:
    """Register SOURCE (a PEFT directory or an adapter file) as a new version of TASK/ADAPTER."""
    from ..pipelines import import_adapter

    version = import_adapter(state.hub(), source, task=task, adapter=adapter, backbone=backbone, fmt=fmt,
                             peft_name=peft_name, parents=parents, description=description, force=force, key=key,
                             trust_code=state.trust_code)  # fmt: skip
    if state.json:
        emit_json(version.to_dict())
    else:
        click.echo(f"imported {plain(Path(source).resolve())} as {version.ref}")
