"""adapter-hub predict: several versions at once, each input routed to its task's adapter and head."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ._app import State, cell, console, emit_json, pass_state, plain

SHOWN_ROWS = 20  # text predictions printed without -o


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--data", "source", required=True, type=click.Path(path_type=Path),
              help="A directory with one folder per task (ImageFolder inside gives labels), or a CSV file "
                   "with the columns path, task and optionally label; for a Transformers backbone a .csv/.jsonl "
                   "file with text and optionally task and label.")  # fmt: skip
@click.option("--switch/--one-by-one", default=True, show_default=True,
              help="Mixed batches through one Switch, or each version on its own inputs in turn.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write predictions as CSV.")
@pass_state
def predict(state: State, refs: tuple[str, ...], source: Path, switch: bool, output: Path | None) -> None:
    """Predict with REFS (one version per task) on DATA, routing every input to its task's version."""
    from ..predict import predict_refs

    result = predict_refs(state.hub(), list(refs), source, switch=switch, output=output)
    if state.json:
        emit_json({"switched": result.switched, "accuracy": result.accuracy, "predictions": result.rows()})
        return
    table = Table(title=f"{len(result.items)} inputs, " + ("one Switch, mixed batches" if switch else "one by one"))
    for col in ("ref", "task", "inputs", "accuracy"):
        table.add_column(col, justify="right" if col in ("inputs", "accuracy") else "left")
    for task, ref in result.refs.items():
        acc = result.accuracy[ref]
        count = sum(it.task == task for it in result.items)
        table.add_row(cell(ref, limit=None), cell(task, limit=None), str(count), "-" if acc is None else f"{acc:.2%}")
    console().print(table)
    if result.texts and output is None:  # texts are few words each: show what was predicted
        rows = result.rows()
        shown = Table("line", "text", "task", "predicted", "label", title="predictions")
        for row in rows[:SHOWN_ROWS]:
            shown.add_row(str(row["line"]), cell(row["text"], limit=60), cell(row["task"], limit=None),
                          cell(row["predicted"]), cell("-" if row["label"] is None else row["label"]))  # fmt: skip
        console().print(shown)
        if len(rows) > SHOWN_ROWS:
            click.echo(f"… {len(rows) - SHOWN_ROWS} more rows (-o FILE or --json has them all)")
    if output is not None:
        click.echo(f"predictions written to {plain(output)}")
