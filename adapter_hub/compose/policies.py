"""How live adapters combine at forward time: Stack (deltas summed) and Switch (routed per sample)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, init=False)
class Stack:
    """W·x + Σ wᵢ·ΔWᵢ·x at every adapted layer: deltas summed on the same input, never chained.

    ``head`` names the adapter whose task head runs — usually one of the stack, but any adapter of the
    model may lend its head (e.g. a combined multi-task adapter evaluated with each task's head); by
    default the first stacked adapter that has one; ``head=""`` keeps the backbone's own module.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    head: str | None

    def __init__(self, *names: str, weights: Sequence[float] | None = None, head: str | None = None) -> None:
        if not names:
            raise ConfigError("Stack needs at least one adapter name")
        w = tuple(float(x) for x in weights) if weights is not None else (1.0,) * len(names)
        if len(w) != len(names):
            raise ConfigError(f"Stack got {len(names)} adapters but {len(w)} weights")
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "head", head)

    @property
    def weighted(self) -> tuple[tuple[str, float], ...]:
        return tuple(zip(self.names, self.weights))


@dataclass(frozen=True, init=False)
class Switch:
    """Each sample routed to one adapter (or None for the bare backbone) with its own head:
    ``model.activate(Switch("a", "b")); model(x, route=["a", "b", None, ...])``."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        if not names:
            raise ConfigError("Switch needs at least one adapter name")
        object.__setattr__(self, "names", tuple(names))
