"""LoRAConfig: which modules get deltas, of which rank, and which modules are trained in full."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping
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


# Which normalisation layers an adapter owns (``LoRAConfig.norm_layers``).
NORM_LAYERS = ("batchnorm", "all", "frozen")
# Norm classes of other libraries (transformers' T5LayerNorm, LlamaRMSNorm...) are known by their name.
_NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")
_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # torch >= 2.4


def is_norm(module: nn.Module, norm_layers: str) -> bool:
    """Whether an adapter with ``norm_layers`` owns ``module``: ``"batchnorm"`` every BatchNorm1d/2d/3d (and
    SyncBatchNorm), ``"all"`` also GroupNorm, LayerNorm, RMSNorm and InstanceNorm, ``"frozen"`` none. A norm
    with nothing to own (no affine parameters, no running statistics) is left to the backbone."""
    if norm_layers == "frozen":
        return False
    owned = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    if not owned:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    if norm_layers != "all":
        return False
    kinds = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm, *_RMS)
    return isinstance(module, kinds) or type(module).__name__.endswith(_NORM_SUFFIXES)


@dataclass
class LoRAConfig:
    """Configuration of one adapter.

    ``targets``: glob patterns over module names (``"layer*.conv*"``) and/or module classes
    (``nn.Conv2d`` or ``"Conv2d"``). ``heads``: modules trained in full and kept per adapter (a task
    head); a module listed there gets no delta. ``rank_pattern`` / ``alpha_pattern`` override r and α
    for the modules whose name matches a glob key (first match wins). ``use_dora``: DoRA (weight-decomposed
    LoRA) on every target — a trainable magnitude per output channel, y = m/‖W + ΔW‖·(W + ΔW)⋆x + b (Linear,
    transformers' Conv1D and Conv1d/2d/3d targets only; see ``LoRALayer``).

    ``norm_layers``: the normalisation layers each adapter owns (see :func:`is_norm`) — a copy of the
    backbone's layer per adapter whose affine parameters train and whose running statistics (BatchNorm)
    update in training mode and are used in eval, stored with the adapter. ``"batchnorm"`` (the default)
    owns every BatchNorm: a BatchNorm's running statistics are the source domain's, and a new domain needs its
    own (Rebuffi et al.'s domain-specific normalisation); per-sample norms (LayerNorm, GroupNorm) re-normalise
    every input by themselves, so ``"all"`` adds only their affine parameters. ``"frozen"``: the backbone's
    layers run for every adapter. The backbone's own layers never change either way.
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
    norm_layers: str = "batchnorm"

    def __post_init__(self) -> None:
        # A config also arrives from files (an adapter file's header, a registry record): every field is
        # checked for its type and range here, so a hostile value is one LoRAConfigError, not a wrong number.
        self.targets = _patterns("targets", self.targets)
        self.heads = _patterns("heads", self.heads)
        self.r = _rank("r", self.r)
        self.alpha = _alpha("alpha", self.alpha)
        self.rank_pattern = {
            k: _rank(f"rank_pattern[{k!r}]", v) for k, v in _mapping("rank_pattern", self.rank_pattern)
        }
        self.alpha_pattern = {
            k: _alpha(f"alpha_pattern[{k!r}]", v) for k, v in _mapping("alpha_pattern", self.alpha_pattern)
        }
        self.dropout = _finite("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self.use_rslora = _flag("use_rslora", self.use_rslora)
        self.use_dora = _flag("use_dora", self.use_dora)
        if not isinstance(self.norm_layers, str) or self.norm_layers not in NORM_LAYERS:
            raise LoRAConfigError(f"unknown norm_layers {self.norm_layers!r}; choose one of {', '.join(NORM_LAYERS)}")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise LoRAConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")

    def rank_for(self, path: str) -> int:
        return next((r for k, r in self.rank_pattern.items() if fnmatchcase(path, k)), self.r)

    def alpha_for(self, path: str) -> float:
        return next((a for k, a in self.alpha_pattern.items() if fnmatchcase(path, k)), self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LoRAConfig:
        """The config of a stored dict. A dict without ``norm_layers`` was written before adapters owned
        norms, when every adapter ran the backbone's: it reads as ``"frozen"``."""
        if not isinstance(data, dict):
            raise LoRAConfigError(f"a LoRA config must be a mapping, got {type(data).__name__}")
        known = cls.__dataclass_fields__
        return cls(**{"norm_layers": "frozen", **{k: v for k, v in data.items() if k in known}})


def _patterns(name: str, value: Any) -> list[str]:
    """Module patterns from a string, a class, or any collection of them (a list, a tuple, a set as PEFT's
    target_modules often is: sorted, so the config is the same whatever the set's order)."""
    if isinstance(value, str | type):
        value = [value]
    elif isinstance(value, set | frozenset):
        value = sorted(value, key=_pattern)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str | type) for v in value):
        raise LoRAConfigError(f"{name} must be a list of module names or patterns, got {_shown(value)}")
    patterns = [_pattern(v) for v in value]
    if not all(p.strip() for p in patterns):
        raise LoRAConfigError(f"{name} holds an empty pattern")
    return patterns


# r beyond this allocates factors wider than any layer this product adapts (and gigabytes with them)
MAX_R = 65_536
# α beyond this (s = α/r) scales a delta past anything trainable; 0 makes the delta vanish
MAX_ALPHA = 1e9


def _rank(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool) or (hasattr(value, "dtype") and value.dtype == bool):
            raise TypeError
        number = operator.index(value)  # ints, numpy integers, 0-dim integer tensors
    except TypeError:
        number = None
    if number is None or not 1 <= number <= MAX_R:
        raise LoRAConfigError(f"LoRA rank must be a positive integer of at most {MAX_R:,}: {name} = {_shown(value)}")
    return number


def _number(name: str, value: Any) -> float:
    """``value`` as a float: a number, a numpy scalar or a 0-dim tensor (an int too large for a float is nan,
    which ``_finite`` refuses as such)."""
    if isinstance(value, str | bytes | bool):
        raise LoRAConfigError(f"{name} must be a number, got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:
        return math.nan
    except (TypeError, ValueError):
        raise LoRAConfigError(f"{name} must be a number, got {_shown(value)}") from None


def _finite(name: str, value: Any) -> float:
    number = _number(name, value)
    if not math.isfinite(number):
        raise LoRAConfigError(f"{name} must be a finite number, got {_shown(value)}")
    return number


def _alpha(name: str, value: Any) -> float:
    number = _finite(name, value)
    if number == 0 or abs(number) > MAX_ALPHA:
        raise LoRAConfigError(f"{name} must be non-zero and at most {MAX_ALPHA:g} in size, got {_shown(value)}")
    return number


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy's too
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise LoRAConfigError(f"{name} must be true or false, got {_shown(value)}")


def _mapping(name: str, value: Any) -> list[tuple[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise LoRAConfigError(f"{name} must map module patterns to numbers, got {_shown(value)}")
    return list(value.items())


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"
