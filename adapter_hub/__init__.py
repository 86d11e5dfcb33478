"""adapter-hub: one frozen backbone, many LoRA adapters."""

from __future__ import annotations

from .compose import Stack, Switch
from .formats import fingerprint
from .lora import LoRAConfig
from .model import AdapterModel
from .registry import Hub

__version__ = "0.1.0"

__all__ = ["AdapterModel", "Hub", "LoRAConfig", "Stack", "Switch", "fingerprint"]
