"""adapter-hub train / eval: fit an adapter on an ImageFolder directory (or text data for a Transformers
backbone) and register it; evaluate a version."""

from __future__ import annotations

import click

from ._app import State, emit_json, key_option, pass_state


@click.command()
@click.argument("output", metavar="TASK/ADAPTER")
@click.option("--backbone", required=True, help="A registered backbone (adapter-hub backbone add).")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="ImageFolder directory; for a Transformers backbone a .csv/.jsonl file (text,label).")  # fmt: skip
@click.option("--from", "from_ref", help="Start from this version (transfer or continued fine-tuning).")
@click.option("--rank", type=int, help="LoRA rank, at least 1 (default 8; with --from, the parent's).")
@click.option("--alpha", type=float, help="LoRA scale alpha/rank, above 0 (default 16; with --from, the parent's).")
@click.option("--targets", help="Comma-separated target patterns (default: the backbone's catalogue entry; "
                                "required for any other architecture).")  # fmt: skip
@click.option("--head", help="The module that outputs the classes, replaced per adapter (default: the catalogue's, "
                             "else the model's last Linear).")  # fmt: skip
@click.option("--epochs", type=int, default=5, show_default=True, help="At least 1.")
@click.option("--lr", type=float, help="One peak learning rate for everything trained, above 0 (default: by what "
                                     "is trained: LoRA factors 5e-3, head 5e-3, norms 5e-3). A linear warm-up over "
                                     "10% of the steps, then a cosine decay.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="0 to 2**63-1.")
@click.option("--full", is_flag=True, help="Also fine-tune the whole network as a baseline; its accuracy is logged.")
@click.option("--max-length", type=int, help="Text: tokens per text, truncated beyond (default 128).")
@click.option("--dora", is_flag=True, help="Train a DoRA adapter (a magnitude per output channel; PEFT's use_dora).")
@click.option("--norm-layers", type=click.Choice(["batchnorm", "all", "frozen"]),
              help="Normalisation layers the adapter owns, trained and stored with it (default batchnorm: "
                   "every BatchNorm; all: also LayerNorm/GroupNorm; frozen: the backbone's; with --from, the "
                   "parent's).")  # fmt: skip
@key_option
@pass_state
def train(state: State, output: str, backbone: str, data_dir: str, from_ref: str | None, rank: int | None,
          alpha: float | None, targets: str | None, head: str | None, epochs: int, lr: float | None, seed: int,
          full: bool, max_length: int | None, dora: bool, norm_layers: str | None,
          key: str | None) -> None:  # fmt: skip
    """Train a LoRA adapter for TASK on DATA over BACKBONE and register it as a new version.

    A backbone outside the catalogue (any torchvision.models name or module:callable) needs --targets; its head
    is --head, or its last Linear when that is unambiguous (said on stderr).

    Under `torchrun --nproc_per_node N` the batches are split across N processes; only rank 0 registers."""
    from ..pipelines import train_adapter

    version = train_adapter(
        state.hub(), output, backbone=backbone, data_dir=data_dir, from_ref=from_ref, rank=rank, alpha=alpha,
        targets=None if targets is None else targets.split(","), epochs=epochs, lr=lr, seed=seed, full=full,
        progress=not state.json, say=lambda line: click.echo(line, err=True), key=key, max_length=max_length,
        dora=dora, head=head, norm_layers=norm_layers,
    )  # fmt: skip
    if version is None:  # another process of a distributed run registered it
        return
    if state.json:
        emit_json(version.to_dict())
        return
    metrics = {m.name: m.value for m in state.hub().metrics(version.ref)}
    line = f"registered {version.ref}: test accuracy {metrics['test/accuracy']:.2%}"
    if "baseline/full_finetune_accuracy" in metrics:
        line += f" (full fine-tune {metrics['baseline/full_finetune_accuracy']:.2%})"
    click.echo(line)


@click.command("eval")
@click.argument("ref")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="ImageFolder directory, or a text file for a Transformers backbone.")  # fmt: skip
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
              help="The split as training made it, or all of the data.")  # fmt: skip
@pass_state
def eval_(state: State, ref: str, data_dir: str, split: str) -> None:
    """Accuracy of REF on DATA's split, logged as a metric of the version."""
    from ..pipelines import evaluate_ref

    version, accuracy = evaluate_ref(state.hub(), ref, data_dir, split=split)
    if state.json:
        emit_json({"ref": version.ref, "split": split, "accuracy": accuracy})
    else:
        click.echo(f"{version.ref}: {split} accuracy {accuracy:.2%}")
