"""How the benchmark scripts time their cases side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


def interleaved(cases: dict[Hashable, Callable[[], object]], repeats: int, warmup: int = 2) -> dict:
    """Median seconds per case over ``repeats`` rounds, each round calling every case once, so that a slow
    spell of the machine hits all cases alike instead of one of them."""
    times: dict = {c: [] for c in cases}
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for case, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[case].append(time.perf_counter() - start)
    return {case: statistics.median(ts) for case, ts in times.items()}
