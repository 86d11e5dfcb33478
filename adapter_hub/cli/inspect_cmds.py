"""adapter-hub ls | show | versions | lineage | metrics"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .. import checks
from ..errors import ConfigError
from ..registry import Lineage, Version
from ..registry.errors import RegistryError
from ..registry.render import to_dot, to_mermaid
from ._app import CELL_LIMIT, State, cell, console, emit_json, json_option, pass_state, plain, short, size, when

# `show` is where a record is read in full, so it shows more of each long value (folded over lines) than a
# listing's cells do; --json has everything.
SHOW_LIMIT = 1000


@click.command()
@click.argument("task", required=False)
@json_option
@pass_state
def ls(state: State, task: str | None) -> None:
    """List adapters (of TASK)."""
    rows = state.hub().ls(task)
    if state.json:
        emit_json([r.to_dict() for r in rows])
        return
    table = Table("adapter", "versions", "latest", "aliases", "updated", title="adapters")
    for r in rows:
        aliases = ", ".join(f"{a}→{n}" for a, n in r.aliases.items()) or "-"
        latest = str(r.latest) if r.latest is not None else "-"
        adapter = cell(f"{r.task}/{r.name}", limit=None)
        table.add_row(adapter, str(r.versions), latest, cell(aliases), when(r.updated_at))
    console().print(table)


@click.command()
@click.argument("ref")
@json_option
@pass_state
def show(state: State, ref: str) -> None:
    """Show one version: record, lineage edges, metrics."""
    hub = state.hub()
    v = hub.resolve(ref, include_deleted=True)
    graph = hub.lineage(v.ref)
    metrics = hub.metrics(v.ref)
    if state.json:
        emit_json(
            {
                **v.to_dict(),
                "parents": [e.to_dict() for e in graph.parents(v.ref)],
                "children": [e.to_dict() for e in graph.children(v.ref)],
                "metrics": [m.to_dict() for m in metrics],
            }
        )
        return
    table = Table(show_header=False, title=cell(v.ref, limit=None), title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    fields = [
        ("status", v.status),
        ("backbone", f"{v.backbone} ({short(v.fingerprint)})"),
        ("artifact", f"sha256:{v.digest} ({size(v.size)})"),
        ("trainable params", f"{v.trainable_params:,}" if v.trainable_params is not None else "-"),
        ("config", ", ".join(f"{k}={val}" for k, val in (v.config or {}).items() if val not in ({}, [], None))),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("tags", ", ".join(f"{plain(k, CELL_LIMIT)}={plain(val, CELL_LIMIT)}" for k, val in v.tags.items()) or "-"),
        ("created", f"{when(v.created_at)} by {v.created_by or '?'}"),
        ("description", v.description or "-"),
    ]
    for edge in graph.parents(v.ref):
        fields.append(("made from", f"{edge.parent} ({_edge_label(edge)})"))
    for edge in graph.children(v.ref):
        fields.append(("used by", f"{edge.child} ({_edge_label(edge)})"))
    for m in metrics:
        step = f" step {m.step}" if m.step is not None else ""
        fields.append(("metric", f"{m.name} = {m.value:.6g}{step}"))
    for key, value in fields:
        table.add_row(key, cell(value, limit=SHOW_LIMIT))
    console().print(table)


@click.command()
@click.argument("adapter")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted versions.")
@json_option
@pass_state
def versions(state: State, adapter: str, include_deleted: bool) -> None:
    """List the versions of TASK/ADAPTER."""
    hub = state.hub()
    rows = hub.versions(adapter, include_deleted=include_deleted)
    if state.json:
        emit_json([v.to_dict() for v in rows])
        return
    headers = ("version", "status", "created", "backbone", "digest", "size", "params", "aliases")
    table = Table(*headers, title=cell(adapter, limit=None))
    for v in rows:
        params = f"{v.trainable_params:,}" if v.trainable_params is not None else "-"
        table.add_row(
            str(v.number),
            v.status,
            when(v.created_at),
            cell(v.backbone),
            short(v.digest),
            size(v.size),
            params,
            cell(", ".join(v.aliases) or "-"),
        )
    console().print(table)


def _edge_label(edge: object) -> str:
    relation = getattr(edge, "relation", "")
    method, weight = getattr(edge, "method", None), getattr(edge, "weight", None)
    extra = [x for x in (method, f"w={weight:g}" if weight is not None else None) if x]
    return relation + (f", {', '.join(extra)}" if extra else "")


def _label(v: Version, root: str) -> Text:
    text = cell(v.ref, limit=None, style="bold" if v.ref == root else "")
    if v.status != "ready":
        text.append(f" ({v.status})", style="dim")
    return text


def _tree(graph: Lineage) -> Tree:
    tree = Tree(_label(graph.versions[graph.root], graph.root))

    def grow(node: Tree, ref: str, up: bool, path: frozenset[str]) -> None:
        for edge in graph.parents(ref) if up else graph.children(ref):
            nxt = edge.parent if up else edge.child
            label = _label(graph.versions[nxt], graph.root)
            branch = node.add(Text.assemble(label, "  ", cell(_edge_label(edge), style="dim")))
            if nxt not in path:
                grow(branch, nxt, up, path | {nxt})

    if graph.parents(graph.root):
        grow(tree.add("[italic]made from[/italic]"), graph.root, True, frozenset({graph.root}))
    if graph.children(graph.root):
        grow(tree.add("[italic]used by[/italic]"), graph.root, False, frozenset({graph.root}))
    return tree


@click.command()
@click.argument("ref")
@click.option(
    "--format", "fmt", type=click.Choice(["tree", "dot", "mermaid", "png"]), default="tree", show_default=True
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file (needed for png).")
@json_option
@pass_state
def lineage(state: State, ref: str, fmt: str, output: str | None) -> None:
    """Ancestors and descendants of REF: a tree, Graphviz dot, Mermaid, or a PNG (needs Graphviz)."""
    if output is not None:
        if fmt == "tree" or state.json:
            raise ConfigError("-o writes --format dot, mermaid or png; the tree and --json go to the terminal")
        checks.writable_file(output, "-o")
    graph = state.hub().lineage(ref)
    if state.json:
        emit_json(graph.to_dict())
        return
    if fmt == "tree":
        console().print(_tree(graph))
        return
    if fmt == "png":
        _png(to_dot(graph), output)
        return
    text = to_dot(graph) if fmt == "dot" else to_mermaid(graph)
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)


def _png(dot_source: str, output: str | None) -> None:
    exe = shutil.which("dot")
    if exe is None:
        raise RegistryError(
            "--format png needs Graphviz's `dot` on PATH (apt install graphviz / brew install graphviz); "
            "or use --format dot and render it elsewhere"
        )
    if not output:
        raise RegistryError("--format png needs -o FILE.png")
    proc = subprocess.run([exe, "-Tpng", "-o", output], input=dot_source.encode(), capture_output=True)
    if proc.returncode != 0:
        raise RegistryError(f"dot failed: {proc.stderr.decode(errors='replace').strip()}")
    click.echo(f"wrote {plain(output)}")


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--metric", "names", multiple=True, help="Only these metrics (repeatable).")
@json_option
@pass_state
def metrics(state: State, refs: tuple[str, ...], names: tuple[str, ...]) -> None:
    """Compare the metrics of versions REF...: one row a metric, the best value in bold."""
    table_data = state.hub().compare_metrics(list(refs), list(names) or None)
    if state.json:
        emit_json(table_data.to_dict())
        return
    table = Table("metric", title="metrics")
    for ref in table_data.refs:
        table.add_column(cell(ref, limit=None))
    for name, split in table_data.rows:
        key = table_data.key(name, split)
        label = name if not split or name.startswith(f"{split}/") else f"{name} [{split}]"
        cells: list[Text] = []
        for ref in table_data.refs:
            value = table_data.values[key].get(ref)
            text = "-" if value is None else f"{value:.4g}"
            cells.append(Text(text, style="bold green" if table_data.best.get(key) == ref else ""))
        table.add_row(cell(label), *cells)
    console().print(table)
