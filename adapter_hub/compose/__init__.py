"""Composition, all in one place: how adapters act together and how they are combined into one.

- ``policies``: ``Stack`` (deltas summed) and ``Switch`` (one adapter per sample), what ``model.activate`` takes;
- ``routing``: the per-sample ``Plan`` (the batch sorted by adapter once) and the ``RoutedOutput`` a Switch returns;
- ``sites`` / ``attention_site``: the runtime that executes a policy, one site per adapted module or head,
  sharing one ``Routing``; a site also merges (folds deltas into the backbone weights) and unmerges;
- ``combine`` and ``methods``: combining adapters into a new adapter (linear, svd, ties, dare_*, ...), the
  per-layer maths being pure tensor functions in ``methods``.

The LoRA maths of each delta is in ``adapter_hub.lora``.
"""

from .policies import Stack, Switch
from .routing import RoutedOutput

__all__ = ["RoutedOutput", "Stack", "Switch"]
