"""The adapter file: round trip, determinism, fingerprint checks and every kind of bad file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, fingerprint
from adapter_hub.errors import AdapterFileError, FingerprintMismatch
from adapter_hub.formats import adapter_file


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def trained(model: AdapterModel, name: str, cfg: LoRAConfig, seed: int = 3) -> None:
    model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


CFG = LoRAConfig(
    r=4, alpha=8, targets=["layer*.conv*", "layer*.downsample.0"], heads=["fc"], rank_pattern={"layer4*": 2}
)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def test_fingerprint_covers_names_shapes_dtypes_and_bytes():
    a, b = backbone(), backbone()
    assert fingerprint(a) == fingerprint(b)
    manual = hashlib.sha256()
    for name, t in [*a.named_parameters(), *a.named_buffers()]:
        manual.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        manual.update(t.detach().contiguous().numpy().tobytes())
    assert fingerprint(a) == manual.hexdigest()
    with torch.no_grad():
        b.fc.bias[0] += 1e-6
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(a.double())


def test_round_trip_and_deterministic_bytes(tmp_path: Path):
    model = AdapterModel(backbone())
    trained(model, "a", CFG)
    model.activate("a")
    expected = model(X)
    model.save_adapter("a", tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == model.adapter_to_bytes("a")

    other = AdapterModel(backbone())
    other.load_adapter("a", tmp_path / "a.safetensors")
    other.activate("a")
    assert torch.equal(other(X), expected)
    assert other.adapter_to_bytes("a") == data, "the same adapter gives the same bytes"

    tensors = safetensors.torch.load(data)
    assert tensors["layer1.0.conv1.lora_A.weight"].shape == (4, 64, 3, 3)
    assert tensors["layer1.0.conv1.lora_B.weight"].shape == (64, 4, 1, 1)
    assert tensors["layer4.0.conv1.lora_A.weight"].shape == (2, 256, 3, 3)
    assert tensors["fc.weight"].shape == (10, 512)
    with safetensors.safe_open(tmp_path / "a.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["adapter_hub.backbone_fingerprint"] == model.fingerprint
    assert json.loads(meta["adapter_hub.config"])["rank_pattern"] == {"layer4*": 2}
    # the adapter owns every BatchNorm (the default): listed, stored with their running statistics, format 3
    bns = [n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert json.loads(meta["adapter_hub.norms"]) == bns and len(bns) == 20
    assert torch.equal(tensors["layer2.0.bn1.running_var"], model.adapters["a"].norms["layer2/0/bn1"].running_var)
    assert meta["adapter_hub.format_version"] == "3"
    model.add_adapter("frozen", replace(CFG, norm_layers="frozen"))
    frozen = safetensors.torch.load(model.adapter_to_bytes("frozen"))
    assert not any(k.startswith("layer2.0.bn1") for k in frozen)
    frozen_meta = adapter_file.header_metadata(model.export_record("frozen"))
    assert frozen_meta["adapter_hub.format_version"] == "1" and "adapter_hub.norms" not in frozen_meta


def test_other_backbone_is_refused_unless_forced(tmp_path: Path):
    model = AdapterModel(backbone())
    trained(model, "a", CFG)
    model.save_adapter("a", tmp_path / "a.safetensors")
    other = AdapterModel(backbone(seed=1))
    with pytest.raises(FingerprintMismatch, match="force=True"):
        other.load_adapter("a", tmp_path / "a.safetensors")
    assert "a" not in other.adapters
    other.load_adapter("a", tmp_path / "a.safetensors", force=True)
    assert "a" in other.adapters


def _rewrite(path: Path, edit) -> None:
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata=meta)


def _set(key: str, value: torch.Tensor):
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("layer2.1.conv2.lora_B.weight"), "missing key layer2.1.conv2.lora_B.weight"),
        (_set("layer2.1.conv2.lora_C.weight", torch.zeros(1)), "unexpected key layer2.1.conv2.lora_C"),
        (_set("layer1.0.conv1.lora_A.weight", torch.zeros(4, 64, 1, 1)), "key layer1.0.conv1.lora_A.weight has shape"),
        (_set("fc.bias", torch.zeros(10, 2)), "key fc.bias has shape"),
    ],
)
def test_bad_keys_are_named_and_nothing_is_added(tmp_path: Path, edit, message):
    model = AdapterModel(backbone())
    trained(model, "a", CFG)
    path = tmp_path / "a.safetensors"
    model.save_adapter("a", path)
    _rewrite(path, edit)
    other = AdapterModel(backbone())
    with pytest.raises(AdapterFileError, match=message):
        other.load_adapter("b", path)
    assert "b" not in other.adapters
    assert all("forward" not in m.__dict__ for m in other.backbone.modules()), "no site left behind"


def test_not_safetensors_truncated_and_missing_files(tmp_path: Path):
    model = AdapterModel(backbone())
    trained(model, "a", CFG)
    good = model.adapter_to_bytes("a")
    (tmp_path / "text.safetensors").write_text("hello, this is not an adapter at all")
    (tmp_path / "short.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "head.safetensors").write_bytes(good[:5])
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain)
    target = AdapterModel(backbone())
    for name, pattern in [
        ("text", "not a safetensors file"),
        ("short", "truncated"),
        ("head", "not a safetensors file"),
        ("plain", "not an adapter-hub adapter file"),
        ("absent", "cannot read"),
    ]:
        with pytest.raises(AdapterFileError, match=pattern):
            target.load_adapter("b", tmp_path / f"{name}.safetensors")
    assert len(target.adapters) == 0


def test_newer_format_is_refused(tmp_path: Path):
    model = AdapterModel(backbone())
    trained(model, "a", CFG)
    path = tmp_path / "a.safetensors"
    model.save_adapter("a", path)
    with safetensors.safe_open(path, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    meta["adapter_hub.format_version"] = "99"
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(AdapterFileError, match="newer"):
        AdapterModel(backbone()).load_adapter("a", path)


def test_head_of_another_size_round_trips(tmp_path: Path):
    model = AdapterModel(backbone())
    model.add_adapter(
        "parity", LoRAConfig(targets=["layer4.*.conv*"], heads=["fc"]), head_modules={"fc": nn.Linear(512, 2)}
    )
    model.activate("parity")
    y = model(X)
    model.save_adapter("parity", tmp_path / "p.safetensors")
    other = AdapterModel(backbone())
    other.load_adapter("parity", tmp_path / "p.safetensors")
    other.activate("parity")
    assert torch.equal(other(X), y) and y.shape == (2, 2)
