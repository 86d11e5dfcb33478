"""Each LoRA layer against a dense reference: the base layer run with W + ΔW, ΔW computed here by hand
from the saved A and B tensors (not with the layer's own delta_weight)."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import adapter_hub
from adapter_hub.compose.attention_site import AttentionSite
from adapter_hub.compose.sites import LayerSite, Routing
from adapter_hub.lora import (
    LoRAConfigError,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMultiheadAttention,
    lora_class_for,
    lora_scaling,
)

# references compare to 1e-10: every test here runs in float64
pytestmark = pytest.mark.usefixtures("_float64")


def randomize(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def hand_conv_delta(a: torch.Tensor, b: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """ΔW[o, i, …] = s·Σ_k B[o, k]·A[k, i, …], the sum over the rank rows of o's group only."""
    out, rg = b.shape[0], b.shape[1]
    delta = torch.zeros(out, *a.shape[1:], dtype=a.dtype)
    per_group_out = out // groups
    for o in range(out):
        j = o // per_group_out
        for k in range(rg):
            delta[o] += b[o, k].flatten()[0] * a[j * rg + k]
    return delta * scale


def _conv_cases():
    for dim, stride, dilation, groups, mode, padding in itertools.product(
        (1, 2, 3), (1, 2), (1, 2), ("1", "2", "depthwise"), ("zeros", "circular", "reflect", "replicate"),
        ("int", "same", "valid"),
    ):  # fmt: skip
        if padding == "same" and stride != 1:
            continue  # PyTorch refuses padding="same" with stride > 1
        if dim == 3 and (dilation, stride) != (1, 1) and mode != "zeros":
            continue  # keep the grid small: 3-d covers every mode at stride 1, dilation 1
        yield dim, stride, dilation, groups, mode, padding


CONVS = {1: (nn.Conv1d, LoRAConv1d), 2: (nn.Conv2d, LoRAConv2d), 3: (nn.Conv3d, LoRAConv3d)}


@pytest.mark.parametrize("dim,stride,dilation,groups,mode,padding", list(_conv_cases()))
def test_conv_delta_matches_dense_reference(dim, stride, dilation, groups, mode, padding):
    torch.manual_seed(dim * 7 + stride)
    channels = 6
    g = channels if groups == "depthwise" else int(groups)
    conv_cls, lora_cls = CONVS[dim]
    pad = {"int": 1, "same": "same", "valid": "valid"}[padding]
    base = conv_cls(channels, channels * (2 if g != channels else 1), 3, stride=stride, padding=pad,
                    dilation=dilation, groups=g, padding_mode=mode)  # fmt: skip
    layer = lora_cls(base, r=4, alpha=6.0)
    x = torch.randn(2, channels, *([9] * dim))
    assert torch.equal(base(x) + layer(x), base(x)), "a new adapter must change nothing"
    randomize(layer)
    got = base(x) + layer(x)

    delta = hand_conv_delta(layer.lora_A.weight, layer.lora_B.weight, g, 6.0 / 4)
    assert delta.shape == base.weight.shape, "the delta has the base layer's grouped shape"
    reference = functional_call(base, {"weight": base.weight + delta, "bias": base.bias}, (x,))
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-12, atol=1e-12)


def test_depthwise_delta_is_no_bigger_than_its_rank_needs():
    base = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    layer = LoRAConv2d(base, r=8, alpha=8)
    # one rank per group (ΔW of a depthwise group is 1×9, rank ≤ 1): A mirrors the kernel, B one scalar
    assert layer.lora_A.weight.shape == (32, 1, 3, 3)
    assert layer.lora_B.weight.shape == (32, 1, 1, 1)


def test_grouped_rank_splits_r_evenly():
    base = nn.Conv2d(8, 8, 3, groups=2)
    layer = LoRAConv2d(base, r=6, alpha=6)
    assert layer.lora_A.weight.shape == (6, 4, 3, 3)
    assert layer.lora_B.weight.shape == (8, 3, 1, 1)


def test_linear_delta_and_rslora_scaling():
    torch.manual_seed(1)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, r=4, alpha=8.0, use_rslora=True)
    randomize(layer)
    x = torch.randn(3, 7)
    scale = 8.0 / 2.0  # α/√r
    assert layer.scaling == pytest.approx(scale) == lora_scaling(4, 8.0, True)
    dw = scale * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(base(x) + layer(x), F.linear(x, base.weight + dw, base.bias))


def test_embedding_delta():
    torch.manual_seed(2)
    base = nn.Embedding(11, 6, padding_idx=0)
    layer = LoRAEmbedding(base, r=3, alpha=3.0)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    assert torch.equal(layer(ids), torch.zeros(2, 3, 6)), "a new adapter must change nothing"
    randomize(layer)
    a, b = layer.lora_A.weight, layer.lora_B.weight  # (r, num), (dim, r) as in PEFT
    dw = (b @ a).t() * 1.0
    torch.testing.assert_close(base(ids) + layer(ids), F.embedding(ids, base.weight + dw))


def _mha_reference(mha: nn.MultiheadAttention, layer: LoRAMultiheadAttention) -> nn.MultiheadAttention:
    """A plain MultiheadAttention whose weights are W + ΔW, with ΔW from A and B by hand."""
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
    ref.load_state_dict(mha.state_dict())
    s = layer.scaling
    with torch.no_grad():
        ref.in_proj_weight += s * layer.lora_B.weight @ layer.lora_A.weight
        ref.out_proj.weight += s * layer.out_proj.lora_B.weight @ layer.out_proj.lora_A.weight
    return ref.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_bool", "attn_float"])
def test_attention_matches_dense_reference(batch_first, need_weights, masks):
    torch.manual_seed(3)
    e, heads, n, length = 8, 2, 3, 5
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first).eval()
    layer = LoRAMultiheadAttention(mha, r=2, alpha=4.0)
    routing = Routing(weighted=(("a", 1.0),))
    site = AttentionSite(mha, "attn", routing)
    site.add("a", layer)
    x = torch.randn(n, length, e) if batch_first else torch.randn(length, n, e)
    kwargs = {"need_weights": need_weights}
    if masks == "key_padding":
        kpm = torch.zeros(n, length, dtype=torch.bool)
        kpm[0, -2:] = True
        kwargs["key_padding_mask"] = kpm
    elif masks == "attn_bool":
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif masks == "attn_float":
        kwargs["attn_mask"] = torch.randn(length, length)
    out0, _ = mha(x, x, x, **kwargs)
    plain = nn.MultiheadAttention(e, heads, batch_first=batch_first).eval()
    plain.load_state_dict(mha.state_dict())
    torch.testing.assert_close(out0, plain(x, x, x, **kwargs)[0], rtol=1e-10, atol=1e-10)

    randomize(layer)
    out, weights = mha(x, x, x, **kwargs)
    ref_out, ref_weights = _mha_reference(mha, layer)(x, x, x, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)


def test_attention_cross_and_unbatched():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    layer = LoRAMultiheadAttention(mha, r=3, alpha=3.0)
    randomize(layer)
    site = AttentionSite(mha, "attn", Routing(weighted=(("a", 1.0),)))
    site.add("a", layer)
    ref = _mha_reference(mha, layer)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    torch.testing.assert_close(mha(q, k, v)[0], ref(q, k, v)[0], rtol=1e-10, atol=1e-10)
    u = torch.randn(4, 8)
    torch.testing.assert_close(mha(u, u, u)[0], ref(u, u, u)[0], rtol=1e-10, atol=1e-10)


def test_layer_site_merge_is_exact_and_unmerge_bit_exact():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="circular")
    layer = LoRAConv2d(conv, r=2, alpha=2.0)
    randomize(layer)
    site = LayerSite(conv, "conv", Routing(weighted=(("a", 1.0),)))
    site.add("a", layer)
    x = torch.randn(2, 4, 7, 7)
    unmerged = conv(x)
    original = conv.weight.detach().clone()
    site.routing.weighted = ()
    site.merge([("a", 1.0)])
    torch.testing.assert_close(conv(x), unmerged, rtol=1e-12, atol=1e-12)
    site.unmerge()
    assert torch.equal(conv.weight, original)


def test_attention_rejects_unsupported_variants():
    with pytest.raises(TypeError, match="kdim/vdim"):
        LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), r=2, alpha=2)
    with pytest.raises(TypeError, match="add_bias_kv"):
        LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, add_bias_kv=True), r=2, alpha=2)


# --- the public geometry contract: spec() / from_spec() and the properties outside modules read ---


def _spec_cases() -> dict[str, tuple[nn.Module, type[LoRALayer], dict]]:
    """One base module and LoRA keywords per layer type and conv option."""
    cases: dict[str, tuple[nn.Module, type[LoRALayer], dict]] = {
        "linear": (nn.Linear(7, 5), LoRALinear, {"r": 3, "alpha": 6.0}),
        "linear-rslora": (nn.Linear(7, 5), LoRALinear, {"r": 4, "alpha": 8.0, "use_rslora": True}),
        "embedding": (nn.Embedding(11, 6, padding_idx=0), LoRAEmbedding, {"r": 3, "alpha": 3.0}),
        "attention": (nn.MultiheadAttention(8, 2), LoRAMultiheadAttention, {"r": 2, "alpha": 4.0}),
    }
    for dim, (conv_cls, lora_cls) in CONVS.items():
        cases[f"conv{dim}d"] = (conv_cls(4, 6, 3, padding=1), lora_cls, {"r": 3, "alpha": 6.0})
        cases[f"conv{dim}d-grouped"] = (conv_cls(4, 6, 3, groups=2, dilation=2), lora_cls, {"r": 3, "alpha": 2.0})
        cases[f"conv{dim}d-depthwise"] = (conv_cls(6, 6, 3, groups=6, padding="same"), lora_cls, {"r": 8, "alpha": 8.0})
        cases[f"conv{dim}d-rank"] = (conv_cls(4, 8, 3, groups=2, stride=2), lora_cls, {"r": 2, "alpha": 2.0, "rank": 6})
        cases[f"conv{dim}d-peft-a"] = (conv_cls(4, 6, 1, groups=2), lora_cls, {"r": 4, "alpha": 4.0, "a_groups": 1})
    return cases


def _input_for(base: nn.Module) -> torch.Tensor:
    if isinstance(base, nn.Embedding):
        return torch.tensor([[0, 3, 10], [5, 5, 1]])
    if isinstance(base, nn.Linear):
        return torch.randn(2, base.in_features)
    if isinstance(base, nn.MultiheadAttention):
        return torch.randn(3, 2, base.embed_dim)
    return torch.randn(2, base.in_channels, *([7] * (base.weight.dim() - 2)))


@pytest.mark.parametrize("case", list(_spec_cases()))
def test_spec_round_trip_rebuilds_the_same_delta(case):
    torch.manual_seed(11)
    base, lora_cls, kwargs = _spec_cases()[case]
    use_rslora = kwargs.pop("use_rslora", False)
    layer = lora_cls(base, **kwargs, use_rslora=use_rslora)
    randomize(layer)
    spec = json.loads(json.dumps(layer.spec()))  # what the adapter file stores, through JSON
    assert spec == layer.spec(), "spec() is plain JSON"
    rebuilt = lora_class_for(base).from_spec(base, spec, use_rslora=use_rslora)
    assert type(rebuilt) is lora_cls and rebuilt.spec() == spec
    assert (rebuilt.r, rebuilt.alpha, rebuilt.scaling) == (layer.r, layer.alpha, layer.scaling)
    assert (rebuilt.rank, rebuilt.groups, rebuilt.a_groups) == (layer.rank, layer.groups, layer.a_groups)
    shapes = {k: t.shape for k, t in layer.state_dict().items()}
    assert {k: t.shape for k, t in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(layer.state_dict())
    x = _input_for(base)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    if layer.mergeable:
        got, want = rebuilt.delta_weights(), layer.delta_weights()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    else:
        assert case.endswith("peft-a") and rebuilt.merge_blocker() == layer.merge_blocker()


def test_spec_is_the_adapter_file_format():
    """The exact per-layer header entry of the adapter file: changing it would change saved bytes."""
    assert LoRALinear(nn.Linear(3, 2), r=2, alpha=4).spec() == {"type": "LoRALinear", "r": 2, "alpha": 4.0}
    conv = LoRAConv2d(nn.Conv2d(4, 8, 3, groups=2), r=3, alpha=3)
    assert conv.spec() == {"type": "LoRAConv2d", "r": 3, "alpha": 3.0, "rank": 4, "a_groups": 2}
    assert LoRAConv1d(nn.Conv1d(4, 4, 1), r=2, alpha=2).spec() == {
        "type": "LoRAConv1d", "r": 2, "alpha": 2.0, "rank": 2, "a_groups": 1,
    }  # fmt: skip
    attention = LoRAMultiheadAttention(nn.MultiheadAttention(8, 2), r=2, alpha=2)
    assert attention.spec() == {"type": "LoRAMultiheadAttention", "r": 2, "alpha": 2.0}
    assert (attention.rank, attention.groups, attention.a_groups) == (2, 1, 1)
    assert [type(v) for v in conv.spec().values()] == [str, int, float, int, int]


def test_from_spec_refuses_a_bad_spec_in_one_line():
    base = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(LoRAConfigError, match="is for a LoRALinear, but this base module takes a LoRAConv2d"):
        LoRAConv2d.from_spec(base, {"type": "LoRALinear", "r": 2, "alpha": 2.0})
    with pytest.raises(LoRAConfigError, match="has no 'alpha'"):
        LoRAConv2d.from_spec(base, {"r": 2})
    with pytest.raises(LoRAConfigError, match="'r' must be an integer, got 2.5"):
        LoRAConv2d.from_spec(base, {"r": 2.5, "alpha": 2.0})
    with pytest.raises(LoRAConfigError, match="'alpha' must be a number, got True"):
        LoRAConv2d.from_spec(base, {"r": 2, "alpha": True})
    with pytest.raises(LoRAConfigError, match="a_groups must be 1 or the base groups"):
        LoRAConv2d.from_spec(base, {"r": 2, "alpha": 2.0, "a_groups": 3})
    with pytest.raises(LoRAConfigError, match="rank 3 is not a positive multiple"):
        LoRAConv2d.from_spec(base, {"r": 2, "alpha": 2.0, "rank": 3})
    with pytest.raises(LoRAConfigError, match="must be a mapping"):
        LoRALinear.from_spec(nn.Linear(2, 2), [2, 2.0])  # type: ignore[arg-type]
    with pytest.raises(LoRAConfigError, match="positive"):
        LoRALinear.from_spec(nn.Linear(2, 2), {"r": 0, "alpha": 1.0})
    # keys a layer type does not read are ignored, as the adapter file always has
    assert LoRALinear.from_spec(nn.Linear(2, 2), {"r": 2, "alpha": 1.0, "a_groups": 1}).spec()["r"] == 2


def test_embedding_init_picks_the_law_of_b():
    base = nn.Embedding(10, 4096)
    torch.manual_seed(0)
    default = LoRAEmbedding(base, r=8, alpha=8)
    gaussian = LoRAEmbedding(base, r=8, alpha=8, init="gaussian")
    for layer in (default, gaussian):
        assert torch.equal(layer.lora_A.weight, torch.zeros_like(layer.lora_A.weight)), "ΔW starts at zero"
    assert abs(default.lora_B.weight.std().item() - 1.0) < 0.02, "kaiming (default): B ~ N(0, 1)"
    assert abs(gaussian.lora_B.weight.std().item() - 1 / 8) < 0.0025, "gaussian: B ~ N(0, 1/r²)"
    with pytest.raises(LoRAConfigError, match="unknown LoRA init 'orthogonal'"):
        LoRAEmbedding(base, r=8, alpha=8, init="orthogonal")


def _private_lora_names(source: str, package: str, lora_modules: set[str]) -> list[str]:
    """Private (underscore) names of adapter_hub.lora that a module of ``package`` imports or reads."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*parts, *([node.module] if node.module else [])])

    found: list[str] = []
    aliases: set[str] = set()  # local names bound to adapter_hub.lora or one of its modules
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = absolute(node)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if module == "adapter_hub.lora" or module.startswith("adapter_hub.lora."):
                    found += [full] if private(alias.name) else []
                if full in lora_modules:
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in lora_modules:
                    found += [alias.name] if any(private(p) for p in alias.name.split(".")) else []
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                dotted = ".".join([value.id, *chain])
                if any(dotted.startswith(a + ".") for a in aliases):
                    found.append(dotted)
    return found


def test_no_module_outside_lora_uses_a_private_lora_name():
    root = Path(adapter_hub.__file__).parent
    lora_modules = {"adapter_hub.lora"} | {f"adapter_hub.lora.{p.stem}" for p in (root / "lora").glob("*.py")}
    # the scanner itself catches each form a private name can come in by
    for bad in (
        "from ..lora.conv import _LoRAConvNd",
        "from ..lora import conv\nconv._LoRAConvNd",
        "from .. import lora\nlora.conv._CONV",
        "import adapter_hub.lora.conv as c\nc._LoRAConvNd",
        "from adapter_hub.lora.base import _Layer",
    ):
        assert _private_lora_names(bad, "adapter_hub.formats", lora_modules), bad
    fine = "from ..lora import LoRALayer, conv\nLoRALayer.__doc__, conv.LoRAConv2d"
    assert not _private_lora_names(fine, "adapter_hub.formats", lora_modules)

    checked, offenders = 0, {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[:2] == ("adapter_hub", "lora"):
            continue
        names = _private_lora_names(path.read_text(), ".".join(rel.parent.parts), lora_modules)
        checked += 1
        if names:
            offenders[str(rel)] = names
    assert checked > 10, "the walk found the package's modules"
    assert offenders == {}, f"use the public LoRALayer contract (spec/from_spec/rank/groups/a_groups): {offenders}"
