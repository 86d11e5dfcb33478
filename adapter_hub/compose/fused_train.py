"""The training step of a linear map or an ungrouped conv carrying LoRA deltas, at the cost of the bare layer.

For active deltas i with factors Aᵢ (r×in), Bᵢ (out×r) and coefficients cᵢ = weight·scaling, the layer computes

    y = W⋆x + Σᵢ cᵢ·Bᵢ·(Aᵢ⋆x) + b = W'⋆x + b,      W' = W + Σᵢ cᵢ·Bᵢ·Aᵢ      (⋆: a linear map or a conv)

and training needs the gradients of Aᵢ, Bᵢ and x, never of the frozen W. With g = ∂L/∂y:

    ∂L/∂x  = W'ᵀ⋆g                       one transposed op, as large as the bare layer's own
    gᵢ     = cᵢ·Bᵢᵀ·g                     the gradient reaching Aᵢ⋆x (a pointwise map over channels)
    ∂L/∂Aᵢ = weight-gradient of Aᵢ⋆x at gᵢ  r/out of a full weight gradient
    ∂L/∂Bᵢ = cᵢ·Σ g·(Aᵢ⋆x)ᵀ               summed over rows and positions

The forward runs one op with the stacked weight [W'; A₁; …], which yields y and every Aᵢ⋆x in one pass
over x. Autograd left to itself would differentiate that stacked weight in full — the weight gradient of
full fine-tuning — so this ``torch.autograd.Function`` states the backward above instead: the bare layer's
input gradient, plus products r/out its size. PEFT runs A, B and the sum as separate layers (two extra
passes over x and one over its gradient). The folded W' changes the order of the sums, so outputs agree
with the unfolded W⋆x + c·B·(A⋆x) to rounding; the backbone's W itself is only read.

Convs with groups = 1 only (``conv_geometry``); padding other than zeros given as numbers is applied to x
before the op, as ``nn.Conv``'s own forward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ConvGeometry:
    """What ``torch.ops.aten.convolution_backward`` needs besides the tensors (groups is 1)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.stride) - 1]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def input_grad(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._backward(g, x, weight, (True, False, False))[0]

    def weight_grad(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._backward(g, x, weight, (False, True, False))[1]

    def _backward(self, g, x, weight, mask):
        n = len(self.stride)
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, self.stride, self.padding, self.dilation, False, (0,) * n, 1, mask
        )


def conv_geometry(module: nn.modules.conv._ConvNd) -> tuple[ConvGeometry, tuple[int, ...] | None, str] | None:
    """The geometry of ``module`` for this path, and the padding to apply to x first with its ``F.pad`` mode
    (a ``padding_mode`` other than zeros, or an odd total of ``"same"``); None for a grouped conv."""
    if module.groups != 1:
        return None
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":  # what nn.Conv's own forward does: pad x, then a conv without padding
        return ConvGeometry(tuple(module.stride), (0,) * n, tuple(module.dilation)), tuple(
            module._reversed_padding_repeated_twice
        ), module.padding_mode
    pre: tuple[int, ...] | None = None
    if module.padding == "valid":
        padding = (0,) * n
    elif module.padding == "same":
        # an even total puts half on each side; an odd one is applied to x first, the extra on the far side
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if all(t % 2 == 0 for t in totals):
            padding = tuple(t // 2 for t in totals)
        else:
            padding = (0,) * n
            pre = tuple(p for t in reversed(totals) for p in (t // 2, t - t // 2))
    else:
        padding = tuple(module.padding)
    return ConvGeometry(tuple(module.stride), padding, tuple(module.dilation)), pre, "constant"


def merge_pays(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...] | None) -> bool:
    """Whether folding W' = W + Σ cᵢ·Bᵢ·Aᵢ is cheaper than running each Aᵢ apart on x.

    Folding costs about out·in·r (twice: forward and backward, each a pass over W) and saves about
    positions·in·r (the separate Aᵢ⋆x and its input gradient), where positions counts the output's rows and
    spatial positions. It pays where the output has at least as many positions as the layer has output
    channels: a resnet18's early stages at batch 64, a Transformer's linear layers; a resnet18's last stage
    on 32-pixel images (one position per sample, 512 channels) runs each A apart."""
    if stride is None:  # a linear map: every row of x is a position
        positions = x.numel() // max(1, x.shape[-1])
    else:
        positions = x.shape[0]
        for size, step in zip(x.shape[2:], stride):
            positions *= max(1, size // step)
    return positions >= weight.shape[0]


# One group of rows: (start, end, ((index of an adapter's factors, cᵢ), …)); no terms: the base layer alone
Group = tuple[int, int, tuple[tuple[int, float], ...]]


class FusedLoRA(torch.autograd.Function):
    """y = W'⋆x + b with W' = W + Σ cᵢ·Bᵢ·Aᵢ on each group of rows; see the module docstring for the backward.

    ``apply(x, weight, bias, geometry, groups, *factors)``: ``geometry`` is None for a linear map (x of any
    leading shape, features last) or a ``ConvGeometry``; ``factors`` = A₀, B₀, A₁, B₁, … with Aᵢ in the base
    weight's layout (r, in, *kernel) and Bᵢ a matrix (out, r); ``groups`` cover the rows of x (dimension 0)
    in order, each with the deltas it sums — one group of all rows for a single adapter or a stack, one per
    adapter's rows for a per-sample switch. The base weight and bias must not require grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, groups, *factors):  # type: ignore[override]
        out_features = weight.shape[0]
        outs, a_outs = [], []
        for start, end, terms in groups:
            rows = x if (start, end) == (0, x.shape[0]) else x[start:end]
            if not terms:
                outs.append(_op(geometry, rows, weight, bias))
                a_outs.append(None)
                continue
            a_ws = [factors[2 * i] for i, _ in terms]
            stacked = _stacked(weight, a_ws, [factors[2 * i + 1] for i, _ in terms], [c for _, c in terms])
            extra = stacked.shape[0] - out_features
            b_all = torch.cat([bias, bias.new_zeros(extra)]) if bias is not None else None
            y = _op(geometry, rows, stacked, b_all)
            outs.append(y[..., :out_features] if geometry is None else y[:, :out_features])
            # A⋆x is kept for B's gradient (r channels, not the whole stacked output)
            a_outs.append((y[..., out_features:] if geometry is None else y[:, out_features:]).contiguous())
        ctx.geometry, ctx.groups, ctx.bias = geometry, groups, bias
        ctx.a_outs = [i for i, a in enumerate(a_outs) if a is not None]
        ctx.save_for_backward(x, weight, *factors, *(a for a in a_outs if a is not None))
        return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, *rest = ctx.saved_tensors
        geometry, groups = ctx.geometry, ctx.groups
        n_factors = len(rest) - len(ctx.a_outs)
        factors, a_outs = rest[:n_factors], dict(zip(ctx.a_outs, rest[n_factors:]))
        if torch.is_grad_enabled():
            # backward(create_graph=True): the saved A⋆x carry no history, so the formulas below would give
            # wrong second derivatives; differentiate the unfolded forward instead (rare, and exact)
            return _graph_backward(ctx, g, x, weight, factors)
        g = g.contiguous()
        grads: list[torch.Tensor | None] = [None] * n_factors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] and len(groups) > 1 else None
        for k, (start, end, terms) in enumerate(groups):
            whole = (start, end) == (0, x.shape[0])
            g_rows, x_rows = (g, x) if whole else (g[start:end], x[start:end])
            a_ws = [factors[2 * i] for i, _ in terms]
            b_ws = [factors[2 * i + 1] for i, _ in terms]
            coefs = [c for _, c in terms]
            if terms:
                grad_a_all, grad_b_all = _factor_grads(geometry, g_rows, x_rows, a_outs[k], a_ws, b_ws, coefs)
                lo = 0
                for (i, c), a in zip(terms, a_ws):
                    hi = lo + a.shape[0]
                    _accumulate(grads, 2 * i, grad_a_all[lo:hi])
                    _accumulate(grads, 2 * i + 1, grad_b_all[:, lo:hi] * c)
                    lo = hi
            if ctx.needs_input_grad[0]:
                merged = _merged(weight, a_ws, b_ws, coefs) if terms else weight
                gx = g_rows @ merged if geometry is None else geometry.input_grad(g_rows, x_rows, merged)
                if grad_x is None:
                    grad_x = gx
                else:
                    grad_x[start:end] = gx
        return grad_x, None, None, None, None, *grads


def _graph_backward(ctx, g, x, weight, factors):
    """The gradients as a differentiable graph: W⋆x + Σ cᵢ·Bᵢ·(Aᵢ⋆x) per group rebuilt with autograd ops."""
    bias = ctx.bias
    outs = []
    for start, end, terms in ctx.groups:
        rows = x[start:end]
        y = _op(ctx.geometry, rows, weight, bias)
        for i, c in terms:
            ax = _op(ctx.geometry, rows, factors[2 * i], None)
            b = factors[2 * i + 1]
            y = y + c * (ax @ b.t() if ctx.geometry is None else torch.einsum("or,nr...->no...", b, ax))
        outs.append(y)
    wanted = [(k, t) for k, t in ((0, x), *((5 + i, f) for i, f in enumerate(factors))) if ctx.needs_input_grad[k]]
    found = torch.autograd.grad(torch.cat(outs), [t for _, t in wanted], g, create_graph=True, allow_unused=True)
    grads: list[Tensor | None] = [None] * (5 + len(factors))
    for (k, _), grad in zip(wanted, found):
        grads[k] = grad
    return tuple(grads)


def _op(geometry: ConvGeometry | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Tensor:
    return F.linear(x, weight, bias) if geometry is None else geometry.forward(x, weight, bias)


def _factor_grads(geometry, g, x, a_out, a_ws, b_ws, coefs) -> tuple[torch.Tensor, torch.Tensor]:
    """∂L/∂[A₁; A₂; …] and ∂L/∂[B₁ B₂ …] before the cᵢ, for one group of rows."""
    # [c₁B₁ c₂B₂ …] (out, Σr): its transpose maps g to every gᵢ at once
    b_all = torch.cat([b * c for b, c in zip(b_ws, coefs)], dim=1)
    a_all = torch.cat(a_ws) if len(a_ws) > 1 else a_ws[0]
    if geometry is None:
        g2, x2, a2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), a_out.reshape(-1, a_out.shape[-1])
        g_a = g2 @ b_all  # (rows, Σr)
        return g_a.t() @ x2, g2.t() @ a2
    # B as a pointwise conv Σr → out: one call gives every gᵢ (its input gradient) and B's weight gradient
    spatial = (1,) * (g.dim() - 2)
    pointwise = ConvGeometry(spatial, (0,) * len(spatial), spatial)
    g_a, grad_b_all, _ = pointwise._backward(g, a_out, b_all.reshape(*b_all.shape, *spatial), (True, True, False))
    return geometry.weight_grad(g_a, x, a_all), grad_b_all.reshape(b_all.shape)


def _accumulate(grads: list[torch.Tensor | None], i: int, grad: torch.Tensor) -> None:
    grads[i] = grad if grads[i] is None else grads[i] + grad


def _merged(weight: torch.Tensor, a_ws, b_ws, coefs) -> torch.Tensor:
    """W' = W + Σ cᵢ·Bᵢ·Aᵢ in W's shape (a conv's A flattened to (r, in·kernel) for the product)."""
    flat = weight.reshape(weight.shape[0], -1).clone()
    for a, b, c in zip(a_ws, b_ws, coefs):
        flat.addmm_(b, a.reshape(a.shape[0], -1), alpha=c)
    return flat.view(weight.shape)


def _stacked(weight: torch.Tensor, a_ws, b_ws, coefs) -> torch.Tensor:
    """[W'; A₁; A₂; …] in one buffer: W' written in place into its top rows."""
    out = weight.shape[0]
    rows = out + sum(a.shape[0] for a in a_ws)
    buf = weight.new_empty(rows, *weight.shape[1:])
    flat = buf.view(rows, -1)
    torch.cat([weight.reshape(out, -1), *(a.reshape(a.shape[0], -1) for a in a_ws)], out=flat)
    for a, b, c in zip(a_ws, b_ws, coefs):
        flat[:out].addmm_(b, a.reshape(a.shape[0], -1), alpha=c)
    return buf
