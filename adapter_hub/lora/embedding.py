"""LoRA for nn.Embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoRALayer


class LoRAEmbedding(LoRALayer):
    """E'[i] = E0[i] + s·(B·A)ᵀ[i] with A ∈ R^{r×num}, B ∈ R^{dim×r}.

    The lookup of row i in ΔW = s·(B·A)ᵀ is s·B·A[:, i], so the forward gathers columns of A and
    projects them with B. As in PEFT, A starts at zero and B is Gaussian (the lookup would otherwise
    select rows of a zero matrix and never learn).
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self._setup(r, alpha, use_rslora, dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.num_embeddings, r, bias=False, **factory)  # weight (r, num)
        self.lora_B = nn.Linear(r, base.embedding_dim, bias=False, **factory)  # weight (dim, r)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight)
        self._padding_idx = base.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # dropout is not applied to integer ids
        after_a = F.embedding(ids, self.lora_A.weight.t(), padding_idx=self._padding_idx)
        return self.lora_B(after_a) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight).t() * self.scaling

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.delta_weight()}

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        # ΔW (num, dim) = (s·Aᵀ)·Bᵀ
        return {"weight": [(self.lora_A.weight.t() * self.scaling, self.lora_B.weight.t())]}

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        ((b, a),) = factors["weight"]
        self.lora_A.weight.copy_(b.t())
        self.lora_B.weight.copy_(a.t() / self.scaling)
