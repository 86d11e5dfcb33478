"""adapter-hub backbone add|ls, task add|ls"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..errors import ConfigError
from ._app import CELL_LIMIT, State, cell, console, emit_json, json_option, pass_state, plain, short, when


def _numbers(flag: str, text: str | None) -> list[float] | None:
    """Comma-separated numbers (each checked for being finite by the library)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None


@click.group()
def backbone() -> None:
    """Frozen backbones, identified by fingerprint."""


@backbone.command("add")
@click.argument("name")
@click.argument("architecture", required=False)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="A .safetensors state dict.")
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path),
              help="A local Transformers model directory (save_pretrained's model and tokenizer).")  # fmt: skip
@click.option("--pooling", type=click.Choice(["mean", "last"]),
              help="With --hf: mean over the tokens, or the last token (default: last for decoder-only).")  # fmt: skip
@click.option("--torchvision-weights", metavar="NAME",
              help="torchvision's weights of ARCHITECTURE (e.g. DEFAULT, IMAGENET1K_V1), downloaded by torchvision; "
                   "their input transform (size, mean, std) is recorded.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation.")
@click.option("--num-classes", type=int, help="Output size of the architecture's classifier.")
@click.option("--image-size", type=int,
              help="Images are resized (shorter side) and centre-cropped to this size, 1 to 4096, in train, eval "
                   "and predict (default: the torchvision weights', else the images' own size).")  # fmt: skip
@click.option("--mean", help="Per-channel mean to subtract: 3 comma-separated numbers or 1 for all (default: the "
                             "torchvision weights', else none).")  # fmt: skip
@click.option("--std", help="Per-channel std to divide by, above 0: 3 comma-separated numbers or 1 for all (with "
                            "--mean; default: the torchvision weights').")  # fmt: skip
@click.option("--fingerprint", "fingerprint_hex", help="Record a fingerprint only (no way to rebuild it).")
@click.option("--description")
@json_option
@pass_state
def backbone_add(
    state: State,
    name: str,
    architecture: str | None,
    weights: str | None,
    hf_dir: Path | None,
    pooling: str | None,
    torchvision_weights: str | None,
    seed: int,
    num_classes: int | None,
    image_size: int | None,
    mean: str | None,
    std: str | None,
    fingerprint_hex: str | None,
    description: str | None,
) -> None:
    """Register backbone NAME built from ARCHITECTURE (a torchvision name or module:callable), or from a
    Transformers model directory with --hf DIR (its tokenizer is stored with the record).

    An image backbone records the input transform train, eval and predict apply: --torchvision-weights'
    own, with --image-size, --mean and --std in place of theirs. Without any of these, images go in as they
    are (RGB in [0, 1], their own size)."""
    from ..registry.errors import RegistryError

    means, stds = _numbers("--mean", mean), _numbers("--std", std)
    given: list[tuple[str, object]] = [("--image-size", image_size), ("--mean", mean), ("--std", std)]
    given.append(("--torchvision-weights", torchvision_weights))
    image_options = ", ".join(flag for flag, value in given if value is not None)
    if hf_dir is not None and (architecture or weights or fingerprint_hex):
        raise RegistryError("--hf DIR takes no ARCHITECTURE, --weights or --fingerprint: the directory holds them")
    if hf_dir is not None and image_options:
        raise RegistryError(f"{image_options}: for an image backbone built from ARCHITECTURE, not --hf DIR")
    if pooling is not None and hf_dir is None:
        raise RegistryError("--pooling is for a Transformers backbone (--hf DIR)")
    if fingerprint_hex is not None and image_options:
        raise RegistryError(f"{image_options}: for an image backbone built from ARCHITECTURE, not --fingerprint")
    hub = state.hub()
    if hf_dir is not None:
        from ..pipelines import add_transformers_backbone

        record = add_transformers_backbone(hub, name, hf_dir, num_classes=2 if num_classes is None else num_classes,
                                           seed=seed, pooling=pooling, description=description)  # fmt: skip
    elif fingerprint_hex is not None:
        record = hub.add_backbone(name, fingerprint_hex, architecture=architecture, description=description)
    else:
        if architecture is None:
            raise RegistryError("give an ARCHITECTURE (torchvision name or module:callable) or --fingerprint")
        from ..pipelines import add_image_backbone

        record = add_image_backbone(hub, name, architecture, weights=weights, torchvision_weights=torchvision_weights,
                                    seed=seed, num_classes=num_classes, image_size=image_size, mean=means, std=stds,
                                    description=description)  # fmt: skip
    if state.json:
        emit_json(record.to_dict())
    else:
        click.echo(f"backbone {record.name}: fingerprint {record.fingerprint}")


@backbone.command("ls")
@json_option
@pass_state
def backbone_ls(state: State) -> None:
    """List backbones."""
    records = state.hub().backbones()
    if state.json:
        emit_json([r.to_dict() for r in records])
        return
    table = Table("name", "architecture", "fingerprint", "weights", "added", title="backbones")
    for r in records:
        weights = (r.source or {}).get("weights") or ((r.source or {}).get("hf") or {}).get("path") or "-"
        architecture = cell(r.architecture or "-")
        table.add_row(cell(r.name), architecture, short(r.fingerprint), cell(weights), when(r.created_at))
    console().print(table)


@click.group()
def task() -> None:
    """Tasks: what adapters are for."""


@task.command("add")
@click.argument("name")
@click.option("--domain")
@click.option("--num-classes", type=int)
@click.option("--metric", help="Metric of record, e.g. val/accuracy.")
@click.option("--direction", type=click.Choice(["max", "min"]), default="max", show_default=True)
@click.option("--description")
@json_option
@pass_state
def task_add(
    state: State,
    name: str,
    domain: str | None,
    num_classes: int | None,
    metric: str | None,
    direction: str,
    description: str | None,
) -> None:
    """Register task NAME."""
    record = state.hub().add_task(
        name, domain=domain, num_classes=num_classes, metric=metric, direction=direction, description=description
    )
    if state.json:
        emit_json(record.to_dict())
    else:
        click.echo(f"task {record.name} added")


@task.command("ls")
@json_option
@pass_state
def task_ls(state: State) -> None:
    """List tasks."""
    records = state.hub().tasks()
    if state.json:
        emit_json([r.to_dict() for r in records])
        return
    table = Table("name", "domain", "output", "metric", "description", title="tasks")
    for r in records:
        output = ", ".join(f"{k}={v}" for k, v in (r.output or {}).items()) or "-"
        metric = f"{plain(r.metric, CELL_LIMIT)} ({r.direction})" if r.metric else "-"
        description = cell(r.description or "")
        table.add_row(cell(r.name), cell(r.domain or "-"), cell(output), cell(metric, limit=None), description)
    console().print(table)
