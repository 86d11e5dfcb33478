"""The lineage graph as SVG, laid out by Graphviz's `dot`, each node a link to its version's page.

Without `dot` on PATH (or when it fails or takes too long) the page says why and shows the edges as a list of
links instead; the SVG is checked before it is put into a page (see ``_safe``)."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Lineage
from ..registry.records import Edge
from ..registry.render import visible

DOT_TIMEOUT_S = 10.0
MAX_DRAWN = 300  # versions: a bigger graph is listed, not drawn (dot's layout time grows fast, and it is unreadable)
# Colours per relation, so the kinds of edges can be told apart at a glance (the label says it too).
RELATION_COLOURS = {
    "finetuned_from": "#1f77b4",
    "transferred_from": "#2ca02c",
    "composed_from": "#d62728",
    "imported_from": "#7f7f7f",
}


@dataclass(frozen=True)
class Drawing:
    svg: str | None  # the SVG markup, or None when it could not be drawn
    problem: str | None  # why not, for the page


def edge_label(edge: Edge) -> str:
    parts = [edge.relation]
    if edge.weight is not None:
        parts.append(f"w={edge.weight:g}")
    if edge.method:
        parts.append(edge.method)
    return " ".join(parts)


def _quote(text: str) -> str:
    """A DOT quoted string that dot shows literally (a backslash doubled: dot reads \\n, \\N… in labels; a
    quote escaped; control characters as visible escapes, so no raw newline ends the statement)."""
    return '"' + visible(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(lineage: Lineage, url_for: Callable[[str], str]) -> str:
    ids = {ref: f"v{i}" for i, ref in enumerate(sorted(lineage.versions))}
    lines = [
        "digraph lineage {",
        '  rankdir=LR; bgcolor="transparent";',
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for ref, node in ids.items():
        version = lineage.versions[ref]
        attrs = [f"label={_quote(ref + ('' if version.status == 'ready' else f' ({version.status})'))}",
                 f"URL={_quote(url_for(ref))}", f"tooltip={_quote(ref)}", 'target="_top"']  # fmt: skip
        if ref == lineage.root:
            attrs.append('penwidth=2.5, fillcolor="#fff3c4"')
        if version.status != "ready":
            attrs.append('color="gray", fontcolor="gray"')
        lines.append(f"  {node} [{', '.join(attrs)}];")
    for edge in lineage.edges:
        colour = RELATION_COLOURS.get(edge.relation, "#000000")
        label = _quote(edge_label(edge))
        lines.append(f'  {ids[edge.parent]} -> {ids[edge.child]} [label={label}, color="{colour}", '
                     f'fontcolor="{colour}"];')  # fmt: skip
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(lineage: Lineage, url_for: Callable[[str], str]) -> Drawing:
    if len(lineage.versions) > MAX_DRAWN:
        return Drawing(None, f"{len(lineage.versions):,} versions are too many to draw (at most {MAX_DRAWN}): the "
                             "lineage is listed below instead")  # fmt: skip
    exe = shutil.which("dot")
    if exe is None:
        return Drawing(None, "Graphviz's `dot` is not installed (apt install graphviz / brew install graphviz): "
                             "the lineage is listed below instead of drawn")  # fmt: skip
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=to_dot(lineage, url_for).encode(), capture_output=True,
                              timeout=DOT_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Drawing(None, f"Graphviz took more than {DOT_TIMEOUT_S:g} s to lay out {len(lineage.versions)} "
                             "versions: the lineage is listed below instead")  # fmt: skip
    if proc.returncode != 0:
        reason = visible(proc.stderr.decode(errors="replace").strip().splitlines()[0] if proc.stderr else "")
        return Drawing(None, f"Graphviz failed ({reason or f'exit code {proc.returncode}'}): the lineage is listed "
                             "below instead")  # fmt: skip
    svg = _safe(proc.stdout.decode("utf-8", errors="replace"))
    if svg is None:
        return Drawing(None, "Graphviz's drawing was not plain SVG: the lineage is listed below instead")
    return Drawing(svg, None)


_SVG = "{http://www.w3.org/2000/svg}"
_ALLOWED = {"svg", "g", "title", "polygon", "path", "ellipse", "polyline", "text", "a"}


def _safe(svg: str) -> str | None:
    """The <svg> element of dot's output, if it is made only of the drawing elements dot writes and carries
    no event handler or script link. dot escapes the labels it writes, so this is a second line of defence
    for text from the registry that ends up in the page as markup."""
    start = svg.find("<svg")
    if start < 0:
        return None
    body = svg[start:]
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        tag = element.tag.removeprefix(_SVG)
        if tag not in _ALLOWED:
            return None
        for name, value in element.attrib.items():
            local = name.rsplit("}", 1)[-1].lower()
            if local.startswith("on") or (local == "href" and not value.startswith("/")):
                return None
    return body
