"""The adapter record: everything an adapter file holds, as plain data.

A record is what ``AdapterModel.export_record`` gives and ``AdapterModel.add_adapter_from_record``
takes; the codecs (``adapter_file`` for adapter-hub's safetensors file, ``peft`` for a PEFT directory)
only translate records to and from bytes, so none of them needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..lora import LoRAConfig


@dataclass(eq=False)  # tensors have no single truth value, so records compare by identity
class AdapterRecord:
    """One adapter as data.

    ``config``: the adapter's LoRAConfig as it was made (its ``heads`` may still be patterns).
    ``layers``: module path -> the LoRA layer's ``spec()`` (type, r, alpha; rank and a_groups for a conv).
    ``heads``: the module paths of the heads trained in full.
    ``norms``: the module paths of the normalisation layers the adapter owns (``LoRAConfig.norm_layers``),
    their state (affine parameters, running statistics) under their paths like a head's.
    ``tensors``: every tensor under its file key ``<module path>.<state key>``, e.g.
    ``layer1.0.conv1.lora_A.weight`` or ``fc.weight``; a DoRA adapter (``config.use_dora``) also has each
    layer's magnitude, shape (out,), under ``<module path>.lora_magnitude_vector``.
    ``metadata``: the adapter's JSON-able metadata (a combine recipe, where it was imported from...).
    ``fingerprint``: sha256 of the backbone it was made for ("" when unknown, as for a PEFT directory).
    ``source``: where it was read from, named in error messages.
    """

    config: LoRAConfig
    layers: dict[str, dict[str, Any]]
    heads: list[str]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    source: str = "adapter data"
    norms: list[str] = field(default_factory=list)

