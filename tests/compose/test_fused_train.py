"""The training fast path (``compose.fused_train``): its hand-written backward against autograd's numerical
gradient (``gradcheck``), its output against the unfolded W⋆x + c·B·(A⋆x), and the rule that picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_hub.compose.fused_train import FusedLoRA, conv_geometry, merge_pays


def _factors(out: int, a_shape: tuple[int, ...], r: int, k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(k):
        tensors += [torch.randn(r, *a_shape, generator=g, dtype=torch.float64).requires_grad_(),
                    torch.randn(out, r, generator=g, dtype=torch.float64).requires_grad_()]  # fmt: skip
    return tensors


def _reference(op, x, weight, bias, groups, factors) -> torch.Tensor:
    """Each group of rows through its own W⋆x + Σ c·B·(A⋆x), computed unfolded by autograd."""
    outs = []
    for start, end, terms in groups:
        rows = x[start:end]
        y = op(rows, weight, bias)
        for i, c in terms:
            a, b = factors[2 * i], factors[2 * i + 1]
            ax = op(rows, a, None)
            y = y + c * (ax @ b.t() if op is F.linear else torch.einsum("or,nr...->no...", b, ax))
        outs.append(y)
    return torch.cat(outs)


GROUPS = {
    "single": ((0, 6, ((0, 0.7),)),),
    "stack": ((0, 6, ((0, 1.0), (1, -0.5))),),
    "switch": ((0, 2, ((0, 0.7),)), (2, 3, ()), (3, 6, ((1, 1.3),))),
}


@pytest.mark.parametrize("mode", sorted(GROUPS))
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_match_gradcheck_and_the_unfolded_reference(mode: str, bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)  # rows, tokens, features
    weight = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    factors = _factors(4, (5,), 2, 2, seed=1)
    groups = GROUPS[mode]
    fused = lambda x, *f: FusedLoRA.apply(x, weight, b, None, groups, *f)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x, *factors), fast_mode=True)
    got = FusedLoRA.apply(x, weight, b, None, groups, *factors)
    want = _reference(F.linear, x, weight, b, groups, factors)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


CONVS = {
    "stride-pad": dict(stride=2, padding=1),
    "dilation": dict(dilation=2, padding=2),
    "same-odd": dict(padding="same", dilation=1),  # kernel 2: an odd total, padded on x first
    "valid": dict(padding="valid"),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "circular": dict(padding=2, padding_mode="circular", stride=(1, 2)),
    "replicate": dict(padding=(1, 0), padding_mode="replicate"),
}


@pytest.mark.parametrize("option", sorted(CONVS))
@pytest.mark.parametrize("mode", ["single", "switch"])
def test_conv_gradients_match_gradcheck_for_every_conv_option(option: str, mode: str) -> None:
    torch.manual_seed(0)
    kernel = 2 if option == "same-odd" else 3
    conv = nn.Conv2d(3, 4, kernel, **CONVS[option]).double()
    geometry, pre, pad_mode = conv_geometry(conv)
    x = torch.randn(6, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    factors = _factors(4, (3, kernel, kernel), 2, 2, seed=2)
    groups = GROUPS[mode]

    def fused(x, *f):
        return FusedLoRA.apply(F.pad(x, pre, mode=pad_mode) if pre else x, conv.weight, conv.bias, geometry, groups, *f)

    assert torch.autograd.gradcheck(fused, (x, *factors), fast_mode=True)
    got = fused(x, *factors)
    want = _reference(lambda t, w, b: conv._conv_forward(t, w, b), x, conv.weight, conv.bias, groups, factors)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims: int) -> None:
    conv = (nn.Conv1d(2, 3, 3, padding=1, stride=2) if dims == 1 else nn.Conv3d(2, 3, 3, padding=1)).double()
    geometry, pre, _ = conv_geometry(conv)
    assert pre is None
    x = torch.randn(4, 2, *([4] * dims), dtype=torch.float64, requires_grad=True)
    factors = _factors(3, (2, *([3] * dims)), 2, 1, seed=3)
    groups = ((0, 4, ((0, 0.5),)),)
    assert torch.autograd.gradcheck(lambda x, *f: FusedLoRA.apply(x, conv.weight, conv.bias, geometry, groups, *f),
                                    (x, *factors), fast_mode=True)  # fmt: skip


def test_the_backbone_weight_is_only_read() -> None:
    weight = torch.randn(4, 5)
    before = weight.clone()
    x = torch.randn(8, 5, requires_grad=True)
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    FusedLoRA.apply(x, weight, None, None, ((0, 8, ((0, 2.0),)),), a, b).square().sum().backward()
    assert torch.equal(weight, before) and weight.grad is None
    assert a.grad.abs().max() > 0 and b.grad.abs().max() > 0


def test_grouped_convs_are_left_to_the_plain_path() -> None:
    assert conv_geometry(nn.Conv2d(4, 4, 3, groups=2)) is None


def test_merge_pays_where_the_output_has_more_positions_than_channels() -> None:
    w = torch.empty(512, 64)
    assert merge_pays(torch.empty(64, 8, 64), w, None)  # 512 token rows, 512 outputs
    assert not merge_pays(torch.empty(4, 64), w, None)
    conv_w = torch.empty(512, 512, 3, 3)
    assert not merge_pays(torch.empty(64, 512, 1, 1), conv_w, (1, 1))  # resnet18's last stage on 32 px
    assert merge_pays(torch.empty(64, 64, 8, 8), torch.empty(64, 64, 3, 3), (1, 1))


@pytest.mark.parametrize("conv", [False, True])
def test_second_derivatives_match_gradgradcheck(conv: bool) -> None:
    """backward(create_graph=True) (Hessian-vector products, gradient penalties, meta-learning) differentiates
    the unfolded forward: the saved A⋆x carry no history, so the first-order formulas would be wrong here."""
    torch.manual_seed(0)
    groups = GROUPS["switch"]
    if conv:
        module = nn.Conv2d(2, 3, 3, padding=1).double()
        geometry, _, _ = conv_geometry(module)
        x = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        factors = _factors(3, (2, 3, 3), 2, 2, seed=4)
        weight, bias = module.weight, module.bias
    else:
        geometry = None
        x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
        factors = _factors(4, (5,), 2, 2, seed=4)
        weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def fused(x, *f):
        return FusedLoRA.apply(x, weight, bias, geometry, groups, *f)

    assert torch.autograd.gradgradcheck(fused, (x, *factors), fast_mode=True)


def _small_model():
    from adapter_hub import AdapterModel, LoRAConfig

    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 5)))
    model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "2"]))
    with torch.no_grad():
        for name, p in model.adapters["a"].named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.activate("a")
    return model.train()


def test_autocast_training_runs_the_plain_path() -> None:
    model = _small_model()
    x = torch.randn(8, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    grads = [p.grad for n, p in model.adapters["a"].named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)


def test_torch_func_grad_gives_autograds_gradients() -> None:
    from torch.func import functional_call, grad

    model = _small_model()
    x = torch.randn(8, 3, 5, 5)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    for n, p in params.items():
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


def _graph_nodes(t: torch.Tensor) -> list:
    """Every node of the autograd graph that produced ``t``."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        todo += [n for n, _ in node.next_functions]
    return list(seen.values())


def _batch_sized_fills(run, batch: int) -> list[tuple[str, str]]:
    """The zero-fills of whole activations (4-D, ``batch`` rows, at least 16 channels: not a rank-r tensor of the
    deltas, whose fills depend on the thread count) that ``run()`` makes: what a slice's gradient costs."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        run()
    return sorted((e.name, str(e.input_shapes)) for e in prof.events()
                  if e.name in ("aten::zeros", "aten::zero_", "aten::fill_", "aten::new_zeros")
                  and any(len(shape) == 4 and shape[0] == batch and shape[1] >= 16
                          for shape in e.input_shapes if isinstance(shape, list)))  # fmt: skip


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_plain_path_takes_bs_gradient_in_one_product_and_a_switch_splits_its_rows_once(dropout: float) -> None:
    """Two costs a training step does not pay, read off its autograd graph and its ops (a resnet18 on 32-pixel
    images): B applied where a fold does not pay (the last stage: one position per sample) is a product whose
    gradient is one (out, r) matmul, not one per sample of an expanded B (8 ms and 1 MiB a layer there); and in a
    per-sample Switch each adapter's layers, own BatchNorms and head get its rows from one split of the batch,
    not from a slice whose gradient is a zero-filled, batch-sized tensor per adapter and layer. With dropout the
    deltas run the plain per-layer path (``add_deltas``), without it the fused one and, on the last stage, the
    fallback with A apart: each is covered."""
    import torchvision

    from adapter_hub import AdapterModel, LoRAConfig, Switch

    torch.manual_seed(0)
    model = AdapterModel(torchvision.models.resnet18(num_classes=10)).train()
    for name in ("a", "b"):
        model.add_adapter(name, LoRAConfig(r=4, targets=["layer*.conv*"], heads=["fc"], dropout=dropout))
    x = torch.randn(8, 3, 32, 32)
    model.activate("a")
    alone = model(x).sum()
    nodes = {type(n).__name__ for n in _graph_nodes(alone)}
    assert "ExpandBackward0" not in nodes
    assert ("FusedLoRABackward" in nodes) == (dropout == 0.0)
    own_fills = _batch_sized_fills(alone.backward, batch=8)  # the network's own (max-pool's gradient)
    model.activate(Switch("a", "b"))
    out = model(x, route=["a", "b"] * 4)
    loss = out.by_adapter["a"].sum() + out.by_adapter["b"].sum()
    graph = _graph_nodes(loss)
    assert "ExpandBackward0" not in {type(n).__name__ for n in graph}
    norms = [n for n in graph if type(n).__name__ == "NativeBatchNormBackward0"]
    assert len(norms) == 2 * 20  # every BatchNorm of resnet18, once per adapter
    fed_by = {type(n.next_functions[0][0]).__name__ for n in norms}
    assert "SliceBackward0" not in fed_by and "SplitWithSizesBackward0" in fed_by, fed_by
    assert _batch_sized_fills(loss.backward, batch=8) == own_fills
