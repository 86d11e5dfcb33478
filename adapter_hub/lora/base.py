"""What every LoRA layer shares: rank, scaling, dropout and the init helpers."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

INITS = ("kaiming", "gaussian")

_Layer = TypeVar("_Layer", bound="LoRALayer")


class LoRAConfigError(ValueError):
    """A LoRA hyper-parameter that cannot be honoured (r <= 0, unknown init, dropout out of range)."""


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = α/r, or α/√r with rank-stabilised LoRA (rsLoRA), so larger ranks do not shrink the update."""
    if r <= 0:
        raise LoRAConfigError(f"LoRA rank r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_a_kaiming_uniform_(weight: torch.Tensor) -> None:
    """A ~ Kaiming-uniform(a=√5), the default init of nn.Linear/nn.ConvNd weights."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_a_gaussian_(weight: torch.Tensor, r: int) -> None:
    """A ~ N(0, 1/r²), as PEFT's "gaussian" init."""
    nn.init.normal_(weight, std=1.0 / r)


def check_init(init: str) -> None:
    if init not in INITS:
        raise LoRAConfigError(f"unknown LoRA init {init!r}; choose one of {', '.join(INITS)}")


def init_a(weight: torch.Tensor, init: str, r: int) -> None:
    check_init(init)
    if init == "kaiming":
        init_a_kaiming_uniform_(weight)
    else:
        init_a_gaussian_(weight, r)


def _spec_field(spec: Mapping[str, Any], key: str) -> Any:
    if key not in spec:
        raise LoRAConfigError(f"layer spec {dict(spec)!r} has no {key!r}")
    return spec[key]


def spec_int(spec: Mapping[str, Any], key: str) -> int:
    """An integer field of a layer spec (JSON ints; a bool or a float is refused, not truncated)."""
    value = _spec_field(spec, key)
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise LoRAConfigError(f"layer spec field {key!r} must be an integer, got {value!r}") from None


def spec_float(spec: Mapping[str, Any], key: str) -> float:
    value = _spec_field(spec, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoRAConfigError(f"layer spec field {key!r} must be a number, got {value!r}")
    return float(value)


class LoRALayer(nn.Module):
    """One adapter's low-rank delta on one base layer.

    ``forward(x)`` returns only the delta's contribution s·B(A(dropout(x))); the base layer's own
    output is added by whoever calls it, so several deltas can share one base computation.
    ``delta_weights()`` gives the same delta in weight space, keyed by the base parameter it adds to.

    The public geometry contract, the same for every layer type: ``r``, ``alpha``, ``scaling``,
    ``rank`` (rows of A), ``groups`` (blocks per delta) and ``a_groups`` (groups of A); ``spec()``
    writes the geometry as a JSON-able dict and ``from_spec(base, spec)`` builds the layer back from it.
    """

    r: int
    alpha: float
    scaling: float
    use_rslora: bool

    def _setup(self, r: int, alpha: float, use_rslora: bool, dropout: float) -> None:
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        """Rows of A, the rank of the whole delta: r, except for a grouped conv (see ``grouped_rank``)."""
        return self.r

    @property
    def groups(self) -> int:
        """Blocks per delta: ``factors()`` gives this many (B, A) pairs per base parameter, each of rank
        ``rank // groups``, and ΔW is block-diagonal over them. 1, except for a grouped conv."""
        return 1

    @property
    def a_groups(self) -> int:
        """Groups of A: ``groups`` when A keeps the blocks apart, 1 when A reads every input channel
        (PEFT's layout for a grouped conv, which runs but cannot merge). 1, except for a grouped conv."""
        return 1

    def spec(self) -> dict[str, Any]:
        """The geometry as plain JSON: ``{"type": <class name>, "r": int, "alpha": float}``, plus
        ``"rank"`` and ``"a_groups"`` for a conv. With the base module it fixes every parameter shape, and
        with the adapter-wide rsLoRA flag the scaling s = α/r (or α/√r); the adapter file stores exactly
        this per layer."""
        return {"type": type(self).__name__, "r": self.r, "alpha": self.alpha}

    @classmethod
    def spec_options(cls, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keywords this class reads from a spec beyond r and α (none; a conv: rank, a_groups)."""
        return {}

    @classmethod
    def from_spec(
        cls: type[_Layer],
        base: nn.Module,
        spec: Mapping[str, Any],
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> _Layer:
        """This layer type on ``base`` with the geometry of ``spec`` (as ``spec()`` writes it); the
        adapter-wide options come as arguments. ``"type"`` may be left out, but when given must name this
        class; keys the class does not read are ignored, as the adapter file always has."""
        if not isinstance(spec, Mapping):
            raise LoRAConfigError(f"a layer spec must be a mapping, got {spec!r}")
        kind = spec.get("type", cls.__name__)
        if kind != cls.__name__:
            raise LoRAConfigError(f"layer spec is for a {kind}, but this base module takes a {cls.__name__}")
        return cls(  # type: ignore[call-arg]
            base,
            spec_int(spec, "r"),
            spec_float(spec, "alpha"),
            use_rslora=use_rslora,
            dropout=dropout,
            init=init,
            **cls.spec_options(spec),
        )

    def delta_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The delta as low-rank factors with the scaling folded in, per base parameter and per block
        (one block, or one per group of a grouped conv): ΔW_block = B·A with B (out, k), A (k, n)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_factors(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Set A and B so that the delta equals the given factors (the inverse of ``factors``)."""
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        """Whether the delta can be folded into the base weight; see ``merge_blocker``."""
        return self.merge_blocker() is None

    def merge_blocker(self) -> str | None:
        """Why this delta cannot be merged, or None."""
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
