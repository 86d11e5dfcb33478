"""Lineage graphs as text: Graphviz dot and Mermaid."""

from __future__ import annotations

import json

from .records import Edge, Lineage


def _label(edge: Edge) -> str:
    parts = [edge.relation]
    if edge.method:
        parts.append(edge.method)
    if edge.weight is not None:
        parts.append(f"w={edge.weight:g}")
    return " ".join(parts)


def _node_ids(lineage: Lineage) -> dict[str, str]:
    return {ref: f"v{i}" for i, ref in enumerate(sorted(lineage.versions))}


def to_dot(lineage: Lineage) -> str:
    ids = _node_ids(lineage)
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for ref, node in ids.items():
        version = lineage.versions[ref]
        style = ', style="bold"' if ref == lineage.root else ""
        style += ', color="gray"' if version.status != "ready" else ""
        lines.append(f"  {node} [label={json.dumps(ref)}{style}];")
    for edge in lineage.edges:
        lines.append(f"  {ids[edge.parent]} -> {ids[edge.child]} [label={json.dumps(_label(edge))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(lineage: Lineage) -> str:
    ids = _node_ids(lineage)
    lines = ["flowchart LR"]
    for ref, node in ids.items():
        text = ref.replace('"', "'")
        lines.append(f'  {node}["{text}"]')
    for edge in lineage.edges:
        lines.append(f'  {ids[edge.parent]} -->|"{_label(edge)}"| {ids[edge.child]}')
    lines.append(f"  style {ids[lineage.root]} stroke-width:3px")
    return "\n".join(lines) + "\n"
