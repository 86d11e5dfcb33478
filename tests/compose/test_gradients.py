"""Training gradients through an AdapterModel against a plain reference written here from scratch.

For every layer type a LoRA delta can sit on, one backward through the AdapterModel must leave on each trainable
tensor (lora_A, lora_B, heads) and on the input exactly the gradients of a reference that shares no code with
the library: leaf copies of each adapter's A and B, the dense weight folded by hand,

    W' = W + Σᵢ wᵢ·ΔWᵢ,   ΔWᵢ = sᵢ·Bᵢ·Aᵢ,  sᵢ = αᵢ/rᵢ
    (a conv per group block: ΔW[o, i, …] = s·Σₖ B[o, k]·A[k, i, …]; an embedding ΔE = s·(B·A)ᵀ;
     transformers' Conv1D, stored (in, out): ΔW = s·(B·A)ᵀ; a MultiheadAttention: in_proj and out_proj),

and the functional op (F.linear, F.pad + F.convNd, F.embedding, F.multi_head_attention_forward). Everything is
float64 and compared to a relative 1e-10, after B was made non-zero (a fresh B = 0 gives A no gradient), and
every compared gradient is asserted non-zero.

Modes: one adapter; ``Stack("a", "b", weights=[1, -0.5])``; a per-sample ``Switch("a", "b")`` with an unadapted
row, whose reference runs each sample alone through its own W + ΔW (W alone for None) and sums the losses.
With LoRA dropout the masks each adapter's dropout drew are read back through forward hooks, and the reference
computes W⋆x + Σᵢ wᵢ·ΔWᵢ⋆(maskᵢ ⊙ x) instead (dropout acts on the delta's input only).

Each case also checks which path ran: with no dropout a Linear, an ungrouped conv and a MultiheadAttention's
packed projections use the fused A/B products, which read the factors' weights without calling the lora_A/lora_B
modules; grouped convs, embeddings, Conv1D, cross-attention's in_proj and any layer with dropout call them. After
backward no backbone parameter has a ``.grad`` or requires grad, and the backbone's state dict is bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Stack, Switch

# The layers here are tiny, so most deltas outgrow them (a warning meant for real models), and an even kernel with
# padding="same" is exactly one of the cases under test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::adapter_hub.model.OversizedDeltaWarning"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning"),
]

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
ADAPTERS = {"a": (4, 6.0), "b": (2, 5.0)}  # name -> (r, α): scalings 1.5 and 2.5
ROUTE = ["a", "b", None, "a"]
BATCH = len(ROUTE)
SPECS = {"single": "a", "stack": Stack("a", "b", weights=[1.0, -0.5]), "switch": Switch("a", "b")}
WEIGHTED = {"single": [("a", 1.0)], "stack": [("a", 1.0), ("b", -0.5)]}
P_DROP = 0.3


# --- backbones: the layer under test at module path "layer" --------------------------------------------------
class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Attention(nn.Module):
    """An nn.MultiheadAttention fed batch-first inputs (a Switch routes dimension 0): self-attention, or
    cross-attention of x over ``memory`` (key is value), optionally with a key padding mask."""

    def __init__(self, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.layer = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None = None, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.layer.batch_first:
            x = x.transpose(0, 1)
            memory = memory.transpose(0, 1) if memory is not None else None
        kv = x if memory is None else memory
        out, _ = self.layer(x, kv, kv, key_padding_mask=pad, need_weights=self.need_weights)
        return out if self.layer.batch_first else out.transpose(0, 1)


@dataclass(frozen=True)
class Case:
    """One layer configuration: how to build its backbone and inputs, and which of its sites ("in": the layer's
    own factors; "out_proj": an attention's output projection) run fused when there is no dropout."""

    kind: str  # linear, conv, embedding, mha, conv1d_t
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    fused: frozenset[str] = frozenset()


def _randn(*shape: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (torch.randn(*shape, generator=g, dtype=DT),)


def _conv(n: int, cin: int, cout: int, size: tuple[int, ...], **options) -> Case:
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    fused = frozenset({"in"}) if options.get("groups", 1) == 1 else frozenset()
    return Case("conv", lambda: One(cls(cin, cout, **options)), _randn(BATCH, cin, *size), fused)


def _transformers_conv1d(nf: int, nx: int) -> nn.Module:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return One(Conv1D(nf, nx))


def _attention(
    batch_first: bool, need_weights: bool, cross: bool = False, pad: bool = False, length: int = 5
) -> Case:
    def inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randn(BATCH, length, 8, generator=g, dtype=DT)
        if not cross:
            return (x,)
        memory = torch.randn(BATCH, 6, 8, generator=g, dtype=DT)
        if not pad:
            return x, memory
        mask = torch.zeros(BATCH, 6, dtype=torch.bool)
        mask[0, 4:] = mask[1, 1:] = mask[3, 5] = True  # padded keys, different per sample
        return x, memory, mask

    fused = frozenset({"out_proj"}) if cross else frozenset({"in", "out_proj"})
    return Case("mha", lambda: Attention(batch_first, need_weights), inputs, fused)


def _embedding(padding_idx: int | None) -> Case:
    def inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, 11, (BATCH, 7), generator=g)
        if padding_idx is not None:
            ids[:, [0, 3]] = padding_idx  # every sample has padding positions
        return (ids,)

    return Case("embedding", lambda: One(nn.Embedding(11, 5, padding_idx=padding_idx)), inputs)


LINEAR = frozenset({"in"})
CASES: dict[str, Case] = {
    "linear": Case("linear", lambda: One(nn.Linear(6, 5)), _randn(BATCH, 6), LINEAR),
    "linear-nobias": Case("linear", lambda: One(nn.Linear(6, 5, bias=False)), _randn(BATCH, 6), LINEAR),
    "linear-3d": Case("linear", lambda: One(nn.Linear(6, 5)), _randn(BATCH, 3, 6), LINEAR),
    "linear-3d-nobias": Case("linear", lambda: One(nn.Linear(6, 5, bias=False)), _randn(BATCH, 3, 6), LINEAR),
    # as many positions per sample as output features: a training step may fold W + ΔW even for one sample
    "linear-3d-long": Case("linear", lambda: One(nn.Linear(6, 5)), _randn(BATCH, 5, 6), LINEAR),
    "conv2d": _conv(2, 4, 6, (7, 6), kernel_size=3),
    "conv2d-stride-pad": _conv(2, 4, 6, (7, 6), kernel_size=3, stride=2, padding=1),
    "conv2d-tuples": _conv(2, 4, 6, (7, 6), kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
    "conv2d-same": _conv(2, 4, 6, (7, 6), kernel_size=3, padding="same"),
    "conv2d-same-even-dilated": _conv(2, 4, 6, (7, 6), kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    "conv2d-valid": _conv(2, 4, 6, (7, 6), kernel_size=3, padding="valid"),
    "conv2d-dilation": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=2, dilation=2),
    "conv2d-reflect": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=1, padding_mode="reflect"),
    "conv2d-replicate": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=(1, 2), padding_mode="replicate"),
    "conv2d-circular": _conv(2, 4, 6, (7, 6), kernel_size=3, stride=2, padding=2, padding_mode="circular"),
    "conv2d-circular-same": _conv(2, 4, 6, (7, 6), kernel_size=(3, 2), padding="same", padding_mode="circular"),
    "conv2d-groups": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=1, groups=2),
    "conv2d-groups-reflect": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=1, groups=2, padding_mode="reflect"),
    "conv2d-depthwise": _conv(2, 4, 4, (7, 6), kernel_size=3, padding=1, groups=4),
    "conv2d-depthwise-x2": _conv(2, 4, 8, (7, 6), kernel_size=3, stride=2, groups=4, padding_mode="replicate",
                                 padding=1),  # fmt: skip
    "conv2d-nobias": _conv(2, 4, 6, (7, 6), kernel_size=3, padding=1, bias=False),
    "conv1d": _conv(1, 4, 6, (9,), kernel_size=3, padding=2, dilation=2, padding_mode="circular"),
    "conv1d-groups-same": _conv(1, 4, 6, (9,), kernel_size=4, padding="same", groups=2, padding_mode="replicate"),
    "conv3d": _conv(3, 2, 4, (4, 5, 4), kernel_size=3, stride=2, padding=1),
    "conv3d-groups-reflect": _conv(3, 2, 4, (3, 5, 4), kernel_size=(1, 3, 3), padding="same", groups=2,
                                   padding_mode="reflect"),  # fmt: skip
    "embedding": _embedding(None),
    "embedding-padding-idx": _embedding(0),
    "mha-self": _attention(batch_first=True, need_weights=True),
    "mha-self-seqfirst": _attention(batch_first=False, need_weights=False),
    "mha-self-sdpa": _attention(batch_first=True, need_weights=False),
    "mha-self-long": _attention(batch_first=True, need_weights=False, length=24),  # 3E positions per sample
    "mha-cross": _attention(batch_first=True, need_weights=False, cross=True),
    "mha-cross-seqfirst-pad": _attention(batch_first=False, need_weights=True, cross=True, pad=True),
    "conv1d-transformers": Case("conv1d_t", lambda: _transformers_conv1d(5, 6), _randn(BATCH, 3, 6)),
    "conv1d-transformers-2d": Case("conv1d_t", lambda: _transformers_conv1d(5, 6), _randn(BATCH, 6)),
}

# With dropout: the delta's input is dropped out and the plain path runs; the masks are read back per call (in a
# Switch, row k of an adapter's call is its k-th sample in input order).
DROPOUT_CASES = ["linear", "linear-3d-nobias", "conv2d-same-even-dilated", "conv2d-circular", "conv2d-groups",
                 "conv1d", "conv3d", "embedding", "mha-self", "conv1d-transformers"]  # fmt: skip


# --- the adapted model ---------------------------------------------------------------------------------------
def _model(case: Case, dropout: float) -> AdapterModel:
    torch.manual_seed(0)
    net = case.build().to(DT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero biases, and weights of one scale for every layer type
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    model = AdapterModel(net)
    for name, (r, alpha) in ADAPTERS.items():
        model.add_adapter(name, LoRAConfig(r=r, alpha=alpha, targets=["layer"], dropout=dropout))
        with torch.no_grad():  # non-zero B (and an embedding's A, which starts at zero)
            for p in model.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    return model.train()


def _padding_idx_column_zero(model: AdapterModel, case: Case) -> None:
    """An embedding's A column at padding_idx: zero, as it starts and stays (it never gets a gradient), so the
    delta of the padding row is zero like the reference's, whose padding row passes no gradient to B either."""
    layer = model.backbone.layer
    if case.kind == "embedding" and layer.padding_idx is not None:
        with torch.no_grad():
            for adapter in model.adapters.values():
                adapter.layers["layer"].lora_A.weight[:, layer.padding_idx] = 0


class Recorder:
    """Forward hooks on every adapter's LoRA modules: the dropout masks drawn, per adapter and site, and which
    sites ran their lora_A/lora_B modules (the plain path) rather than reading their weights (the fused one)."""

    def __init__(self, model: AdapterModel) -> None:
        self.masks: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.called: set[str] = set()
        for name, adapter in model.adapters.items():
            for path, m in adapter.layers.named_modules():
                site = "out_proj" if ".out_proj." in f".{path}." else "in"
                if isinstance(m, nn.Dropout):
                    m.register_forward_hook(functools.partial(self._mask, (name, site)))
                elif path.endswith(("lora_A", "lora_B")):
                    m.register_forward_hook(functools.partial(self._call, site))

    def _mask(self, key: tuple[str, str], module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach()
        assert x.ne(0).all(), "an input entry of exactly 0 would hide its mask"
        # the multiplier itself (dropout scales by 1/(1 − p) rounded to float32, not by the float64 value)
        mask = out.detach() / x
        kept = mask != 0
        assert 0 < kept.count_nonzero() < mask.numel(), "a real dropout mask: some entries dropped, some kept"
        torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - P_DROP)), rtol=1e-6, atol=0)
        self.masks.setdefault(key, []).append((x, mask))

    def _call(self, site: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.called.add(site)

    def mask_for(self, name: str, site: str, x: torch.Tensor | None = None, sample: int | None = None) -> torch.Tensor:
        """The mask adapter ``name`` drew at ``site`` in its one call, or the row of it that belongs to ``sample``
        of a Switch: the rows of an adapter reach its layers in input order (the batch is sorted stably), so
        its k-th sample is row k. ``x`` (the sample's input at that site, where known) checks the row."""
        calls = self.masks[(name, site)]
        assert len(calls) == 1, f"one dropout call per forward at {site}, got {len(calls)}"
        inputs, mask = calls[0]
        if sample is None:
            return mask
        k = ROUTE[:sample].count(name)
        if x is not None:
            assert torch.equal(inputs[k], x[0]), "the Switch's rows of one adapter reach it in input order"
        return mask[k : k + 1]


# --- the reference -------------------------------------------------------------------------------------------
def dense_deltas(kind: str, base: nn.Module, t: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """ΔW per base parameter from the leaf tensors ``t`` of one adapter (keys as in its named_parameters)."""
    a, b = t["layers.layer.lora_A.weight"], t["layers.layer.lora_B.weight"]
    if kind == "linear":
        return {"weight": s * b @ a}
    if kind == "conv1d_t":
        return {"weight": (s * b @ a).t()}
    if kind == "embedding":
        return {"weight": s * (b @ a).t()}
    if kind == "mha":
        a_o, b_o = t["layers.layer.out_proj.lora_A.weight"], t["layers.layer.out_proj.lora_B.weight"]
        return {"in_proj_weight": s * b @ a, "out_proj.weight": s * b_o @ a_o}
    # conv with g groups: A (rank, in/g, *k), B (out, rank/g, 1, …); output block j of ΔW is B_j·A_j
    g, out, rank = base.groups, b.shape[0], a.shape[0]
    blocks = torch.einsum("gok,gki->goi", b.reshape(g, out // g, rank // g), a.reshape(g, rank // g, -1))
    return {"weight": s * blocks.reshape(base.weight.shape)}


def _conv_ref(base: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The conv by its definition: pad explicitly (numbers, "same": total d·(k−1), the odd one at the end,
    "valid"), in its padding_mode, then a conv without padding."""
    pads: list[int] = []
    for i in reversed(range(len(base.kernel_size))):
        k, d = base.kernel_size[i], base.dilation[i]
        if base.padding == "valid":
            lo = hi = 0
        elif base.padding == "same":
            lo, hi = d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2
        else:
            lo = hi = base.padding[i]
        pads += [lo, hi]
    mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(base.kernel_size)]
    return conv(F.pad(x, pads, mode=mode), w, bias, base.stride, 0, base.dilation, base.groups)


def _op(kind: str, base: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, w, bias)
    if kind == "conv1d_t":
        y = x @ w
        return y + bias if bias is not None else y
    if kind == "embedding":
        return F.embedding(x, w, padding_idx=base.padding_idx)
    return _conv_ref(base, x, w, bias)


def _attention_ref(
    net: Attention, p: dict[str, torch.Tensor], terms: list, xs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Attention through F.multi_head_attention_forward with the folded weights; with dropout masks (self-attention
    only) by hand: projections W·x + Σ w·ΔW·(mask ⊙ x), then scaled dot-product attention per head."""
    mha, x = net.layer, xs[0]
    p = {k.removeprefix("layer."): v for k, v in p.items()}
    if any(masks for _, _, masks in terms):
        assert len(xs) == 1  # self-attention (need_weights changes how, not what, the layer computes)
        qkv = F.linear(x, p["in_proj_weight"], p["in_proj_bias"])
        qkv = qkv + sum(w * F.linear(m["in"] * x, d["in_proj_weight"]) for w, d, m in terms)
        n, length, e = x.shape
        q, k, v = (t.reshape(n, length, mha.num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, e)
        out = F.linear(h, p["out_proj.weight"], p["out_proj.bias"])
        return out + sum(w * F.linear(m["out_proj"] * h, d["out_proj.weight"]) for w, d, m in terms)
    w_in = p["in_proj_weight"] + sum(w * d["in_proj_weight"] for w, d, _ in terms)
    w_out = p["out_proj.weight"] + sum(w * d["out_proj.weight"] for w, d, _ in terms)
    query = x.transpose(0, 1)  # (L, N, E), the functional op's layout
    kv = query if len(xs) == 1 else xs[1].transpose(0, 1)
    out, _ = F.multi_head_attention_forward(
        query, kv, kv, mha.embed_dim, mha.num_heads, w_in, p["in_proj_bias"], None, None, False, 0.0, w_out,
        p["out_proj.bias"], training=True, key_padding_mask=xs[2] if len(xs) > 2 else None,
        need_weights=net.need_weights,
    )  # fmt: skip
    return out.transpose(0, 1)


def reference(
    case: Case, net: nn.Module, p: dict[str, torch.Tensor], terms: list, xs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The backbone's output with ``terms`` = [(weight, ΔW per parameter, dropout masks or None)] added."""
    if case.kind == "mha":
        return _attention_ref(net, p, terms, xs)
    base, x = net.layer, xs[0]
    w, bias = p["layer.weight"], p.get("layer.bias")
    if any(masks for _, _, masks in terms):  # the delta sees dropout(x), the base op x itself
        return _op(case.kind, base, x, w, bias) + sum(
            wt * _op(case.kind, base, m["in"] * x, d["weight"], None) for wt, d, m in terms
        )
    return _op(case.kind, base, x, w + sum(wt * d["weight"] for wt, d, _ in terms), bias)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient depends on the output itself (not only a fixed direction)."""
    return (out * target).sum() + 0.5 * out.pow(2).sum()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_backbone_untouched(model: AdapterModel, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.backbone.named_parameters():
        assert p.grad is None, f"backbone parameter {name} got a gradient"
        assert not p.requires_grad, f"backbone parameter {name} requires grad"
    after = model.backbone.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"backbone tensor {k} changed"


def run_case(case: Case, mode: str, dropout: float) -> None:
    model = _model(case, dropout)
    _padding_idx_column_zero(model, case)
    before = _state(model.backbone)
    base = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}  # the reference's copy
    model.activate(SPECS[mode])
    names = ["a"] if mode == "single" else ["a", "b"]
    leaves = {n: {k: v.detach().clone().requires_grad_() for k, v in model.adapters[n].named_parameters()}
              for n in names}  # fmt: skip
    g = torch.Generator().manual_seed(2)
    xs = case.inputs(g)
    x_model = [x.clone().requires_grad_() if x.is_floating_point() else x for x in xs]
    x_ref = [x.clone().requires_grad_() if x.is_floating_point() else x for x in xs]
    rec = Recorder(model)

    out = model(*x_model, route=ROUTE) if mode == "switch" else model(*x_model)
    if mode == "switch":
        out = out.stack()
    target = torch.randn(out.shape, generator=g, dtype=DT)
    _loss(out, target).backward()

    sites = {"in", "out_proj"} if case.kind == "mha" else {"in"}
    plain = sites - case.fused if dropout == 0 else sites
    assert rec.called == plain, f"sites that ran the plain path: {sorted(rec.called)}, expected {sorted(plain)}"

    scale = {n: alpha / r for n, (r, alpha) in ADAPTERS.items()}
    deltas = {n: dense_deltas(case.kind, model.backbone.layer, leaves[n], scale[n]) for n in names}
    drops = dropout > 0 and case.kind != "embedding"  # dropout never applies to an embedding's integer ids

    def masks(name: str, i: int | None = None) -> dict[str, torch.Tensor] | None:
        """The dropout masks of adapter ``name`` per site: of the whole batch, or of sample ``i`` of a Switch
        (whose input at site "in" is the sample's own input row)."""
        if not drops:
            return None
        if i is None:
            return {site: rec.mask_for(name, site) for site in sites}
        return {site: rec.mask_for(name, site, xs[0][i : i + 1] if site == "in" else None, i) for site in sites}

    if mode == "switch":  # each sample alone, through its own adapter's W + ΔW (W alone for None)
        rows = []
        for i, name in enumerate(ROUTE):
            sample = [x[i : i + 1] for x in x_ref]
            terms = [(1.0, deltas[name], masks(name, i))] if name is not None else []
            rows.append(reference(case, model.backbone, base, terms, sample))
        ref = torch.cat(rows)
    else:
        ref = reference(case, model.backbone, base, [(w, deltas[n], masks(n)) for n, w in WEIGHTED[mode]], x_ref)
    torch.testing.assert_close(out, ref, **TOL, msg="outputs")
    _loss(ref, target).backward()

    for n in names:
        for k, p in model.adapters[n].named_parameters():
            want = leaves[n][k].grad
            assert want is not None and want.abs().max() > 0, f"the reference gives {n}.{k} a non-zero gradient"
            assert p.grad is not None, f"{n}.{k} got no gradient"
            torch.testing.assert_close(p.grad, want, **TOL, msg=f"{n}.{k}")
    for n in set(ADAPTERS) - set(names):
        assert all(p.grad is None and not p.requires_grad for p in model.adapters[n].parameters())
    for got, want in zip(x_model, x_ref):
        if got.is_floating_point():
            assert want.grad.abs().max() > 0
            torch.testing.assert_close(got.grad, want.grad, **TOL, msg="input gradient")
    check_backbone_untouched(model, before)


@pytest.mark.parametrize("mode", list(SPECS))
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_the_dense_reference(case: str, mode: str) -> None:
    run_case(CASES[case], mode, dropout=0.0)


@pytest.mark.parametrize("mode", list(SPECS))
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_gradients_with_dropout_equal_the_reference_with_the_same_masks(case: str, mode: str) -> None:
    run_case(CASES[case], mode, dropout=P_DROP)


# --- heads -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, P_DROP])
@pytest.mark.parametrize("mode", list(SPECS))
def test_head_gradients_equal_the_reference(mode: str, dropout: float) -> None:
    """An MLP with a delta on its first layer and a head trained in full: b's head has 3 outputs, a's and the
    backbone's 4. Reference: fc(tanh(x·(W + Σ w·ΔW)ᵀ + b₀)) with each row's own head (a Stack runs b's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)
    model = AdapterModel(net)
    g = torch.Generator().manual_seed(3)
    for name, (r, alpha) in ADAPTERS.items():
        head = nn.Linear(8, 3 if name == "b" else 4).to(DT)
        model.add_adapter(name, LoRAConfig(r=r, alpha=alpha, targets=["0"], heads=["2"], dropout=dropout),
                          head_modules={"2": head})  # fmt: skip
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    model.train()
    before = _state(model.backbone)
    spec = Stack("a", "b", weights=[1.0, -0.5], head="b") if mode == "stack" else SPECS[mode]
    model.activate(spec)
    names = ["a"] if mode == "single" else ["a", "b"]
    leaves = {n: {k: v.detach().clone().requires_grad_() for k, v in model.adapters[n].named_parameters()}
              for n in names}  # fmt: skip
    w0, b0, w2, b2 = (p.detach().clone() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    x = torch.randn(BATCH, 6, generator=g, dtype=DT)
    x_model, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(BATCH, 4, generator=g, dtype=DT)
    rec = Recorder(model)

    def row_loss(o: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        return _loss(o, target[rows, : o.shape[-1]])

    out = model(x_model, route=ROUTE) if mode == "switch" else model(x_model)
    if mode == "switch":
        loss = sum(row_loss(o, out.rows[n]) for n, o in out.by_adapter.items())
    else:
        loss = row_loss(out, slice(None))
    loss.backward()
    assert rec.called == ({"in"} if dropout else set())

    def delta(n: str) -> torch.Tensor:
        r, alpha = ADAPTERS[n]
        return alpha / r * leaves[n]["layers.0.lora_B.weight"] @ leaves[n]["layers.0.lora_A.weight"]

    def forward(rows: slice, weighted: list[tuple[str, float]], head: str | None) -> torch.Tensor:
        xr = x_ref[rows]
        h = F.linear(xr, w0, b0)
        for n, w in weighted:
            xd = xr * rec.mask_for(n, "in", *((x[rows], rows.start) if mode == "switch" else ())) if dropout else xr
            h = h + w * F.linear(xd, delta(n))
        fc = (leaves[head]["heads.2.weight"], leaves[head]["heads.2.bias"]) if head else (w2, b2)
        return F.linear(torch.tanh(h), *fc)

    if mode == "switch":
        ref_loss = sum(row_loss(forward(slice(i, i + 1), [(n, 1.0)] if n else [], n), slice(i, i + 1))
                       for i, n in enumerate(ROUTE))  # fmt: skip
    else:
        ref = forward(slice(None), WEIGHTED[mode], "b" if mode == "stack" else "a")
        torch.testing.assert_close(out, ref, **TOL)
        ref_loss = row_loss(ref, slice(None))
    torch.testing.assert_close(loss, ref_loss, **TOL)
    ref_loss.backward()
    for n in names:
        for k, p in model.adapters[n].named_parameters():
            if mode == "stack" and n == "a" and k.startswith("heads."):
                assert p.grad is None, "a Stack runs one head: the other adapter's gets no gradient"
                continue
            want = leaves[n][k].grad
            assert want is not None and want.abs().max() > 0, f"{n}.{k}"
            torch.testing.assert_close(p.grad, want, **TOL, msg=f"{n}.{k}")
    torch.testing.assert_close(x_model.grad, x_ref.grad, **TOL)
    check_backbone_untouched(model, before)


# --- an optimizer step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, P_DROP])
@pytest.mark.parametrize("spec", ["single", "switch"])
def test_an_optimizer_step_moves_only_the_trained_adapters(spec: str, dropout: float) -> None:
    """AdamW over every parameter of the model (as ``AdamW(model.parameters())`` is often written), with weight
    decay, two steps: the backbone (weights and BatchNorm statistics) and an adapter that was not trained stay
    bit-identical, and so do that adapter's outputs; the trained ones move."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(24, 5)).to(DT)  # fmt: skip
    model = AdapterModel(net)
    g = torch.Generator().manual_seed(4)
    for name in ("a", "b", "c"):
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, targets=["0", "5"], heads=[], dropout=dropout))
        with torch.no_grad():
            for p in model.adapters[name].layers.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.3)
    x, y = torch.randn(6, 3, 6, 6, generator=g, dtype=DT), torch.tensor([0, 1, 2, 3, 4, 0])
    route = ["a", "b", None, "a", "b", "b"]

    def outputs(name: str) -> torch.Tensor:
        model.eval()
        model.activate(name)
        with torch.no_grad():
            return model(x)

    untouched = ["c"] if spec == "switch" else ["b", "c"]
    trained = ["a", "b"] if spec == "switch" else ["a"]
    before = {n: outputs(n) for n in ("a", "b", "c")}
    states = {n: _state(model.adapters[n]) for n in ("a", "b", "c")}
    backbone = _state(model.backbone)

    model.train()
    model.activate(Switch("a", "b") if spec == "switch" else "a")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        if spec == "switch":
            out = model(x, route=route)
            loss = sum(F.cross_entropy(o, y[out.rows[n]]) for n, o in out.by_adapter.items())
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    check_backbone_untouched(model, backbone)
    for n in untouched:
        state = model.adapters[n].state_dict()
        assert all(torch.equal(state[k], v) for k, v in states[n].items()), f"adapter {n} moved"
        assert torch.equal(outputs(n), before[n]), f"adapter {n}'s outputs changed"
    for n in trained:
        assert not torch.equal(outputs(n), before[n]), f"adapter {n} did not train"
        assert any(not torch.equal(model.adapters[n].state_dict()[k], v) for k, v in states[n].items())
