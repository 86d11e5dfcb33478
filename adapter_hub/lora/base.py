"""What every LoRA layer shares: rank, scaling, dropout and the init helpers."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("kaiming", "gaussian")


class LoRAConfigError(ValueError):
    """A LoRA hyper-parameter that cannot be honoured (r <= 0, unknown init, dropout out of range)."""


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r with rank-stabilised LoRA (rsLoRA), so larger ranks do not shrink the update."""
    if r <= 0:
        raise LoRAConfigError(f"LoRA rank r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_a_kaiming_uniform_(weight: torch.Tensor) -> None:
    """A ~ Kaiming-uniform(a=√5), the default init of nn.Linear/nn.ConvNd weights."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_a_gaussian_(weight: torch.Tensor, r: int) -> None:
    """A ~ N(0, 1/r²), as PEFT's "gaussian" init."""
    nn.init.normal_(weight, std=1.0 / r)


def init_a(weight: torch.Tensor, init: str, r: int) -> None:
    if init == "kaiming":
        init_a_kaiming_uniform_(weight)
    elif init == "gaussian":
        init_a_gaussian_(weight, r)
    else:
        raise LoRAConfigError(f"unknown LoRA init {init!r}; choose one of {', '.join(INITS)}")


class LoRALayer(nn.Module):
    """One adapter's low-rank delta on one base layer.

    ``forward(x)`` returns only the delta's contribution s·B(A(dropout(x))); the base layer's own
    output is added by whoever calls it, so several deltas can share one base computation.
    ``delta_weights()`` gives the same delta in weight space, keyed by the base parameter it adds to.
    """

    r: int
    alpha: float
    scaling: float

    def _setup(self, r: int, alpha: float, use_rslora: bool, dropout: float) -> None:
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The delta as low-rank factors with the scaling folded in, per base parameter and per block
        (one block, or one per group of a grouped conv): ΔW_block = B·A with B (out, k), A (k, n)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Set A and B so that the delta equals the given factors (the inverse of ``factors``)."""
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        """Whether the delta can be folded into the base weight; see ``merge_blocker``."""
        return self.merge_blocker() is None

    def merge_blocker(self) -> str | None:
        """Why this delta cannot be merged, or None."""
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
