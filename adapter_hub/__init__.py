"""adapter-hub: one frozen backbone, many LoRA adapters."""

from __future__ import annotations

__version__ = "0.1.0"
