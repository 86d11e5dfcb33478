"""adapter-hub: one frozen backbone, many LoRA adapters."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Loaded on first use, so that `adapter-hub ls` and friends start without importing torch.
_LAZY = {
    "AdapterModel": ".model",
    "Hub": ".registry",
    "LoRAConfig": ".lora",
    "Stack": ".compose",
    "Switch": ".compose",
    "fingerprint": ".formats",
}

if TYPE_CHECKING:
    from .compose import Stack, Switch
    from .formats import fingerprint
    from .lora import LoRAConfig
    from .model import AdapterModel
    from .registry import Hub


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdapterModel", "Hub", "LoRAConfig", "Stack", "Switch", "fingerprint"]
