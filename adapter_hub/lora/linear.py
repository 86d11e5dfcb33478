"""LoRA for nn.Linear."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoRALayer, init_a


class LoRALinear(LoRALayer):
    """y = W0·x + s·B·A·x with A ∈ R^{r×in}, B ∈ R^{out×r}, s = α/r (rsLoRA: α/√r).

    ΔW = s·B·A has the base weight's shape (out, in). B starts at zero, so a new adapter is a no-op.

    DoRA (``use_dora=True``): y = m/‖W0 + ΔW‖·(W0 + ΔW)·x + b, m ∈ R^{out}, the norm of each row of
    W0 + ΔW (one per output feature), detached in training — PEFT's ``use_dora`` for nn.Linear.
    """

    supports_dora = True

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self._setup(r, alpha, use_rslora, dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        init_a(self.lora_A.weight, init, r)
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            self._setup_dora(base.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def base_plain(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.delta_weight()}

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        return {"weight": [(self.lora_B.weight * self.scaling, self.lora_A.weight)]}

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        ((b, a),) = factors["weight"]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b / self.scaling)


class LoRATransposedLinear(LoRALinear):
    """LoRA for a linear layer that stores its weight transposed, W0 ∈ R^{in×out} with y = x·W0 + b:
    transformers' ``Conv1D`` (GPT-2, GPT-J-style blocks). Found by duck typing (``lora_class_for``), so
    transformers is never imported here.

    y = x·W0 + s·B·A·x with A ∈ R^{r×in}, B ∈ R^{out×r}: the same maths and factors as LoRALinear (PEFT's
    ``fan_in_fan_out=True`` layout); only ΔW is given in the base weight's layout, ΔW = s·(B·A)ᵀ ∈ R^{in×out},
    so merging adds it to W0 as stored. With DoRA the output channels are W0's columns: m ∈ R^{out} and the
    norm of each column of W0 + ΔW (PEFT's DoRA with ``fan_in_fan_out=True``).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_dora: bool = False,
    ) -> None:
        in_features, out_features = base.weight.shape
        # LoRALinear reads only the sizes and the weight's device and dtype (and the weight itself for DoRA,
        # through _rows, which reads it transposed)
        shape = SimpleNamespace(in_features=in_features, out_features=out_features, weight=base.weight)
        super().__init__(  # type: ignore[arg-type]
            shape, r, alpha, use_rslora=use_rslora, dropout=dropout, init=init, use_dora=use_dora
        )

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().t()  # the factors (and so combine) keep LoRALinear's layout

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # stored (in, out): the output channels are the columns

    def _from_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rows.t()

    def base_plain(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight
