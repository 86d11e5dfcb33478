"""LoRA for nn.Embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoRALayer, check_init


class LoRAEmbedding(LoRALayer):
    """E'[i] = E0[i] + s·(B·A)ᵀ[i] with A ∈ R^{r×num}, B ∈ R^{dim×r}.

    The lookup of row i in ΔW = s·(B·A)ᵀ is s·B·A[:, i], so the forward gathers columns of A and
    projects them with B. As in loralib and PEFT, the factor that starts at zero is A and the random one
    is B (the reverse of the other layers); ΔW = 0 at the start either way. ``init`` picks B's law, so
    an adapter-wide init applies to every layer it targets, embeddings included:

        "kaiming" (default)   B ~ N(0, 1), nn.Embedding's own weight init (PEFT's embedding init)
        "gaussian"            B ~ N(0, 1/r²), the law "gaussian" gives A in the other layers

    PEFT ignores "gaussian" for an embedding (always N(0, 1)); only the init differs, the maths and the
    saved tensors do not.
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
        check_init(init)
        self._setup(r, alpha, use_rslora, dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.num_embeddings, r, bias=False, **factory)  # weight (r, num)
        self.lora_B = nn.Linear(r, base.embedding_dim, bias=False, **factory)  # weight (dim, r)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight, std=1.0 / r if init == "gaussian" else 1.0)
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
