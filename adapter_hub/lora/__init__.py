"""The LoRA maths: one module a base layer type, its config and ``lora_class_for``. Imports nothing else of
adapter_hub.

Only the maths lives here: what a delta is, its factors and its merge blockers. The runtime that executes a
composition policy on a model (``Routing`` and the per-module sites that add, route and merge the deltas,
and ``plain_copy``, which undoes a site's takeover of a module's forward) is in ``adapter_hub.compose``."""

from __future__ import annotations

from torch import nn

from .attention import LoRAMultiheadAttention
from .base import LoRAConfigError, LoRALayer, lora_scaling
from .config import NORM_LAYERS, LoRAConfig, is_norm, matches
from .conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, grouped_rank
from .embedding import LoRAEmbedding
from .linear import LoRALinear, LoRATransposedLinear

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


def _is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out). Recognised by its
    class and module name and its attributes, so that transformers is imported only by models that use it."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    if _is_transposed_linear(module):
        return LoRATransposedLinear
    return LORA_CLASSES.get(type(module))


__all__ = [
    "LORA_CLASSES",
    "NORM_LAYERS",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRATransposedLinear",
    "grouped_rank",
    "is_norm",
    "lora_class_for",
    "lora_scaling",
    "matches",
]
