"""Local weights files (the catalogue itself is checked in test_catalogue.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

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


class _AuxLast(nn.Module):
    """The classes come out of fc; aux is registered last but never called (a left-over layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_a_head_the_forward_never_calls_is_refused_before_training() -> None:
    from adapter_hub import LoRAConfig

    x = torch.randn(2, 3, 2, 2)
    for head in ("aux", "fc"):
        model = AdapterModel(_AuxLast())
        model.add_adapter("a", LoRAConfig(r=2, targets=["body.1"], heads=[head]),
                          head_modules={head: nn.Linear(8, 10)})  # fmt: skip
        model.activate("a")
        if head == "aux":  # the shape is right, but training it would change no output
            with pytest.raises(BackboneError, match="never calls aux"):
                backbones.check_head_output(model, x, head, 10)
        else:
            backbones.check_head_output(model, x, head, 10)


def test_a_model_with_auxiliary_outputs_in_training_is_one_line() -> None:
    from collections import namedtuple

    from adapter_hub import training
    from adapter_hub.errors import ConfigError

    Outputs = namedtuple("Outputs", ["logits", "aux_logits"])

    class Aux(nn.Module):  # as torchvision's GoogLeNet returns in training
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Outputs:
            return Outputs(self.fc(x), self.fc(x))

    with pytest.raises(ConfigError, match="returns a Outputs in training, not a tensor of logits.*aux_logits=False"):
        training.loss_sum(Aux(), (torch.randn(2, 4), torch.tensor([0, 1])))
