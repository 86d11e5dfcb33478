"""Backbone fingerprint: which exact network an adapter was made for."""

from __future__ import annotations

import hashlib
from itertools import chain

import torch
from torch import nn


def fingerprint(module: nn.Module) -> str:
    """sha256 (hex) over every parameter and buffer: name, shape, dtype and raw bytes, in module order."""
    h = hashlib.sha256()
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
