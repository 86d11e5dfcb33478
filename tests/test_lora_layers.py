"""Each LoRA layer against a dense reference: the base layer run with W + ΔW, ΔW computed here by hand
from the saved A and B tensors (not with the layer's own delta_weight)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adapter_hub.lora import (
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAEmbedding,
    LoRALinear,
    LoRAMultiheadAttention,
    lora_scaling,
)
from adapter_hub.lora.site import AttentionSite, LayerSite, Routing

# references compare to 1e-10: every test here runs in float64
pytestmark = pytest.mark.usefixtures("_float64")


@pytest.fixture
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


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
