"""LoRAConfig: which modules get deltas, of which rank, and which modules are trained in full."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from .base import INITS, LoRAConfigError


def _pattern(target: str | type) -> str:
    return target.__name__ if isinstance(target, type) else str(target)


def matches(pattern: str, path: str, module: nn.Module) -> bool:
    """A pattern is a glob over the module's ``named_modules()`` name or over its class name."""
    return fnmatchcase(path, pattern) or fnmatchcase(type(module).__name__, pattern)


@dataclass
class LoRAConfig:
    """Configuration of one adapter.

    ``targets``: glob patterns over module names (``"layer*.conv*"``) and/or module classes
    (``nn.Conv2d`` or ``"Conv2d"``). ``heads``: modules trained in full and kept per adapter (a task
    head); a module listed there gets no delta. ``rank_pattern`` / ``alpha_pattern`` override r and α
    for the modules whose name matches a glob key (first match wins). ``use_dora``: DoRA (weight-decomposed
    LoRA) on every target — a trainable magnitude per output channel, y = m/‖W + ΔW‖·(W + ΔW)⋆x + b (Linear,
    transformers' Conv1D and Conv1d/2d/3d targets only; see ``LoRALayer``).
    """

    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    use_dora: bool = False

    def __post_init__(self) -> None:
        self.targets = [_pattern(t) for t in ([self.targets] if isinstance(self.targets, str | type) else self.targets)]
        self.heads = [_pattern(h) for h in ([self.heads] if isinstance(self.heads, str) else self.heads)]
        self.rank_pattern = {str(k): int(v) for k, v in self.rank_pattern.items()}
        self.alpha_pattern = {str(k): float(v) for k, v in self.alpha_pattern.items()}
        self.alpha = float(self.alpha)
        bad = [(k, v) for k, v in [("r", self.r), *self.rank_pattern.items()] if v <= 0]
        if bad:
            raise LoRAConfigError(f"LoRA rank must be a positive integer: {bad[0][0]} = {bad[0][1]}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.use_dora, bool):
            raise LoRAConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.init not in INITS:
            raise LoRAConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")

    def rank_for(self, path: str) -> int:
        return next((r for k, r in self.rank_pattern.items() if fnmatchcase(path, k)), self.r)

    def alpha_for(self, path: str) -> float:
        return next((a for k, a in self.alpha_pattern.items() if fnmatchcase(path, k)), self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})
