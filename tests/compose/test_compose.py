"""Stack, Switch, merge and combine against independent references: dense W + Σwᵢ·ΔWᵢ computed here
from the saved factors, a per-sample loop, and gradients of separate per-adapter passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Stack, Switch
from adapter_hub.compose import RoutedOutput
from adapter_hub.errors import AdapterHubError, AdapterNotFound, CombineError, ConfigError, MergeError


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(16, 4, 2, 2, 16, 32, num_classes=5).eval()


TARGETS = ["conv1", "layer*.conv*", "layer*.downsample.0", "fc"]
G = torch.Generator().manual_seed(11)
X = torch.randn(6, 3, 32, 32, generator=G)
XV = torch.randn(6, 3, 16, 16, generator=G)


def add(model: AdapterModel, name: str, cfg: LoRAConfig, seed: int, head: nn.Module | None = None) -> None:
    heads = {cfg.heads[0]: head} if head is not None else None
    model.add_adapter(name, cfg, head_modules=heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)


def dense_delta(layer, param: str = "weight") -> torch.Tensor:
    """ΔW from the layer's A and B tensors, written out here (groups = 1)."""
    if param == "in_proj_weight":
        return layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    if param == "out_proj.weight":
        return dense_delta(layer.out_proj)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    w = layer.scaling * b.flatten(1) @ a.flatten(1)
    return w.reshape(b.shape[0], *a.shape[1:])


def reference_backbone(model: AdapterModel, weighted: list[tuple[str, float]]) -> nn.Module:
    """A plain copy of the backbone whose weights are W + Σ wᵢ·ΔWᵢ."""
    ref = copy.deepcopy(model.backbone)
    for m in ref.modules():
        m.__dict__.pop("forward", None)
    with torch.no_grad():
        for name, w in weighted:
            for path, layer in model.adapters[name].layer_items():
                params = ["in_proj_weight", "out_proj.weight"] if hasattr(layer, "in_delta") else ["weight"]
                for param in params:
                    ref.get_submodule(path).get_parameter(param).add_(w * dense_delta(layer, param))
    return ref


@pytest.mark.parametrize("kind", ["resnet18", "vit"])
def test_stack_equals_dense_sum_with_negative_weights(kind):
    bb, x = (resnet(), X) if kind == "resnet18" else (vit(), XV)
    targets = TARGETS if kind == "resnet18" else ["*.self_attention", "*.mlp.0", "*.mlp.3", "conv_proj"]
    model = AdapterModel(bb)
    add(model, "a", LoRAConfig(r=4, targets=targets, norm_layers="frozen"), 1)
    add(model, "b", LoRAConfig(r=2, alpha=6, targets=targets[:2], norm_layers="frozen"), 2)
    weighted = [("a", 1.0), ("b", -0.5)]
    model.activate(Stack("a", "b", weights=[1.0, -0.5]))
    got = model(x)
    torch.testing.assert_close(got, reference_backbone(model, weighted)(x), rtol=1e-4, atol=1e-4)
    original = copy.deepcopy(bb.state_dict())
    model.merge(Stack("a", "b", weights=[1.0, -0.5]))
    torch.testing.assert_close(model(x), got, rtol=1e-4, atol=1e-4)
    model.unmerge()
    assert all(torch.equal(original[k], v) for k, v in bb.state_dict().items())
    torch.testing.assert_close(model(x), got, rtol=0, atol=0)


def test_stack_uses_the_named_head():
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"])
    add(model, "a", cfg, 1)
    add(model, "b", cfg, 2)
    model.activate(Stack("a", "b", head="b"))
    with_b = model(X)
    model.activate(Stack("a", "b", head=""))
    bare_head = model(X)
    model.activate(Stack("a", "b"))  # default: the first adapter that has a head
    with_a = model(X)
    assert not torch.allclose(with_a, with_b) and not torch.allclose(with_b, bare_head)
    with pytest.raises(AdapterNotFound, match="no adapter named 'c'"):
        model.activate(Stack("a", "b", head="c"))
    model.add_adapter("c", LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"]))
    model.activate(Stack("a", head="c"))  # another adapter may lend its head
    model.activate("a")
    deltas_a = model(X)
    model.activate(Stack("a", head="c"))
    assert not torch.allclose(model(X), deltas_a)


def test_switching_is_a_pointer_change():
    model = AdapterModel(resnet())
    add(model, "a", LoRAConfig(r=2, targets=["layer1.*.conv*"]), 1)
    add(model, "b", LoRAConfig(r=2, targets=["layer1.*.conv*"]), 2)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.backbone.state_dict().items()}
    for name in ["a", "b", "a"]:
        model.activate(name)
        model(X[:1])
    after = model.backbone.state_dict()
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], v) for k, (ptr, v) in before.items())


# --- switch ----------------------------------------------------------------------------------------


def switch_model() -> AdapterModel:
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=4, targets=["conv1", "layer*.conv*"], heads=["fc"])
    add(model, "digits", cfg, 1)
    add(model, "parity", cfg, 2, head=nn.Linear(512, 2))
    add(model, "rotated", cfg, 3)
    return model


def test_switch_per_sample_equals_one_sample_at_a_time():
    model = switch_model()
    route = ["parity", "digits", None, "rotated", "parity", "digits"]
    model.activate(Switch("digits", "parity", "rotated"))
    out = model(X, route=route)
    assert isinstance(out, RoutedOutput) and len(out) == 6
    for i, name in enumerate(route):
        if name is None:
            with model.disable_adapters():
                alone = model(X[i : i + 1])[0]
        else:
            model.activate(name)
            alone = model(X[i : i + 1])[0]
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-5)
        assert out[i].shape == ((2,) if name == "parity" else (10,))
    assert out.widths == {"digits": 10, "parity": 2, "rotated": 10, None: 10}
    assert torch.equal(out.rows["parity"], torch.tensor([0, 4]))
    torch.testing.assert_close(out.by_adapter["parity"], torch.stack([out[0], out[4]]))
    assert out.padded.shape == (6, 10) and torch.equal(out.padded[0, 2:], torch.zeros(8))
    with pytest.raises(ConfigError, match="differ in width"):
        out.stack()


class InPlaceHead(nn.Module):
    """A conv, then a classifier that starts with an in-place dropout, as torchvision's EfficientNet's does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_switch_batch_of_one_task_trains_a_head_that_changes_its_input_in_place():
    """A per-sample Switch whose batch holds one task's rows hands the head the batch itself (the views of a split
    may not be changed in place): the step equals the same adapter active alone, outputs and gradients."""
    torch.manual_seed(0)
    model = AdapterModel(InPlaceHead()).train()
    for i, name in enumerate(("a", "b")):
        add(model, name, LoRAConfig(r=2, targets=["conv"], heads=["classifier"]), i + 1)
    x = torch.randn(8, 3, 8, 8)
    found = {}
    for spec in (Switch("a", "b"), "a"):
        model.activate(spec)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout mask on both sides
        out = model(x, route=["a"] * 8) if isinstance(spec, Switch) else model(x)
        y = out.by_adapter["a"] if isinstance(spec, Switch) else out
        (y * torch.arange(5.0)).sum().backward()
        found[str(spec)] = (y.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (y_switch, g_switch), (y_alone, g_alone) = found.values()
    assert y_alone.abs().max() > 0 and torch.equal(y_switch, y_alone)
    assert g_switch.keys() == g_alone.keys() and len(g_alone) >= 4
    for key, grad in g_alone.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(g_switch[key], grad, rtol=1e-6, atol=1e-7)


class SmallMaps(nn.Module):
    """Convs on 2×2 maps with more channels than positions: a Switch runs each A apart (no fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 64, 3, padding=1)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


@pytest.mark.parametrize("grad", [False, True])
def test_a_switch_runs_under_cpu_autocast(grad: bool):
    """Under bfloat16 autocast A⋆x comes out in bfloat16 and B joins it there: a per-sample Switch (also with
    grad enabled and frozen adapters) gives each sample's float32 output to bfloat16 precision."""
    torch.manual_seed(0)
    model = AdapterModel(SmallMaps()).eval()
    for i, name in enumerate(("a", "b")):
        add(model, name, LoRAConfig(r=4, alpha=4.0 * (i + 1), targets=["c1"]), i + 1)
    with torch.no_grad():  # deltas as large as the layer's own output, so that the comparison sees them
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(key)))
    x = torch.randn(6, 16, 2, 2)
    route = ["a", "b", None, "a", "b", "b"]
    model.activate(Switch("a", "b"))
    want = model(x, route=route).padded
    if grad:
        for p in model.parameters():
            p.requires_grad_(False)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, route=route).padded
    assert got.dtype == torch.bfloat16 and want.abs().max() > 0
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    with model.disable_adapters():  # the deltas are a visible part of what was compared
        bare = model(x)
    assert (want[[0, 1, 3, 4, 5]] - bare[[0, 1, 3, 4, 5]]).abs().max() > 0.3 * want.abs().max()


def test_switch_on_vision_transformer_attention():
    model = AdapterModel(vit())
    cfg = LoRAConfig(r=4, targets=["*.self_attention", "*.mlp.0"], heads=["heads.head"])
    add(model, "a", cfg, 1)
    add(model, "b", cfg, 2, head=nn.Linear(16, 3))
    route = ["b", "a", "a", "b", None, "b"]
    model.activate(Switch("a", "b"))
    out = model(XV, route=route)
    for i, name in enumerate(route):
        model.activate(name)
        alone = model(XV[i : i + 1])[0]
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-5)
        model.activate(Switch("a", "b"))


def test_switch_training_step_updates_each_adapter_from_its_own_samples():
    model = switch_model()
    model.train()
    route = ["parity", "digits", "digits", "parity", "digits", "parity"]
    labels = {"digits": torch.tensor([3, 7, 1]), "parity": torch.tensor([1, 0, 1])}
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model.activate(Switch("digits", "parity", "rotated"))
    for p in model.adapters.parameters():
        p.requires_grad_(True)
    out = model(X, route=route)
    loss = sum(loss_fn(out.by_adapter[n], labels[n]) for n in ("digits", "parity"))
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.adapters.named_parameters() if p.grad is not None}
    assert not any(n.startswith("rotated.") for n in mixed), "an adapter with no samples gets no gradient"
    model.zero_grad(set_to_none=True)

    # reference: each adapter alone on its own samples, in a separate pass
    for name in ("digits", "parity"):
        rows = [i for i, r in enumerate(route) if r == name]
        model.activate(name)
        loss_fn(model(X[rows]), labels[name]).backward()
    separate = {n: p.grad for n, p in model.adapters.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys()
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-4, atol=1e-5)


def test_bad_routes_fail_before_any_compute():
    model = switch_model()
    calls = []
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    model.activate(Switch("digits", "parity"))
    with pytest.raises(ConfigError, match=r"route has 2 entries for a batch of 6"):
        model(X, route=["digits", "parity"])
    with pytest.raises(ConfigError, match=r"\['rotated'\] which are not in the active Switch"):
        model(X, route=["digits"] * 5 + ["rotated"])
    with pytest.raises(ConfigError, match="pass route="):
        model(X)
    model.activate("digits")
    with pytest.raises(ConfigError, match="needs an active Switch"):
        model(X, route=["digits"] * 6)
    assert not calls


# --- combine ---------------------------------------------------------------------------------------


def combine_model() -> AdapterModel:
    model = AdapterModel(resnet())
    # the deltas are the subject here: the backbone's norms run for every adapter (tests/compose/test_norms.py)
    add(model, "a", LoRAConfig(r=4, targets=["layer3.*.conv*", "fc"], norm_layers="frozen"), 1)
    add(model, "b", LoRAConfig(r=2, alpha=4, targets=["layer3.*.conv*", "layer4.0.conv1"], norm_layers="frozen"), 2)
    add(model, "c", LoRAConfig(r=3, targets=["layer3.*.conv*"], use_rslora=True, norm_layers="frozen"), 3)
    return model


def sources(model: AdapterModel, names, weights, path):
    out = []
    for n, w in zip(names, weights):
        layers = dict(model.adapters[n].layer_items())
        if path in layers:
            out.append((dense_delta(layers[path]).double(), w))
    return out


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(method):
    model = combine_model()
    names, weights = ["a", "b", "c"], [0.7, -1.2, 0.4]
    new = model.combine("abc", names, weights, method=method)
    for path, layer in new.layer_items():
        expected = sum(w * d for d, w in sources(model, names, weights, path))
        torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-6)
    assert new.metadata["recipe"]["method"] == method and new.metadata["recipe"]["rel_error"] == 0.0
    model.activate("abc")
    combined = model(X)
    model.activate(Stack(*names, weights=weights))
    torch.testing.assert_close(combined, model(X), rtol=1e-4, atol=1e-4)


def test_svd_is_the_best_rank_k_approximation():
    model = combine_model()
    names, weights = ["a", "b", "c"], [0.5, 0.3, 0.2]
    new = model.combine("svd", names, weights, method="svd", rank=3)
    tails, norms = [], []
    for path, layer in new.layer_items():
        dense = sum(w * d for d, w in sources(model, names, weights, path))
        flat = dense.flatten(1)
        s = torch.linalg.svdvals(flat)
        got = layer.delta_weight().double().flatten(1)
        torch.testing.assert_close(torch.linalg.svdvals(got)[:3], s[:3], rtol=1e-4, atol=1e-6)
        err = torch.linalg.norm(flat - got) / torch.linalg.norm(flat)
        tail = s[3:].square().sum().sqrt() / s.square().sum().sqrt()
        torch.testing.assert_close(err, tail, rtol=1e-3, atol=1e-6)
        assert new.metadata["recipe"]["layer_rel_error"][path] == pytest.approx(tail.item(), rel=1e-3, abs=1e-6)
        tails.append(s[3:].square().sum())
        norms.append(s.square().sum())
    overall = (sum(tails) / sum(norms)).sqrt().item()
    assert new.metadata["recipe"]["rel_error"] == pytest.approx(overall, rel=1e-3)


def reference_ties(deltas, weights, density, sign):
    """TIES (Yadav et al. 2023), written from the paper: trim to the top-density magnitudes, weight,
    elect a sign per entry, mean over the agreeing entries."""
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.numel() + 0.5))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    tau = torch.stack([w * t for t, w in zip(trimmed, weights)])
    if sign == "total":
        elected = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    else:
        elected = torch.where((tau > 0).sum(0) - (tau < 0).sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tau) == elected) & (tau != 0)
    return (tau * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_the_paper(sign):
    model = combine_model()
    names, weights = ["a", "b", "c"], [1.0, 0.8, 1.1]
    new = model.combine("t", names, weights, method="ties", density=0.3, sign=sign, rank=512)
    for path, layer in new.layer_items():
        srcs = sources(model, names, weights, path)
        expected = reference_ties([d for d, _ in srcs], [w for _, w in srcs], 0.3, sign)
        torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-4, atol=1e-6)


def test_magnitude_prune_matches_definition():
    model = combine_model()
    names, weights = ["a", "b"], [1.0, -0.5]
    new = model.combine("m", names, weights, method="magnitude_prune", density=0.2, rank=512)
    for path, layer in new.layer_items():
        expected = 0
        for d, w in sources(model, names, weights, path):
            k = max(1, int(0.2 * d.numel() + 0.5))
            threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
            expected = expected + w * torch.where(d.abs() >= threshold, d, torch.zeros_like(d))
        torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-4, atol=1e-6)


def test_dare_is_seeded_and_keeps_the_expected_fraction():
    model = combine_model()
    one = model.combine("d1", ["a"], [1.0], method="dare_linear", density=0.3, seed=5, rank=256)
    two = model.combine("d2", ["a"], [1.0], method="dare_linear", density=0.3, seed=5, rank=256)
    three = model.combine("d3", ["a"], [1.0], method="dare_linear", density=0.3, seed=6, rank=256)
    layer = "layer3.0.conv1"
    d1, d2, d3 = (dict(x.layer_items())[layer].delta_weight().double() for x in (one, two, three))
    torch.testing.assert_close(d1, d2, rtol=0, atol=1e-9)
    assert not torch.allclose(d1, d3)
    source = dense_delta(dict(model.adapters["a"].layer_items())[layer]).double()
    # each entry is either dropped (0) or kept and rescaled (ΔW/0.3); the float32 factorisation leaves
    # a little noise, so classify by which of the two it is nearer, where the two are far apart
    clear = source.abs() > 1e-3 * source.abs().max()
    kept = (d1 - source / 0.3).abs() < d1.abs()
    n = int(clear.sum())
    rate = kept[clear].double().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5, f"keep rate {rate}"
    torch.testing.assert_close(d1[kept & clear], source[kept & clear] / 0.3, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(d1[~kept & clear], torch.zeros_like(d1[~kept & clear]), rtol=0, atol=1e-5)
    assert one.metadata["recipe"]["params"] == {"density": 0.3, "rank": 256, "seed": 5}


def test_heads_are_averaged_or_chosen():
    model = AdapterModel(resnet())
    cfg = LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"])
    add(model, "a", cfg, 1)
    add(model, "b", cfg, 2)
    add(model, "p", cfg, 3, head=nn.Linear(512, 2))
    new = model.combine("ab", ["a", "b"], [3.0, 1.0])
    fa, fb = (dict(model.adapters[n].head_items())["fc"] for n in "ab")
    head = dict(new.head_items())["fc"]
    torch.testing.assert_close(head.weight, (3 * fa.weight + fb.weight) / 4)
    with pytest.raises(ConfigError, match=r"the heads at fc differ: a has weight \(10, 512\), p has weight \(2, 512\)"):
        model.combine("ap", ["a", "p"])
    assert "ap" not in model.adapters
    chosen = model.combine("ap", ["a", "p"], head="p")
    assert dict(chosen.head_items())["fc"].weight.shape == (2, 512)


def test_combined_adapter_saves_and_reloads(tmp_path):
    model = combine_model()
    model.combine("s", ["a", "b", "c"], method="svd", rank=2)
    model.activate("s")
    y = model(X)
    model.save_adapter("s", tmp_path / "s.safetensors")
    other = AdapterModel(resnet())
    other.load_adapter("s", tmp_path / "s.safetensors")
    other.activate("s")
    assert torch.equal(other(X), y)
    assert other.adapters["s"].metadata["recipe"]["sources"] == ["a", "b", "c"]


def test_bad_combine_arguments():
    model = combine_model()
    with pytest.raises(ConfigError, match="unknown combine method 'mean'"):
        model.combine("x", ["a", "b"], method="mean")
    with pytest.raises(ConfigError, match="needs density"):
        model.combine("x", ["a", "b"], method="ties")
    with pytest.raises(ConfigError, match="2 adapters but 3 weights"):
        model.combine("x", ["a", "b"], [1, 2, 3])
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        model.combine("x", ["a", "b"], method="svd", rank=0)
    assert "x" not in model.adapters


def test_a_delta_without_a_dense_form_refuses_to_combine_with_its_own_error():
    """PEFT's grouped-conv layout (A crossing the groups) runs but has no ΔW in the base weight's shape: combine
    raises CombineError (still a MergeError, which callers caught before it had its own name), adding nothing."""
    model = AdapterModel(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(targets=["0"]), layer_specs={"0": {"r": 2, "alpha": 2, "a_groups": 1}})
    with pytest.raises(CombineError, match=r"cannot combine 0: .*mixes input channels across") as caught:
        model.combine("x", ["a", "b"])
    assert isinstance(caught.value, MergeError) and isinstance(caught.value, AdapterHubError)
    assert "x" not in model.adapters


class OddConvs(nn.Module):
    """Convs on the generic (non-fused) path: grouped, depthwise, dilated, circular; an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="circular")
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8, padding_mode="reflect")
        self.conv3d = nn.Conv3d(8, 4, (1, 1, 3), padding=(0, 0, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.depthwise(torch.relu(self.grouped(x))))
        return self.fc(self.conv3d(h.unsqueeze(-1)).mean((2, 3, 4)))


def test_stack_and_switch_on_grouped_dilated_and_3d_convs():
    torch.manual_seed(0)
    model = AdapterModel(OddConvs().eval())
    cfg = LoRAConfig(r=4, targets=["grouped", "depthwise", "conv3d"])
    add(model, "a", cfg, 1)
    add(model, "b", cfg, 2)
    x = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    model.activate(Stack("a", "b", weights=[0.5, 2.0]))
    stacked = model(x)
    ref = copy.deepcopy(model.backbone)
    for m in ref.modules():
        m.__dict__.pop("forward", None)
    with torch.no_grad():
        for name, w in [("a", 0.5), ("b", 2.0)]:
            for path, layer in model.adapters[name].layer_items():
                g = ref.get_submodule(path).groups
                a, b = layer.lora_A.weight, layer.lora_B.weight.flatten(1)
                rg, og = a.shape[0] // g, b.shape[0] // g
                blocks = [b[j * og : (j + 1) * og] @ a[j * rg : (j + 1) * rg].flatten(1) for j in range(g)]
                delta = torch.cat(blocks).reshape(ref.get_submodule(path).weight.shape) * layer.scaling
                ref.get_submodule(path).weight.add_(w * delta)
    torch.testing.assert_close(stacked, ref(x), rtol=1e-5, atol=1e-5)

    model.activate(Switch("a", "b"))
    route = ["b", "a", None, "b", "a"]
    out = model(x, route=route)
    for i, name in enumerate(route):
        model.activate(name)
        torch.testing.assert_close(out[i], model(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
        model.activate(Switch("a", "b"))


def test_merge_while_a_switch_is_active_runs_the_merged_weights_then_restores_the_switch():
    model = switch_model()
    model.activate(Switch("digits", "parity"))
    model.merge("digits")
    merged = model(X)  # no route needed: the merged adapter is the live composition
    model.unmerge()
    model.activate("digits")
    torch.testing.assert_close(merged, model(X), rtol=1e-4, atol=1e-4)
    model.activate(Switch("digits", "parity"))
    model.merge("digits")
    model.unmerge()
    assert isinstance(model.active, Switch)
