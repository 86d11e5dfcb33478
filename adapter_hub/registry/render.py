"""Lineage graphs as text (Graphviz dot and Mermaid), and stored strings made safe to print."""

from __future__ import annotations

import unicodedata

from .records import Edge, Lineage

# Control characters (ESC starts terminal escape sequences, C1 controls include CSI), format characters
# (bidi overrides reorder what the reader sees), surrogates and line/paragraph separators: none of them is
# ever printed raw.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str, limit: int | None = None) -> str:
    """TEXT with every control or format character written as its Python escape (ESC as \\x1b, a newline
    as \\n), so stored text can neither move the cursor, recolour, retitle or hyperlink the terminal nor span
    lines; beyond LIMIT characters it is cut and ends with "… (N chars)", N being the full length."""
    if not (text.isascii() and text.isprintable()):
        text = "".join(_escape_char(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}… ({len(text):,} chars)"
    return text


def _label(edge: Edge) -> str:
    parts = [edge.relation]
    if edge.method:
        parts.append(edge.method)
    if edge.weight is not None:
        parts.append(f"w={edge.weight:g}")
    return " ".join(parts)


def _dot_string(text: str) -> str:
    """A DOT quoted string that shows TEXT literally: a quote is escaped and a backslash doubled (in a label
    dot reads \\n, \\l and \\r as line breaks and \\N, \\G… as substitutions); control characters are
    already visible escapes, so no raw newline can end the statement."""
    return '"' + visible(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


# Mermaid has no backslash escapes inside quoted labels; it decodes #<decimal>; entities instead. Quotes
# would end the label, | ends an edge label, brackets and braces end node shapes, < > & would be read as
# HTML, backticks start markdown strings and # starts an entity: each is written as its entity.
_MERMAID_ENTITIES = {ch: f"#{ord(ch)};" for ch in '"#&<>|[](){}`\\'}


def _mermaid_string(text: str) -> str:
    return '"' + "".join(_MERMAID_ENTITIES.get(ch, ch) for ch in visible(text)) + '"'


def _node_ids(lineage: Lineage) -> dict[str, str]:
    return {ref: f"v{i}" for i, ref in enumerate(sorted(lineage.versions))}


def to_dot(lineage: Lineage) -> str:
    ids = _node_ids(lineage)
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for ref, node in ids.items():
        version = lineage.versions[ref]
        style = ', style="bold"' if ref == lineage.root else ""
        style += ', color="gray"' if version.status != "ready" else ""
        lines.append(f"  {node} [label={_dot_string(ref)}{style}];")
    for edge in lineage.edges:
        lines.append(f"  {ids[edge.parent]} -> {ids[edge.child]} [label={_dot_string(_label(edge))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(lineage: Lineage) -> str:
    ids = _node_ids(lineage)
    lines = ["flowchart LR"]
    for ref, node in ids.items():
        lines.append(f"  {node}[{_mermaid_string(ref)}]")
    for edge in lineage.edges:
        lines.append(f"  {ids[edge.parent]} -->|{_mermaid_string(_label(edge))}| {ids[edge.child]}")
    lines.append(f"  style {ids[lineage.root]} stroke-width:3px")
    return "\n".join(lines) + "\n"
