"""The LoRA maths: one module a base layer type, its config and ``lora_class_for``. Imports nothing else of
adapter_hub.

Only the maths lives here: what a delta is, its factors and its merge blockers. The runtime that executes a
composition policy on a model (``Routing`` and the per-module sites that add, route and merge the deltas,
and ``plain_copy``, which undoes a site's takeover of a module's forward) is in ``adapter_hub.compose``."""

from __future__ import annotations

from torch import nn

from .attention import LoRAMultiheadAttention
from .base import LoRAConfigError, LoRALayer, lora_scaling
from .config import LoRAConfig, matches
from .conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, grouped_rank
from .embedding import LoRAEmbedding
from .linear import LoRALinear

# Exact types: a subclass (e.g. a quantised or transposed variant) may compute something else.
LORA_CLASSES: dict[type[nn.Module], type[LoRALayer]] = {
    nn.Linear: LoRALinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: LoRALinear,
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Conv3d: LoRAConv3d,
    nn.Embedding: LoRAEmbedding,
    nn.MultiheadAttention: LoRAMultiheadAttention,
}


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    return LORA_CLASSES.get(type(module))


__all__ = [
    "LORA_CLASSES",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "grouped_rank",
    "lora_class_for",
    "lora_scaling",
    "matches",
]
