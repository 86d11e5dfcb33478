"""The main job through the real CLI in a subprocess: a first run trains and registers, a second reuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTER_HUB_HOME": str(home)}
    env.pop("ADAPTER_HUB_DB", None)
    return subprocess.run([sys.executable, "-m", "adapter_hub.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_demo_runs_end_to_end_then_reuses_the_registry(tmp_path: Path, backbone: str):
    short = ["demo", "--backbone", backbone, "--epochs", "1", "--backbone-epochs", "1", "--json"]
    first = run(tmp_path, *short)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert [r["task"] for r in report["rows"]] == ["rotated", "inverted", "noisy", "rotated-noisy"]
    assert len(report["trained"]) == 7 and report["reused"] == []
    for row in report["rows"]:
        # a per-sample switch gives each task exactly its own adapter's accuracy
        assert row["switched"] == pytest.approx(row["lora"], abs=1e-6)  # one sample is ~0.005
        assert 0 < row["share_lora"] < (0.05 if backbone == "resnet" else 0.25)  # the small ViT is 0.2M params
    assert {g["goal"] for g in report["goals"]} >= {"switch keeps 100%"}

    second = run(tmp_path, *short)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["trained"] == [] and len(again["reused"]) == 7  # backbone + 6 adapter versions
    # every number of a row comes back: re-evaluated from the reloaded adapters or read from registered metrics
    assert again["rows"] == report["rows"]
    assert again["reused"] == report["trained"], "the same versions, found in the same order"

    lineage = run(tmp_path, "lineage", "digits-multitask/ties-r24@demo", "--format", "mermaid")
    assert lineage.returncode == 0, lineage.stderr
    assert lineage.stdout.count("composed_from") == 3
    transfer = run(tmp_path, "show", "digits-rotated-noisy/lora-r8-transfer@demo")
    assert "transferred_from" in transfer.stdout and "digits-rotated/lora-r8:1" in transfer.stdout


def test_demo_bad_arguments_are_one_line(tmp_path: Path):
    bad = run(tmp_path, "demo", "--backbone", "alexnet")
    assert bad.returncode == 2 and "Invalid value for '--backbone'" in bad.stderr and "Traceback" not in bad.stderr
