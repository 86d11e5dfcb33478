"""adapter-hub data: write the built-in digits domains as ImageFolder trees."""

from __future__ import annotations

from pathlib import Path

import click

from ._app import State, emit_json, pass_state

DOMAINS = ("original", "rotated", "inverted", "noisy", "scaled", "rotated-noisy")


@click.group()
def data() -> None:
    """Built-in real data (scikit-learn's handwritten digits) and its domain shifts."""


@data.command("digits")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--domain", type=click.Choice(DOMAINS), default="original", show_default=True)
@click.option("--labels", type=click.Choice(["digit", "parity"]), default="digit", show_default=True)
@click.option("--pool", type=click.Choice(["all", "source", "target"]), default="all", show_default=True,
              help="Two disjoint halves of the images: source for a backbone, target for adapters.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split (and of the noise).")
@pass_state
def digits(state: State, directory: Path, domain: str, labels: str, pool: str, seed: int) -> None:
    """Write DIRECTORY/train, val and test as ImageFolder trees of PNG files (one folder per class)."""
    from .. import data as digits_data

    dataset = digits_data.digits(domain, labels=labels, pool=pool, seed=seed)
    digits_data.write_imagefolder(dataset, directory)
    counts = {"train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test)}
    if state.json:
        emit_json({"directory": str(directory), "domain": domain, "labels": labels, **counts})
    else:
        click.echo(f"{directory}: digits-{domain} ({labels}), " + ", ".join(f"{k} {v}" for k, v in counts.items()))
