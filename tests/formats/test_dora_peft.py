"""DoRA (``use_dora=True``) to and from PEFT, proven with the real ``peft`` package in both directions: outputs on
non-zero adapters against PEFT *and* against an independent dense reference — the backbone run with
W' = m·(W + s·B·A)/‖W + s·B·A‖ per output channel, folded by hand from the directory's own tensors — so that a PEFT
bug is told apart from ours. Also merge against PEFT's merge, training gradients and dropout against PEFT's, and
the layers where DoRA is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig
from adapter_hub.errors import AdapterFileError, ConfigError

peft = pytest.importorskip("peft", reason="the peft package is needed for the interop tests (dev extra)")
transformers = pytest.importorskip("transformers")

# float64 throughout: PEFT and adapter-hub are compared to 1e-10, not to float32's noise
pytestmark = pytest.mark.usefixtures("_float64")


class Net(nn.Module):
    """Conv2d → Conv1d over the rows → Linear, and a GPT-2-style transformers Conv1D (weight stored (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.seq = nn.Conv1d(6, 5, 3, stride=2)
        self.c_fc = transformers.pytorch_utils.Conv1D(7, 5)
        nn.init.normal_(self.c_fc.bias)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(-1)  # (n, 6, H)
        h = torch.relu(self.seq(h)).transpose(1, 2).contiguous()  # (n, L, 5); Conv1D views its input
        return self.fc(torch.tanh(self.c_fc(h))).mean(1)


TARGETS = ["conv", "seq", "c_fc", "fc"]
R, ALPHA = 3, 5.0


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(4, 3, 8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def randomize(named, seed: int) -> None:
    """B non-zero and the magnitude moved away from ‖W‖, so every part of DoRA shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(p * (1 + 0.5 * noise.abs()) if "lora_magnitude_vector" in name else noise * 0.3)


def dense_from_directory(bb: nn.Module, directory: Path) -> nn.Module:
    """The backbone with each adapted weight folded by hand from the directory's tensors and config."""
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    scaling = config["lora_alpha"] / config["r"]
    dense = copy.deepcopy(bb)
    with torch.no_grad():
        for path in TARGETS:
            key = f"base_model.model.{path}"
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            m = tensors[f"{key}.lora_magnitude_vector"].flatten()
            module = dense.get_submodule(path)
            transposed = isinstance(module, transformers.pytorch_utils.Conv1D)
            w = module.weight.t() if transposed else module.weight.flatten(1)  # (out, fan_in)
            full = w + scaling * (b.flatten(1) @ a.flatten(1))
            folded = full * (m / torch.sqrt((full * full).sum(1)))[:, None]
            module.weight.copy_(folded.t() if transposed else folded.reshape(module.weight.shape))
    return dense


def ours(seed: int = 3, dropout: float = 0.0) -> AdapterModel:
    model = AdapterModel(backbone())
    model.add_adapter("d", LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS, use_dora=True, dropout=dropout))
    randomize(model.adapters["d"].named_parameters(), seed)
    model.activate("d")
    return model


def peft_made(dropout: float = 0.0) -> nn.Module:
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True, lora_dropout=dropout, fan_in_fan_out=True
    )
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets it per layer type, as the export relies on
        model = peft.get_peft_model(backbone(), config)
    randomize(((n, p) for n, p in model.named_parameters() if "lora_" in n), seed=4)
    return model


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True")  # PEFT's per-layer-type note on loading
def test_export_loads_in_peft_with_the_same_outputs_and_merge(tmp_path: Path):
    model = ours()
    want = model(X)
    with torch.no_grad():
        bare = backbone()(X)
    assert (want - bare).abs().max() > 0.05
    model.export_peft("d", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert config["use_dora"] is True
    assert saved["base_model.model.conv.lora_magnitude_vector"].shape == (1, 6, 1, 1)  # PEFT's shapes
    assert saved["base_model.model.seq.lora_magnitude_vector"].shape == (1, 5, 1)
    assert saved["base_model.model.c_fc.lora_magnitude_vector"].shape == (7,)

    dense = dense_from_directory(backbone(), tmp_path)
    torch.testing.assert_close(want, dense(X), rtol=1e-12, atol=1e-12)
    peft_model = peft.PeftModel.from_pretrained(backbone(), tmp_path).eval()
    torch.testing.assert_close(peft_model(X), want, rtol=1e-12, atol=1e-12)

    # merge: our folded weights against PEFT's merge_and_unload, and ours restored bit for bit
    original = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.merge("d")
    merged = peft_model.merge_and_unload()
    for key, w in merged.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], w, rtol=1e-12, atol=1e-12, msg=key)
    model.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in model.backbone.state_dict().items())


def test_peft_dora_adapter_imports_with_the_same_outputs(tmp_path: Path):
    peft_model = peft_made().eval()
    want = peft_model(X)
    peft_model.save_pretrained(tmp_path)
    dense = dense_from_directory(backbone(), tmp_path)
    torch.testing.assert_close(want, dense(X), rtol=1e-12, atol=1e-12)

    model = AdapterModel(backbone())
    model.import_peft(tmp_path, "d")
    model.activate("d")
    assert model.adapters["d"].config.use_dora
    torch.testing.assert_close(model(X), want, rtol=1e-12, atol=1e-12)
    # and back out: the same tensors, in PEFT's shapes
    model.export_peft("d", tmp_path / "again")
    first = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    again = safetensors.torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


# our parameter name in a LoRA layer → PEFT's, for the adapter "default"
PEFT_PARAM = {
    "lora_A.weight": "lora_A.default.weight",
    "lora_B.weight": "lora_B.default.weight",
    "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
}


def test_training_gradients_and_dropout_equal_peft(tmp_path: Path):
    """In training mode, with dropout on each delta's input: the same outputs as PEFT under the same random state
    (PEFT's DoRA recomputes W·dropout(x) for the magnitude term) and the same gradients of A, B and m."""
    peft_model = peft_made(dropout=0.3)
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(backbone())
    model.import_peft(tmp_path, "d")
    model.activate("d")
    model.train()
    peft_model.train()
    target = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(11)
    ours_out = model(X)
    torch.manual_seed(11)
    peft_out = peft_model(X)
    torch.testing.assert_close(ours_out, peft_out, rtol=1e-12, atol=1e-12)
    torch.manual_seed(11)
    assert (model(X) - model(X)).abs().max() > 1e-3  # the dropout is really there
    (ours_out * target).sum().backward()
    (peft_out * target).sum().backward()
    peft_params = dict(peft_model.named_parameters())
    for name, p in model.adapters["d"].named_parameters():
        path, _, part = name.removeprefix("layers.").partition(".")
        path = path.replace("/", ".")
        key = f"base_model.model.{path}.{PEFT_PARAM[part]}"
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad.reshape(peft_params[key].grad.shape), peft_params[key].grad, msg=name,
                                   rtol=1e-10, atol=1e-12)  # fmt: skip


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, groups=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.emb(ids).transpose(1, 2))


@pytest.mark.parametrize("target", ["emb", "conv"])
def test_dora_where_peft_computes_something_else_is_refused_both_ways(target: str, tmp_path: Path):
    torch.manual_seed(0)
    bb = Grouped()
    peft_model = peft.get_peft_model(copy.deepcopy(bb), peft.LoraConfig(r=2, target_modules=[target], use_dora=True))
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(copy.deepcopy(bb))
    why = "a Embedding: DoRA imports for Linear" if target == "emb" else "grouped conv conv is not imported: PEFT's"
    with pytest.raises(AdapterFileError, match=why):
        model.import_peft(tmp_path, "d")
    assert len(model.adapters) == 0
    if target == "conv":  # ours is exact (grouped A: ΔW is a grouped weight), but PEFT would run another maths
        model.add_adapter("d", LoRAConfig(r=2, targets=["conv"], use_dora=True))
        with pytest.raises(ConfigError, match="cannot export the DoRA layer conv to PEFT: PEFT's DoRA on a grouped"):
            model.export_peft("d", tmp_path / "out")


def test_magnitude_without_use_dora_is_refused_as_dora(tmp_path: Path):
    peft_model = peft_made().eval()
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector belongs to PEFT's DoRA"):
        AdapterModel(backbone()).import_peft(tmp_path, "d")
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.fc.lora_magnitude_vector"]
    safetensors.torch.save_file(tensors, tmp_path / "adapter_model.safetensors")
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="missing key base_model.model.fc.lora_magnitude_vector"):
        AdapterModel(backbone()).import_peft(tmp_path, "d")


def test_dense_reference_is_not_plain_lora(tmp_path: Path):
    """The reference really differs from W + ΔW (the magnitude and the norm matter)."""
    model = ours()
    model.export_peft("d", tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    plain = backbone()
    with torch.no_grad():
        module = plain.fc
        a, b = tensors["base_model.model.fc.lora_A.weight"], tensors["base_model.model.fc.lora_B.weight"]
        module.weight += ALPHA / R * b @ a
        dense_fc = dense_from_directory(backbone(), tmp_path).fc
    h = torch.randn(2, 7, dtype=torch.float64)
    assert (F.linear(h, module.weight, module.bias) - dense_fc(h)).abs().max() > 0.05
