"""LoRA for nn.MultiheadAttention (as in torchvision's VisionTransformer): in_proj and out_proj."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoRALayer, init_a
from .linear import LoRALinear


class LoRAMultiheadAttention(LoRALayer):
    """Deltas on both projections of an nn.MultiheadAttention with packed q/k/v weights:

        [q; k; v] = W_in·x + s·B·A·x      A ∈ R^{r×E}, B ∈ R^{3E×r}   (ΔW_in = s·B·A, shape (3E, E))
        out       = W_o·h + s·B_o·A_o·h    ΔW_o = s·B_o·A_o, shape (E, E)

    For cross-attention the three row blocks of B apply to query, key and value respectively, which is
    exactly W_in + ΔW_in applied block by block. The attention itself is run by the caller.
    """

    def __init__(
        self,
        base: nn.MultiheadAttention,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim or base.in_proj_weight is None:
            raise TypeError("MultiheadAttention with separate kdim/vdim projections has no LoRA variant")
        if base.bias_k is not None or base.add_zero_attn:
            raise TypeError("MultiheadAttention with add_bias_kv or add_zero_attn has no LoRA variant")
        self._setup(r, alpha, use_rslora, dropout)
        e = base.embed_dim
        factory = {"device": base.in_proj_weight.device, "dtype": base.in_proj_weight.dtype}
        self.lora_A = nn.Linear(e, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, 3 * e, bias=False, **factory)
        init_a(self.lora_A.weight, init, r)
        nn.init.zeros_(self.lora_B.weight)
        self.out_proj = LoRALinear(base.out_proj, r, alpha, use_rslora=use_rslora, dropout=dropout, init=init)
        self.embed_dim = e

    def in_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·x for self-attention: the (…, 3E) correction of the packed q/k/v projection."""
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def in_delta_part(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """The correction of one projection block (0: query, 1: key, 2: value) for cross-attention."""
        e = self.embed_dim
        b_part = self.lora_B.weight[part * e : (part + 1) * e]
        return self.lora_A(self.dropout(x)) @ b_part.t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_delta(x)

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        return {
            "in_proj_weight": [(self.lora_B.weight * self.scaling, self.lora_A.weight)],
            "out_proj.weight": self.out_proj.factors()["weight"],
        }

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        ((b, a),) = factors["in_proj_weight"]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b / self.scaling)
        self.out_proj.set_factors({"weight": factors["out_proj.weight"]})

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {
            "in_proj_weight": (self.lora_B.weight @ self.lora_A.weight) * self.scaling,
            "out_proj.weight": self.out_proj.delta_weight(),
        }
