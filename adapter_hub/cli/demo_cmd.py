"""adapter-hub demo: the main job, a real-data scenario end to end."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from ._app import State, cell, console, emit_json, pass_state, plain


@click.command()
@click.option("--backbone", type=click.Choice(["resnet", "vit"]), default="resnet", show_default=True,
              help="A small torchvision ResNet, or a VisionTransformer on the digits at 16 px.")  # fmt: skip
@click.option("--epochs", type=int, default=None,
              help="Epochs per adapter (and for the full fine-tune), 1 to 100.  [default: 8]")  # fmt: skip
@click.option("--backbone-epochs", type=int, default=None,
              help="1 to 1000.  [default: 8 for resnet, 150 for vit]")  # fmt: skip
@click.option("--rank", type=int, default=None, help="1 to 256.  [default: 8 for resnet, 4 for vit]")
@click.option("--seed", type=int, default=0, show_default=True, help="0 to 2**63-1.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_state
def demo(state: State, backbone: str, epochs: int | None, backbone_epochs: int | None, rank: int | None, seed: int,
         quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Train a backbone on real digits, adapt it to four shifted domains with LoRA, transfer, combine (TIES)
    and switch the adapters, and register everything. A second run reuses the registry."""
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(backbone=backbone, epochs=epochs, backbone_epochs=backbone_epochs, rank=rank, seed=seed,
                            progress=not quiet and not as_json)  # fmt: skip
    hub = state.hub()
    result = run_demo(hub, settings)
    if as_json or state.json:
        emit_json({
            "backbone": result.backbone, "backbone_accuracy": result.backbone_accuracy, "rank": result.rank,
            "seconds": result.seconds,
            "rows": [vars(r) for r in result.rows], "reused": result.reused, "trained": result.trained,
            "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in result.goals()],
        })  # fmt: skip
        return
    out = console()
    table = Table(title=f"Test accuracy per target domain — backbone {result.backbone} "
                        f"(source domain: {result.backbone_accuracy:.1%})")  # fmt: skip
    for col in ("domain", "head", "LoRA", "full FT", "transfer", "TIES", "switch", "steps"):
        table.add_column(col, justify="left" if col == "domain" else "right")

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.1%}"

    for r in result.rows:
        steps = f"{r.steps_fresh}→{r.steps_transfer}" if r.steps_fresh is not None else "—"
        table.add_row(cell(r.task), pct(r.head_only), pct(r.lora), pct(r.full), pct(r.transfer), pct(r.merged),
                      pct(r.switched), steps)  # fmt: skip
    table.caption = (f"head: head-only probe · LoRA: LoRA r={result.rank} + head + own norms · full FT: every "
                     "weight · transfer: LoRA started from the rotated adapter · TIES: 3-task average, own head · "
                     "switch: per-sample routing of all tasks in one batch · steps: to 95% of the fresh adapter's "
                     "best accuracy, fresh→transfer")  # fmt: skip
    out.print(table)
    if result.rows:
        r = result.rows[0]
        out.print(f"trainable share of the backbone's parameters: head only {r.share_head:.2%}, "
                  f"LoRA + head + norms {r.share_lora:.2%}, full fine-tune 100%")  # fmt: skip
    goals = Table(title="Goals")
    for col in ("goal", "measured", "met"):
        goals.add_column(col)
    for goal, measured, ok in result.goals():
        goals.add_row(cell(goal), cell(measured), Text("yes") if ok else Text("no", style="bold"))
    out.print(goals)
    from .inspect_cmds import _tree

    out.print(_tree(hub.lineage(result.lineage_root)))
    out.print(f"{len(result.trained)} trained and registered, {len(result.reused)} reused from {plain(hub.home)}; "
              f"{result.seconds:.0f} s", markup=False)  # fmt: skip
