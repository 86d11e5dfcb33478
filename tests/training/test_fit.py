"""fit, its interruption and transfer_init on a small real model and real digits."""

from __future__ import annotations

import copy

import pytest
import torch

from adapter_hub import AdapterModel, LoRAConfig, backbones, data, training


def _lora_model() -> tuple[AdapterModel, data.Dataset]:
    torch.manual_seed(0)
    bb = backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10})
    model = AdapterModel(bb)
    model.add_adapter("a", LoRAConfig(r=4, targets=["layer*.*.conv*"], heads=["fc"]))
    model.activate("a")
    ds = data.digits("original", pool="target")
    small = data.Dataset(*(data.Split(s.x[:128], s.y[:128]) for s in (ds.train, ds.val, ds.test)), 10, "d")
    return model, small


def test_fit_trains_only_the_adapter_is_deterministic_and_keeps_the_best():
    model, ds = _lora_model()
    before = copy.deepcopy(model.backbone.state_dict())
    start = training.evaluate(model, ds.val)
    result = training.fit(model, ds.train, ds.val, epochs=3, lr=1e-2, eval_every=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert result.best_accuracy == max(acc for _, acc in result.history) > start
    assert training.evaluate(model, ds.val) == pytest.approx(result.best_accuracy), "best state restored"
    again, _ = _lora_model()
    training.fit(again, ds.train, ds.val, epochs=3, lr=1e-2, eval_every=2, progress=False)
    for (n, p), (_, q) in zip(model.adapters.named_parameters(), again.adapters.named_parameters()):
        assert torch.equal(p, q), n


def test_interrupted_training_says_so():
    model, ds = _lora_model()
    calls = []

    def stop(*_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.backbone.register_forward_pre_hook(stop)
    with pytest.raises(training.TrainingInterrupted, match="nothing was registered"):
        training.fit(model, ds.train, ds.val, epochs=1, progress=False)


def test_transfer_init_starts_from_the_source_adapter():
    model, ds = _lora_model()
    training.fit(model, ds.train, ds.val, epochs=1, progress=False)
    training.transfer_init(model, "a", "b")
    model.activate("a")
    ya = model(ds.test.x)
    model.activate("b")
    assert torch.equal(model(ds.test.x), ya)
    assert model.adapters["b"].metadata["transferred_from"] == "a"
