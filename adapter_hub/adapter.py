"""One adapter's modules, and the helpers that know a backbone's modules but no AdapterModel.

Kept apart from ``model`` so that the file codecs and ``compose.combine`` work on adapters and plain
tensors without importing the model that uses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .compose.sites import plain_copy
from .errors import AdapterFileError, TargetError
from .lora import LoRAConfig, LoRALayer

# ModuleDict keys cannot hold dots; module paths are stored with this separator instead.
SEP = "/"


def module_key(path: str) -> str:
    """The ModuleDict key of a module path (``layer1.0.conv1`` -> ``layer1/0/conv1``)."""
    return path.replace(".", SEP)


def module_path(key: str) -> str:
    """The module path of a ModuleDict key (the inverse of ``module_key``)."""
    return key.replace(SEP, ".")


class Adapter(nn.Module):
    """One adapter's trainable state: a LoRA layer per adapted module, a copy of each head, and a copy of
    each normalisation layer it owns (``LoRAConfig.norm_layers``)."""

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.metadata: dict[str, Any] = {}

    def layer_items(self) -> Iterator[tuple[str, LoRALayer]]:
        for key, layer in self.layers.items():
            yield module_path(key), layer  # type: ignore[misc]

    def head_items(self) -> Iterator[tuple[str, nn.Module]]:
        for key, head in self.heads.items():
            yield module_path(key), head

    def norm_items(self) -> Iterator[tuple[str, nn.Module]]:
        for key, norm in self.norms.items():
            yield module_path(key), norm

    def module_items(self) -> Iterator[tuple[str, nn.Module]]:
        """Every module the adapter holds under its backbone path: layers, heads, norms."""
        yield from self.layer_items()
        yield from self.head_items()
        yield from self.norm_items()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_tensors(self, *, copy: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor under its file key ``<module path>.<state key>``, detached, on the CPU and
        contiguous. Without ``copy`` a tensor already on the CPU is the adapter's own, not a copy."""
        out: dict[str, torch.Tensor] = {}
        for path, module in self.module_items():
            for key, t in module.state_dict().items():
                out[f"{path}.{key}"] = t.detach().to("cpu", copy=copy).contiguous()
        return out


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at ``path``, or a TargetError naming the path."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise TargetError(f"the backbone has no module {path!r}") from None


def head_from_tensors(
    original: nn.Module, path: str, tensors: Mapping[str, torch.Tensor], source: str = "adapter data"
) -> nn.Module:
    """A copy of the backbone's module whose tensors take the saved sizes of their first (output)
    dimension, e.g. a classifier with another number of classes. Any other change of shape is refused."""
    head = plain_copy(original)
    for owner_path, owner in head.named_modules():
        local = {**owner._parameters, **owner._buffers}
        new_outputs = set()
        for attr, t in local.items():
            key = f"{path}.{owner_path + '.' if owner_path else ''}{attr}"
            saved = tensors.get(key)
            if t is None or saved is None or saved.shape == t.shape:
                continue
            if saved.dim() != t.dim() or saved.dim() == 0 or saved.shape[1:] != t.shape[1:]:
                raise AdapterFileError(f"{source}: key {key} has shape {tuple(saved.shape)}, expected {tuple(t.shape)}")
            new_outputs.add(saved.shape[0])
            new = torch.empty(saved.shape, dtype=t.dtype, device=t.device)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(new)
            else:
                owner._buffers[attr] = new
        if len(new_outputs) > 1:
            raise AdapterFileError(f"{source}: the tensors of head {path} disagree on their output size")
        if new_outputs:
            _resize_attributes(owner)
    return head


def _resize_attributes(module: nn.Module) -> None:
    """Keep the size attributes of common layers in step with their new weight."""
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = w.shape[0]
    elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm):
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)
        else:
            module.num_features = w.shape[0]
