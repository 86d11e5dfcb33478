"""What the benchmark scripts share: number formats for their tables and their section of RESULTS.md.

Each script owns one section, between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; rewriting it leaves the
other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS_MD = Path(__file__).parent / "RESULTS.md"


def fmt(v) -> str:
    """A time in seconds as ms (or s from 10 s up); anything else as it is."""
    if isinstance(v, float):
        return f"{v * 1000:.1f} ms" if v < 10 else f"{v:.1f} s"
    return str(v)


def ratio(v) -> str:
    return f"{v:.2f}×" if isinstance(v, float) else "—"


def write_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Put ``text`` in RESULTS.md as section NAME: in place of the old one, or at the end."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in current:
        current = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)
