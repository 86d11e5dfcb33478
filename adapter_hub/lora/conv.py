"""LoRA for nn.Conv1d / nn.Conv2d / nn.Conv3d — every conv option honoured, grouped convs mergeable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import LoRAConfigError, LoRALayer, init_a, spec_int

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def grouped_rank(r: int, groups: int) -> int:
    """Total rank of a grouped conv's delta: each of the g groups gets ⌈r/g⌉ (at least 1)."""
    return groups * max(1, math.ceil(r / groups))


class _LoRAConvNd(LoRALayer):
    """y = conv(x, W0) + s·B(A(x)): A is a conv in→r with the base layer's kernel size, stride,
    padding (numbers or "same"/"valid"), dilation, padding_mode and groups; B is a pointwise conv
    r→out with the same groups. Because B is pointwise, B∘A is the conv with kernel

        ΔW[o, i, …] = s · Σ_k B[o, k] · A[k, i, …]      (per group block: ΔW_g = s·B_g·A_g)

    which has exactly the base weight's grouped shape (out, in/g, *kernel), so merging is exact for
    depthwise and grouped convs too. With g groups the rank is split evenly: each group block has rank
    ⌈r/g⌉ (``grouped_rank``).

    ``a_groups=1`` builds PEFT's layout instead (A sees every input channel); such a delta crosses the
    groups of a grouped base conv, runs fine, but cannot be merged into its weight.

    ``spec()`` adds ``rank`` and ``a_groups`` to r and α: with the base conv they fix both kernels.

    DoRA (``use_dora=True``): y = m/‖W0 + ΔW‖·conv(x, W0 + ΔW) + b, m ∈ R^{out}, the norm of each output
    channel's kernel W[o] (over in/g and the kernel dims), detached in training — PEFT's ``use_dora`` for
    convs. A grouped conv needs the grouped A (``a_groups`` = groups), which makes ΔW a grouped weight.
    """

    ndim: int
    supports_dora = True

    def __init__(
        self,
        base: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
        a_groups: int | None = None,
        rank: int | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(base, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"{type(base).__name__} has no LoRA variant")
        self._setup(r, alpha, use_rslora, dropout)
        g = base.groups
        self._groups = g
        self._a_groups = g if a_groups is None else a_groups
        if self._a_groups not in (1, g):
            raise LoRAConfigError(f"a_groups must be 1 or the base groups ({g}), got {self._a_groups}")
        self._rank = rank if rank is not None else grouped_rank(r, g)
        if self._rank <= 0 or self._rank % g:
            raise LoRAConfigError(f"rank {self._rank} is not a positive multiple of the conv's groups ({g})")
        conv = _CONV[self.ndim]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = conv(
            base.in_channels,
            self.rank,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=self.a_groups,
            bias=False,
            padding_mode=base.padding_mode,
            **factory,
        )
        self.lora_B = conv(self.rank, base.out_channels, 1, groups=g, bias=False, **factory)
        init_a(self.lora_A.weight, init, r)
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            if (why := self.merge_blocker()) is not None:
                raise LoRAConfigError(f"DoRA needs ΔW as a weight to take its norm, and {why}")
            self._setup_dora(base.weight.detach())

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def groups(self) -> int:
        return self._groups

    @property
    def a_groups(self) -> int:
        return self._a_groups

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "a_groups": self.a_groups}

    @classmethod
    def spec_options(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {k: spec_int(spec, k) for k in ("rank", "a_groups") if k in spec}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * self.ndim))  # (out, 1, …): the channel dim of a batched or unbatched output

    def base_plain(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # A has the base conv's stride, padding, dilation, padding_mode and (for DoRA, see __init__) groups
        return self.lora_A._conv_forward(x, weight, None)

    def merge_blocker(self) -> str | None:
        if self.groups > 1 and self.a_groups == 1:
            return (
                f"its A mixes input channels across the base conv's {self.groups} groups, "
                "so the delta has no grouped weight to fold into"
            )
        return None

    def delta_weight(self) -> torch.Tensor:
        if (why := self.merge_blocker()) is not None:
            raise ValueError(f"this conv delta cannot be written as a weight: {why}")
        g = self.groups
        a = self.lora_A.weight  # (rank, in/g, *k)
        b = self.lora_B.weight.flatten(1)  # (out, rank/g)
        out, rg = b.shape
        kernel = a.shape[1:]
        a_blocks = a.reshape(g, rg, -1)  # group j uses A rows j·rg … (j+1)·rg
        b_blocks = b.reshape(g, out // g, rg)
        delta = torch.bmm(b_blocks, a_blocks)  # (g, out/g, in/g·k)
        return delta.reshape(out, *kernel) * self.scaling

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.delta_weight()}

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One (B_g, A_g) block per group: B_g (out/g, rank/g), A_g (rank/g, in/g·∏kernel)."""
        if (why := self.merge_blocker()) is not None:
            raise ValueError(f"this conv delta has no per-group factors: {why}")
        g = self.groups
        a = self.lora_A.weight.flatten(1)
        b = self.lora_B.weight.flatten(1) * self.scaling
        rg, og = self.rank // g, b.shape[0] // g
        return {"weight": [(b[j * og : (j + 1) * og], a[j * rg : (j + 1) * rg]) for j in range(g)]}

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        blocks = factors["weight"]
        if len(blocks) != self.groups or self.a_groups != self.groups:
            raise ValueError(f"expected {self.groups} per-group blocks for a grouped A")
        self.lora_A.weight.copy_(torch.cat([a for _, a in blocks]).reshape(self.lora_A.weight.shape))
        b = torch.cat([b for b, _ in blocks]) / self.scaling
        self.lora_B.weight.copy_(b.reshape(self.lora_B.weight.shape))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, groups={self.groups}, a_groups={self.a_groups}"


class LoRAConv1d(_LoRAConvNd):
    __doc__ = _LoRAConvNd.__doc__
    ndim = 1


class LoRAConv2d(_LoRAConvNd):
    __doc__ = _LoRAConvNd.__doc__
    ndim = 2


class LoRAConv3d(_LoRAConvNd):
    __doc__ = _LoRAConvNd.__doc__
    ndim = 3
