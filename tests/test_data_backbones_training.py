"""Digits domains, ImageFolder round trips, the backbone catalogue and weights, training and transfer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, backbones, data, training
from adapter_hub.backbones import BackboneError
from adapter_hub.data import DataError


def test_digits_domains_are_the_real_images_shifted():
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    ds = data.digits("original", pool="all", seed=3)
    rot = data.digits("rotated", pool="all", seed=3)
    inv = data.digits("inverted", pool="all", seed=3)
    assert ds.train.x.shape[1:] == (3, 8, 8) and len(ds.train) + len(ds.val) + len(ds.test) == len(raw)
    # every training image is one of scikit-learn's digits, with its own label
    flat = raw.flatten(1)
    for img, label in list(zip(ds.train.x[:20], ds.train.y[:20])):
        match = (flat == img[0].flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(load_digits().target[match[0]]) == int(label)
    torch.testing.assert_close(rot.train.x, torch.rot90(ds.train.x, 1, dims=(-2, -1)))
    torch.testing.assert_close(inv.train.x, 1 - ds.train.x)


def test_parity_labels_pools_and_noise():
    digit = data.digits("noisy", seed=1)
    parity = data.digits("noisy", labels="parity", seed=1)
    assert torch.equal(parity.train.y, digit.train.y % 2) and parity.num_classes == 2
    assert torch.equal(digit.train.x, data.digits("noisy", seed=1).train.x), "seeded noise is reproducible"
    source, target = data.digits(pool="source"), data.digits(pool="target")
    src = {tuple(x.flatten().tolist()) for s in (source.train, source.val, source.test) for x in s.x}
    tgt = {tuple(x.flatten().tolist()) for s in (target.train, target.val, target.test) for x in s.x}
    assert len(src & tgt) <= 5, "the pools are disjoint halves (a few digits appear twice in the data set)"
    with pytest.raises(DataError, match="unknown digits domain 'upside'"):
        data.digits("upside")


def test_imagefolder_round_trip_and_bad_directories(tmp_path: Path):
    ds = data.digits("rotated", pool="target")
    small = data.Dataset(*(data.Split(s.x[:30], s.y[:30]) for s in (ds.train, ds.val, ds.test)), 10, "x")
    root = data.write_imagefolder(small, tmp_path / "rot")
    back = data.load_imagefolder(root)
    classes = sorted({int(y) for y in small.train.y})
    # ImageFolder orders files by class folder: compare as sorted multisets of (label, image)
    for a, b in [(small.train, back.train), (small.test, back.test)]:
        ka = sorted((classes.index(int(y)), x[0].mul(255).round().flatten().tolist()) for x, y in zip(a.x, a.y))
        kb = sorted((int(y), x[0].mul(255).round().flatten().tolist()) for x, y in zip(b.x, b.y))
        assert [k for k, _ in ka] == [k for k, _ in kb]
        assert all(max(abs(u - v) for u, v in zip(p, q)) <= 1 for (_, p), (_, q) in zip(ka, kb))
    with pytest.raises(DataError, match="classes, the task expects 2"):
        data.load_imagefolder(root, num_classes=2)
    with pytest.raises(DataError, match="does not exist"):
        data.load_imagefolder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        data.load_imagefolder(tmp_path / "empty")


@pytest.mark.parametrize("name", sorted(backbones.CATALOGUE))
def test_catalogue_targets_and_heads_resolve(name: str):
    model = backbones.build_backbone({"architecture": name, "num_classes": 10})
    adapter_model = AdapterModel(model)
    entry = backbones.entry(name)
    targets, heads = adapter_model.resolve_targets(LoRAConfig(targets=entry.targets, heads=[entry.head]))
    assert targets and heads == [entry.head]
    assert isinstance(model.get_submodule(entry.head), nn.Linear)


def test_weights_from_local_safetensors_and_pth(tmp_path: Path):
    source = {"architecture": "resnet_small", "num_classes": 10, "seed": 4}
    trained = backbones.build_backbone(source)
    with torch.no_grad():
        trained.fc.bias.add_(1.0)
    backbones.save_weights(trained, tmp_path / "w.safetensors")
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    expected = AdapterModel(trained).fingerprint
    for weights in ("w.safetensors", "w.pth"):
        built = backbones.build_backbone({**source, "seed": 9, "weights": str(tmp_path / weights)})
        assert AdapterModel(built).fingerprint == expected
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="do not fit"):
        backbones.build_backbone({**source, "weights": str(tmp_path / "bad.pth")})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="cannot read weights"):
        backbones.build_backbone({**source, "weights": str(tmp_path / "junk.safetensors")})
    with pytest.raises(BackboneError, match="unknown"):
        backbones.entry("resnet9000")


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
