"""DoRA (weight-decomposed LoRA, ``use_dora=True``) against an independent dense reference: the base layer run
with W' = m·(W + ΔW)/‖W + ΔW‖ per output channel, ΔW and the norm folded here by hand from the layer's A, B
and magnitude (never with the layer's own delta_weight or weight_norm). Also merge/unmerge, a Switch against
each sample alone, training gradients (the norm detached, as in the DoRA paper), the refusals of Stack and
combine, and the adapter file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Stack, Switch
from adapter_hub.errors import CombineError, ConfigError, MergeError
from adapter_hub.formats import adapter_file
from adapter_hub.lora import LoRAConfigError, LoRAConv2d, LoRALinear, LoRAMultiheadAttention, lora_class_for

# references compare to 1e-12: every test here runs in float64
pytestmark = pytest.mark.usefixtures("_float64")


def randomize(module: nn.Module, seed: int) -> None:
    """Every LoRA tensor N(0, 0.3²) — B non-zero — and the magnitude away from ‖W‖ (so it really scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(p * (1 + 0.5 * noise.abs()) if name.endswith("lora_magnitude_vector") else noise * 0.3)


def hand_delta(layer: nn.Module, weight_shape: torch.Size, transposed: bool = False) -> torch.Tensor:
    """ΔW = s·B·A in the base weight's layout; a grouped conv block by block (group j: B rows j, A rows j)."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if a.dim() == 2:
        delta = layer.scaling * torch.einsum("ok,ki->oi", b, a)
        return delta.t() if transposed else delta
    g = layer.groups
    out, rg = b.shape[0], b.shape[1]
    blocks = [
        torch.einsum("ok,ki->oi", b[j * out // g : (j + 1) * out // g].flatten(1), a[j * rg : (j + 1) * rg].flatten(1))
        for j in range(g)
    ]
    return layer.scaling * torch.cat(blocks).reshape(weight_shape)


def hand_fold(weight: torch.Tensor, layer: nn.Module, transposed: bool = False) -> torch.Tensor:
    """m·(W + ΔW)/‖W + ΔW‖, the norm of each output channel's weights (a column for a transposed layer)."""
    full = weight + hand_delta(layer, weight.shape, transposed)
    rows = full.t() if transposed else full.reshape(full.shape[0], -1)
    norm = torch.sqrt((rows * rows).sum(1))
    folded = rows * (layer.lora_magnitude_vector / norm)[:, None]
    return folded.t() if transposed else folded.reshape(weight.shape)


def base_with(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "linear-no-bias": (lambda: nn.Linear(7, 5, bias=False), (3, 4, 7)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    "conv2d-circular-dilated": (
        lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2, padding_mode="circular"),
        (2, 3, 7, 7),
    ),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding="same", groups=2), (2, 4, 6, 6)),
    "conv2d-depthwise-reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, bias=False), (2, 2, 4, 4, 4)),
}


def one_layer(kind: str, n_adapters: int = 1, use_dora: bool = True) -> tuple[AdapterModel, torch.Tensor]:
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    module = make()
    model = AdapterModel(nn.Sequential(module))
    for i in range(n_adapters):
        model.add_adapter(f"d{i}", LoRAConfig(r=3, alpha=5, targets=["0"], use_dora=use_dora))
        randomize(model.adapters[f"d{i}"], seed=10 + i)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_forward_and_merge_equal_the_dense_fold_and_unmerge_is_bit_exact(kind: str):
    model, x = one_layer(kind)
    module = model.backbone[0]
    layer = model.adapters["d0"].layers["0"]
    assert layer.use_dora and layer.lora_magnitude_vector.shape == (module.weight.shape[0],)
    original = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        folded = hand_fold(module.weight, layer)
        want = base_with(module, folded, x)
    bare = model(x)
    model.activate("d0")
    got = model(x)
    assert (want - bare).abs().max() > 0.1  # the adapter really moves the output
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    model.merge("d0")
    torch.testing.assert_close(module.weight, folded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    model.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in model.backbone.state_dict().items())
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)  # live again after unmerge


def test_transposed_linear_normalises_the_columns_of_its_stored_weight():
    transformers = pytest.importorskip("transformers")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = transformers.pytorch_utils.Conv1D(6, 4)  # weight (in 4, out 6)
            nn.init.normal_(self.c_fc.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_fc(x)

    torch.manual_seed(0)
    model = AdapterModel(Block())
    model.add_adapter("d", LoRAConfig(r=2, alpha=3, targets=["c_fc"], use_dora=True))
    randomize(model.adapters["d"], seed=3)
    conv1d, layer = model.backbone.c_fc, model.adapters["d"].layers["c_fc"]
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        folded = hand_fold(conv1d.weight, layer, transposed=True)
    model.activate("d")
    torch.testing.assert_close(model(x), x @ folded + conv1d.bias, rtol=1e-12, atol=1e-12)
    original = conv1d.weight.clone()
    model.merge("d")
    torch.testing.assert_close(conv1d.weight, folded, rtol=1e-12, atol=1e-12)
    model.unmerge()
    assert torch.equal(conv1d.weight, original)


def test_a_new_dora_adapter_changes_nothing():
    model, x = one_layer("conv2d-grouped", n_adapters=0)
    model.add_adapter("d", LoRAConfig(r=2, targets=["0"], use_dora=True))
    layer = model.adapters["d"].layers["0"]
    w = model.backbone[0].weight
    torch.testing.assert_close(layer.lora_magnitude_vector, w.flatten(1).norm(dim=1), rtol=0, atol=0)
    bare = model(x)
    model.activate("d")
    assert torch.equal(model(x), bare)


class Net(nn.Module):
    """conv → relu → pool → linear → relu → linear: DoRA on a conv and two linears, a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


TARGETS = ["conv", "fc1", "fc2"]


def net_model(*adapters: tuple[str, bool]) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(Net())
    for i, (name, dora) in enumerate(adapters):
        model.add_adapter(name, LoRAConfig(r=3, alpha=6, targets=TARGETS, use_dora=dora))
        randomize(model.adapters[name], seed=20 + i)
    return model


def dense_net(model: AdapterModel, name: str, x: torch.Tensor) -> torch.Tensor:
    """The net run by hand with every DoRA layer's folded weight: W' = (m/‖W + ΔW‖.detach())·(W + ΔW)."""
    net, layers = model.backbone, dict(model.adapters[name].layer_items())

    def weight(path: str) -> torch.Tensor:
        w, layer = net.get_submodule(path).weight, layers[path]
        full = w + hand_delta(layer, w.shape)
        norm = full.flatten(1).norm(dim=1).detach()  # the detached norm: m and ΔW get gradients elsewhere only
        return full * (layer.lora_magnitude_vector / norm).view(-1, *[1] * (w.dim() - 1))

    h = F.conv2d(x, weight("conv"), net.conv.bias, padding=1)
    h = F.adaptive_avg_pool2d(torch.relu(h), 2).flatten(1)
    h = torch.relu(F.linear(h, weight("fc1"), net.fc1.bias))
    return F.linear(h, weight("fc2"), net.fc2.bias)


X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def test_training_gradients_equal_the_dense_reference_with_the_detached_norm():
    model = net_model(("d", True), ("p", False))
    model.train()
    model.activate("p")
    plain_before = model(X).detach()
    state_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.activate("d")
    params = dict(model.adapters["d"].named_parameters())
    assert sum(k.endswith("lora_magnitude_vector") for k in params) == 3
    assert all(p.requires_grad for p in params.values())  # the magnitude trains with A and B
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    ours = torch.autograd.grad((model(X) * target).sum(), list(params.values()))
    ref = torch.autograd.grad((dense_net(model, "d", X) * target).sum(), list(params.values()))
    for (key, _), g, r in zip(params.items(), ours, ref):
        assert r.abs().max() > 0, key
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=key)

    optim = torch.optim.SGD(model.adapters["d"].parameters(), lr=0.05)
    for _ in range(3):
        optim.zero_grad()
        (model(X) * target).sum().backward()
        optim.step()
    assert all(torch.equal(v, state_before[k]) for k, v in model.backbone.state_dict().items())
    model.activate("p")
    assert torch.equal(model(X), plain_before)  # the other adapter did not move
    model.activate("d")
    torch.testing.assert_close(model(X), dense_net(model, "d", X), rtol=1e-12, atol=1e-12)


def test_switch_gives_each_sample_its_adapter_alone_also_for_gradients():
    model = net_model(("d", True), ("e", True), ("p", False))
    route = ["e", "d", None, "p", "d", "e"]
    model.train()
    alone = {}
    for name in ("d", "e", "p", None):
        rows = [i for i, n in enumerate(route) if n == name]
        model.activate(name)
        alone[name] = (rows, model(X[rows]))
    model.activate(Switch("d", "e", "p"))
    out = model(X, route=route)
    for name, (_, want) in alone.items():
        torch.testing.assert_close(out.by_adapter[name], want, rtol=1e-12, atol=1e-12)
    plain_only = model(X[[3, 2]], route=["p", None])  # the DoRA adapters idle: the plain fused path runs
    torch.testing.assert_close(plain_only.by_adapter["p"], alone["p"][1], rtol=1e-12, atol=1e-12)
    # one backward over the mixed batch: each DoRA adapter's gradient is that of its own rows alone
    out.padded.pow(2).sum().backward()
    mixed = {k: p.grad.clone() for k, p in model.adapters["d"].named_parameters()}
    model.zero_grad()
    model.activate("d")
    model(X[alone["d"][0]]).pow(2).sum().backward()
    for k, p in model.adapters["d"].named_parameters():
        torch.testing.assert_close(mixed[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


def test_stack_and_combine_with_a_dora_adapter_are_refused_nothing_changes():
    model = net_model(("d", True), ("p", False))
    model.activate("p")
    with pytest.raises(ConfigError, match="'d' is DoRA at conv together with 'p'.*does not sum"):
        model.activate(Stack("d", "p"))
    with pytest.raises(ConfigError, match="with weight 0.5"):
        model.activate(Stack("d", weights=[0.5]))
    assert model.active == "p"
    weights = [p.clone() for p in model.backbone.parameters()]
    with pytest.raises(MergeError, match="DoRA"):
        model.merge(Stack("p", "d"))
    assert model.merged is None and all(torch.equal(a, b) for a, b in zip(weights, model.backbone.parameters()))
    with pytest.raises(CombineError, match="'d'.*DoRA adapter"):
        model.combine("c", ["p", "d"])
    assert set(model.adapters) == {"d", "p"}
    model.activate(Stack("d"))  # alone with weight 1 it is the adapter itself
    torch.testing.assert_close(model(X), dense_net(model, "d", X), rtol=1e-12, atol=1e-12)


def test_stack_of_dora_and_lora_on_different_layers_is_exact():
    torch.manual_seed(0)
    model = AdapterModel(Net())
    model.add_adapter("d", LoRAConfig(r=2, targets=["conv", "fc2"], use_dora=True))
    model.add_adapter("p", LoRAConfig(r=2, targets=["fc1"]))
    randomize(model.adapters["d"], 1)
    randomize(model.adapters["p"], 2)
    model.activate(Stack("d", "p"))
    got = model(X)
    model.merge(Stack("d", "p"))
    torch.testing.assert_close(model(X), got, rtol=1e-12, atol=1e-12)


def test_dora_where_it_has_no_meaning_is_refused():
    torch.manual_seed(0)
    tokens = AdapterModel(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    with pytest.raises(LoRAConfigError, match="not for Embedding"):
        tokens.add_adapter("d", LoRAConfig(targets=["0", "1"], use_dora=True))
    assert len(tokens.adapters) == 0
    with pytest.raises(LoRAConfigError, match="not for MultiheadAttention"):
        LoRAMultiheadAttention.from_spec(nn.MultiheadAttention(4, 2), {"r": 2, "alpha": 2}, use_dora=True)
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(LoRAConfigError, match="DoRA needs ΔW as a weight.*mixes input channels"):
        LoRAConv2d.from_spec(grouped, {"r": 2, "alpha": 2, "rank": 2, "a_groups": 1}, use_dora=True)
    with pytest.raises(LoRAConfigError, match="use_dora must be true or false"):
        LoRAConfig(use_dora="yes")  # type: ignore[arg-type]
    layer = lora_class_for(nn.Linear(3, 2)).from_spec(nn.Linear(3, 2), {"r": 1, "alpha": 1}, use_dora=True)
    assert isinstance(layer, LoRALinear) and "lora_magnitude_vector" in layer.state_dict()


def test_adapter_file_keeps_the_magnitude_and_an_older_reader_refuses_it(tmp_path: Path, monkeypatch):
    model = net_model(("d", True), ("p", False))
    model.activate("d")
    want = model(X)
    model.save_adapter("d", tmp_path / "d.safetensors")
    model.save_adapter("p", tmp_path / "p.safetensors")
    with safetensors.safe_open(tmp_path / "d.safetensors", "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor("conv.lora_magnitude_vector").shape == (6,)
    assert meta["adapter_hub.format_version"] == "2" and json.loads(meta["adapter_hub.config"])["use_dora"] is True
    assert {f"{p}.lora_magnitude_vector" for p in TARGETS} <= keys
    with safetensors.safe_open(tmp_path / "p.safetensors", "pt") as f:
        plain = f.metadata()
    # a plain adapter is written as before: version 1, no use_dora in its config
    assert plain["adapter_hub.format_version"] == "1" and "use_dora" not in json.loads(plain["adapter_hub.config"])

    other = net_model()
    other.load_adapter("d", tmp_path / "d.safetensors")
    other.activate("d")
    assert torch.equal(other(X), want)
    monkeypatch.setattr(adapter_file, "FORMAT_VERSION", 1)  # a reader from before DoRA
    with pytest.raises(adapter_file.AdapterFileError, match="format 2 is newer"):
        net_model().load_adapter("d", tmp_path / "d.safetensors")
    net_model().load_adapter("p", tmp_path / "p.safetensors")
