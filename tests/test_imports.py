"""No import circle inside adapter_hub: every module imports only modules below it.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, also those inside
functions and ``TYPE_CHECKING`` blocks, since a deferred import is a circle all the same), and circles are
the strongly connected components of more than one module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import adapter_hub


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package whose directory is ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports. ``from pkg import name`` points at the
    submodule ``pkg.name`` when there is one, otherwise at ``pkg`` itself."""
    modules = module_names(root)
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if target != top and not target.startswith(top + "."):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        graph[name].add(sub)
                    elif target in modules and target != name:
                        graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def test_adapter_hub_has_no_import_circle() -> None:
    graph = import_graph(Path(adapter_hub.__file__).parent)
    # the walk sees the package: the model imports its codecs, and the codecs import the record
    assert {"adapter_hub.formats.adapter_file", "adapter_hub.formats.peft"} <= graph["adapter_hub.model"]
    assert "adapter_hub.formats.record" in graph["adapter_hub.formats.adapter_file"]
    assert circles(graph) == []


def test_a_circle_is_found_in_every_import_form(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import thing\n",  # a -> b
        "b.py": "def f():\n    from . import a\n",  # b -> a, deferred
        "c.py": "import pkg.sub.d\n",  # c -> sub.d
        "sub/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import x\n",  # sub -> c
        "sub/d.py": "from pkg.sub import e\n",  # sub.d -> sub.e
        "sub/e.py": "from .. import sub\n",  # sub.e -> sub
        "lone.py": "from .a import thing\nimport os\n",  # only into a circle, never back
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.lone"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.d", "pkg.sub.e"]]
    (pkg / "b.py").write_text("import os\n")
    assert circles(import_graph(pkg)) == [["pkg.c", "pkg.sub", "pkg.sub.d", "pkg.sub.e"]]


def test_the_dependency_direction_holds() -> None:
    """lora/ (the maths) imports nothing else of the package; nothing but cli/ imports cli/."""
    graph = import_graph(Path(adapter_hub.__file__).parent)
    for module, targets in graph.items():
        if module.startswith("adapter_hub.lora"):
            assert all(t.startswith("adapter_hub.lora") for t in targets), (module, targets)
        if not module.startswith("adapter_hub.cli"):
            assert not any(t.startswith("adapter_hub.cli") for t in targets), (module, targets)
    assert graph["adapter_hub.lora.conv"], "the walk sees lora/'s own imports"
