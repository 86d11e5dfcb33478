"""Local weights files (the catalogue itself is checked in test_catalogue.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_hub import AdapterModel, backbones
from adapter_hub.backbones import BackboneError


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
