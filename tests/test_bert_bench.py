"""The BERT benchmark's agreement checks, on a tiny BERT: they pass on the real models (ours against the real
``peft`` package, mixed batch against each sample alone, gradients too) and they catch a wrong adapter."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_script

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bert_bench") as module:
        # one thread: a tiny model's ops are too small to share, and a second thread waiting on a busy core
        # makes them many times slower (the thread count is put back afterwards)
        torch.set_num_threads(1)
        yield module


def test_checks_pass_and_the_adapters_do_real_work(bench):
    checks = bench.run_checks(bench.TINY, n=8, tokens=16, k=4)
    inf, train = checks["inference"], checks["training"]
    for key in ("ours_vs_peft", "merged_vs_unmerged", "peft_merged_vs_ours", "mixed_vs_each_sample_alone",
                "mixed_pooler_vs_alone", "mixed_ours_vs_peft"):  # fmt: skip
        assert isinstance(inf[key], float) and inf[key] < 1e-4, (key, inf[key])
    assert inf["effect_of_one_adapter"] > 1e-2 and inf["effect_of_routing"] > 1e-2
    assert train["min_grad_of_a"] > 0
    assert train["grads_ours_vs_peft"] < 1e-6 and train["mixed_grads_vs_alone"] < 1e-6


def test_a_peft_adapter_that_differs_is_refused(bench):
    models = bench.inference_models(bench.TINY, 2)
    with torch.no_grad():
        b = dict(models["peft1"].named_parameters())[
            "base_model.model.encoder.layer.1.attention.self.value.lora_B.t0.weight"
        ]
        b.mul_(1.5)
    batch = bench.make_batch(4, 16, bench.TINY["vocab_size"])
    with pytest.raises(bench.Disagreement, match="ours vs PEFT"):
        bench.check_inference(**models, batch=batch, route=["t0", "t1", "t0", "t1"])


def test_a_peft_head_that_differs_is_refused_in_training(bench):
    models = bench.training_models(bench.TINY, 2)
    with torch.no_grad():
        dict(models["peft1"].named_parameters())["base_model.model.classifier.modules_to_save.t0.bias"][0].add_(0.3)
    batch = bench.make_batch(4, 16, bench.TINY["vocab_size"])
    with pytest.raises(bench.Disagreement, match="ours vs PEFT"):
        bench.check_training(models["ours1"], models["peft1"], models["ours_k"], batch, ["t0", "t1", "t0", "t1"])
