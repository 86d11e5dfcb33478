"""PEFT directory format, proven with the real ``peft`` package in both directions."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig
from adapter_hub.errors import AdapterFileError, MergeError
from adapter_hub.formats.peft import PeftCompatibilityWarning

peft = pytest.importorskip("peft", reason="the peft package is needed for the interop tests (dev extra)")


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    # torchvision zero-initialises the head: every output would be 0 and any comparison would pass
    nn.init.normal_(model.heads.head.weight, std=0.5)
    nn.init.normal_(model.heads.head.bias, std=0.5)
    return model


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.grouped(torch.relu(self.stem(x)))).mean(-1))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids)).mean(1)


def make(kind: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    if kind == "resnet18":
        return resnet(), torch.randn(2, 3, 32, 32, generator=g)
    if kind == "vit":
        return vit(), torch.randn(2, 3, 16, 16, generator=g)
    if kind == "conv1d":
        torch.manual_seed(0)
        return Conv1dNet().eval(), torch.randn(2, 4, 12, generator=g)
    torch.manual_seed(0)
    return TokenNet().eval(), torch.randint(0, 20, (2, 6), generator=g)


CASES = {
    # kind: (our config, the equivalent peft LoraConfig kwargs)
    "resnet18": (
        LoRAConfig(r=4, alpha=8, targets=["conv1", "layer*.conv*", "layer*.downsample.0", "fc"]),
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv1", "conv2", "downsample.0", "fc"]},
    ),
    "resnet18-head": (
        LoRAConfig(r=4, alpha=4, targets=["layer*.conv*"], heads=["fc"], use_rslora=True),
        {"r": 4, "lora_alpha": 4, "target_modules": ["conv1", "conv2"], "modules_to_save": ["fc"], "use_rslora": True},
    ),
    "vit": (
        # no head here: the dense stand-in for PEFT's attention forward (see _peft_truth) copies the backbone's
        # head; heads are covered by the resnet18-head case
        LoRAConfig(r=4, alpha=8, targets=["*.self_attention", "*.mlp.0", "*.mlp.3"]),
        {"r": 4, "lora_alpha": 8, "target_modules": ["self_attention", "mlp.0", "mlp.3"]},
    ),
    "conv1d": (
        LoRAConfig(
            r=4, alpha=4, targets=["stem", "grouped", "head"], rank_pattern={"head": 2}, alpha_pattern={"head": 6}
        ),
        {
            "r": 4,
            "lora_alpha": 4,
            "target_modules": ["stem", "grouped", "head"],
            "rank_pattern": {"head": 2},
            "alpha_pattern": {"head": 6},
        },
    ),  # fmt: skip
    "embedding": (
        LoRAConfig(r=3, alpha=6, targets=["emb", "proj"]),
        {"r": 3, "lora_alpha": 6, "target_modules": ["emb", "proj"]},
    ),
}


def randomize(params, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _moves_the_output(backbone: nn.Module, x: torch.Tensor, adapted: torch.Tensor) -> None:
    """The comparison means something: non-zero outputs that the adapter changes."""
    with torch.no_grad():
        bare = backbone(x)
    assert adapted.abs().max() > 1e-3 and (adapted - bare).abs().max() > 1e-4


def _peft_truth(peft_model: nn.Module, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the PEFT adapter means: PEFT's own forward, except with a MultiheadAttention LoRA. peft 0.21 adds its
    out_proj delta twice there (upstream PR #3774), so the truth is the dense W + ΔW, each ΔW taken from PEFT's
    own `get_delta_weight`, run through a plain copy of the backbone."""
    from peft.tuners.lora import layer as peft_layer

    if not any(isinstance(m, peft_layer.MultiheadAttention) for m in peft_model.modules()):
        return peft_model(x)
    dense, prefix = copy.deepcopy(backbone), "base_model.model."
    with torch.no_grad():
        for name, m in peft_model.named_modules():
            if not isinstance(m, peft_layer.LoraLayer) or not name.startswith(prefix):
                continue
            target = dense.get_submodule(name[len(prefix) :].replace(".base_layer", ""))
            if isinstance(m, peft_layer.MultiheadAttention):
                target.in_proj_weight += m.get_delta_weight("default")
            else:
                target.weight += m.get_delta_weight("default")
        # the known difference: once PEFT computes W + ΔW itself, this stand-in goes and PEFT is compared directly
        assert (peft_model(x) - dense(x)).abs().max() > 1e-3, "PEFT's attention LoRA is fixed: compare with it"
        return dense(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_peft_with_the_same_outputs(case: str, tmp_path: Path):
    kind = case.split("-")[0]
    bb, x = make(kind)
    ours_cfg, _ = CASES[case]
    model = AdapterModel(copy.deepcopy(bb))
    model.add_adapter("task", ours_cfg)
    randomize(model.adapters["task"].parameters())
    model.activate("task")
    expected = model(x)
    _moves_the_output(bb, x, expected)
    # an attention adapter says that PEFT computes it differently (see _peft_truth)
    warns = pytest.warns(PeftCompatibilityWarning) if kind == "vit" else contextlib.nullcontext()
    with warns:
        model.export_peft("task", tmp_path, base_model_name_or_path=kind)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == ours_cfg.r and config["lora_alpha"] == ours_cfg.alpha
    with safetensors.safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(bb), tmp_path).eval()
    torch.testing.assert_close(_peft_truth(peft_model, bb, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_imports_with_the_same_outputs(case: str, tmp_path: Path):
    kind = case.split("-")[0]
    bb, x = make(kind)
    _, peft_kwargs = CASES[case]
    peft_model = peft.get_peft_model(copy.deepcopy(bb), peft.LoraConfig(**peft_kwargs))
    randomize(p for n, p in peft_model.named_parameters() if "lora_" in n or "modules_to_save" in n)
    peft_model.eval()
    expected = _peft_truth(peft_model, bb, x)
    _moves_the_output(bb, x, expected)
    peft_model.save_pretrained(tmp_path)

    model = AdapterModel(copy.deepcopy(bb))
    model.import_peft(tmp_path, "task")
    model.activate("task")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.adapters["task"].metadata["imported_from"]["format"] == "peft"


def test_grouped_conv_exports_as_block_diagonal_full_a(tmp_path: Path):
    bb, x = make("conv1d")
    model = AdapterModel(copy.deepcopy(bb))
    model.add_adapter("task", LoRAConfig(r=4, alpha=4, targets=["grouped"]))
    randomize(model.adapters["task"].parameters())
    model.activate("task")
    ours_a = dict(model.adapters["task"].layer_items())["grouped"].lora_A.weight.detach()
    assert ours_a.shape == (4, 4, 3)  # grouped: (rank, in/groups, k)
    model.export_peft("task", tmp_path)
    full = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")["base_model.model.grouped.lora_A.weight"]
    assert full.shape == (4, 8, 3)
    assert torch.equal(full[:2, :4], ours_a[:2]) and torch.equal(full[2:, 4:], ours_a[2:])
    assert not full[:2, 4:].any() and not full[2:, :4].any()
    # and it comes back grouped, hence mergeable
    back = AdapterModel(copy.deepcopy(bb))
    back.import_peft(tmp_path, "task")
    back.activate("task")
    torch.testing.assert_close(back(x), model(x))
    unmerged = back(x)
    back.merge("task")
    torch.testing.assert_close(back(x), unmerged, rtol=1e-5, atol=1e-5)


def test_peft_grouped_adapter_crossing_groups_runs_but_refuses_to_merge(tmp_path: Path):
    bb, x = make("conv1d")
    peft_model = peft.get_peft_model(copy.deepcopy(bb), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["grouped"]))
    randomize(p for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.eval()
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(copy.deepcopy(bb))
    model.import_peft(tmp_path, "task")
    model.activate("task")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="mixes input channels across the base conv's 2 groups"):
        model.merge("task")


def test_named_peft_adapter_in_its_subfolder(tmp_path: Path):
    bb, x = make("embedding")
    peft_model = peft.get_peft_model(
        copy.deepcopy(bb), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), adapter_name="other"
    )
    randomize(p for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.eval()
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(copy.deepcopy(bb))
    model.import_peft(tmp_path, "task", adapter_name="other")
    model.activate("task")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_peft_directories(tmp_path: Path):
    model = AdapterModel(make("embedding")[0])
    with pytest.raises(AdapterFileError, match="not a PEFT adapter directory"):
        model.import_peft(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError, match="only LORA"):
        model.import_peft(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    safetensors.torch.save_file(
        {"base_model.model.nothere.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "adapter_model.safetensors"
    )
    with pytest.raises(Exception, match="no module 'nothere'"):
        model.import_peft(tmp_path, "x")
    assert len(model.adapters) == 0
