"""adapter-hub export | import: a version as an adapter-hub file or a PEFT directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..registry.errors import RegistryError
from ._app import State, emit_json, pass_state

FORMATS = click.Choice(["safetensors", "peft"])


def _model_on(hub: Any, backbone_name: str) -> Any:
    from ..backbones import rebuild as build_checked
    from ..model import AdapterModel

    record = hub.backbone(backbone_name)
    return AdapterModel(build_checked(record.name, record.source, record.fingerprint))


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=FORMATS, default="safetensors", show_default=True)
@pass_state
def export(state: State, ref: str, dest: str, fmt: str) -> None:
    """Write version REF into directory DEST: its verified adapter file, or a PEFT LoRA directory."""
    hub = state.hub()
    out = Path(dest)
    if fmt == "safetensors":
        version, data = hub.read_artifact(ref)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{version.adapter}-v{version.number}.safetensors"
        target.write_bytes(data)
    else:
        version = hub.resolve(ref)
        model = _model_on(hub, version.backbone)
        hub.load_into(model, version.ref, name=version.adapter)
        model.export_peft(version.adapter, out, base_model_name_or_path=version.backbone)
        target = out
    click.echo(f"exported {version.ref} to {target}")


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
) -> None:
    """Register SOURCE (a PEFT directory or an adapter file) as a new version of TASK/ADAPTER."""
    hub = state.hub()
    src = Path(source).resolve()
    fmt = fmt or ("peft" if src.is_dir() else "safetensors")
    hub.task(task)  # fail before building anything
    model = _model_on(hub, backbone)
    if fmt == "peft":
        if not src.is_dir():
            raise RegistryError(f"a PEFT import needs a directory, got {src}")
        model.import_peft(src, adapter, adapter_name=peft_name)
    else:
        model.load_adapter(adapter, src, force=force)
    version = hub.register(
        model,
        adapter,
        task=task,
        backbone=backbone,
        parents=[(p, "imported_from") for p in parents],
        tags={"imported_from": f"{fmt}:{src}"},
        description=description,
    )
    if state.json:
        emit_json(version.to_dict())
    else:
        click.echo(f"imported {src} as {version.ref}")
