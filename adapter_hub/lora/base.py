"""What every LoRA layer shares: rank, scaling, dropout and the init helpers."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

INITS = ("kaiming", "gaussian")

_Layer = TypeVar("_Layer", bound="LoRALayer")


class LoRAConfigError(ValueError):
    """A LoRA hyper-parameter that cannot be honoured (r <= 0, unknown init, dropout out of range, DoRA on a
    layer type without it)."""


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
    if not math.isfinite(value):
        raise LoRAConfigError(f"layer spec field {key!r} must be a finite number, got {value!r}")
    if key == "alpha" and (value == 0 or abs(value) > 1e9):  # s = α/r: no delta, or one past anything trained
        raise LoRAConfigError(f"layer spec field 'alpha' must be non-zero and at most 1e9 in size, got {value!r}")
    return float(value)


class LoRALayer(nn.Module):
    """One adapter's low-rank delta on one base layer.

    ``forward(x)`` returns only the delta's contribution s·B(A(dropout(x))); the base layer's own
    output is added by whoever calls it, so several deltas can share one base computation.
    ``delta_weights()`` gives the same delta in weight space, keyed by the base parameter it adds to.

    With ``use_dora=True`` (DoRA, weight-decomposed LoRA; Linear, transformers' Conv1D and Conv1d/2d/3d only)
    the layer also holds a trainable magnitude m, one entry per output channel (``lora_magnitude_vector``,
    initialised to ‖W‖ so that a new adapter changes nothing), and the adapted layer computes

        y = m / ‖W + ΔW‖ · (W + ΔW) ⋆ x + b      (per output channel c; ‖·‖ over everything but c)

    with the norm treated as a constant in training (detached, as in the DoRA paper §4.3 and PEFT). That is
    not an additive delta: the layer's ``forward`` is not used for it, ``dora_delta`` gives what to add to
    the base output instead, and ``dora_weight`` the folded weight. ``delta_weights``/``factors`` keep
    meaning the low-rank direction update ΔW = s·B·A.

    The public geometry contract, the same for every layer type: ``r``, ``alpha``, ``scaling``,
    ``rank`` (rows of A), ``groups`` (blocks per delta) and ``a_groups`` (groups of A); ``spec()``
    writes the geometry as a JSON-able dict and ``from_spec(base, spec)`` builds the layer back from it.
    """

    r: int
    alpha: float
    scaling: float
    use_rslora: bool
    use_dora: bool
    supports_dora: ClassVar[bool] = False  # whether the class implements DoRA (see the class docstring)

    def _setup(self, r: int, alpha: float, use_rslora: bool, dropout: float) -> None:
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = False
        self.register_parameter("lora_magnitude_vector", None)  # a Parameter once DoRA is set up

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
        use_dora: bool = False,
    ) -> _Layer:
        """This layer type on ``base`` with the geometry of ``spec`` (as ``spec()`` writes it); the
        adapter-wide options come as arguments. ``"type"`` may be left out, but when given must name this
        class; keys the class does not read are ignored, as the adapter file always has."""
        if not isinstance(spec, Mapping):
            raise LoRAConfigError(f"a layer spec must be a mapping, got {spec!r}")
        kind = spec.get("type", cls.__name__)
        if kind != cls.__name__:
            raise LoRAConfigError(f"layer spec is for a {kind}, but this base module takes a {cls.__name__}")
        if use_dora and not cls.supports_dora:
            raise LoRAConfigError(
                f"use_dora: DoRA is implemented for Linear, transformers' Conv1D and Conv1d/2d/3d layers, not for "
                f"{type(base).__name__} ({cls.__name__}); leave such modules out of the targets of a DoRA adapter"
            )
        return cls(  # type: ignore[call-arg]
            base,
            spec_int(spec, "r"),
            spec_float(spec, "alpha"),
            use_rslora=use_rslora,
            dropout=dropout,
            init=init,
            **cls.spec_options(spec),
            **({"use_dora": True} if use_dora else {}),
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

    # --- DoRA: m·(W + ΔW)/‖W + ΔW‖ per output channel ---------------------------------------------
    # A class that supports DoRA says how its base weight reads as one row per output channel (``_rows``,
    # and back: ``_from_rows``), how a per-channel vector lines up with its output (``per_channel``) and
    # how to run its base op without the bias (``base_plain``).

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout as (out, fan_in): one row per output channel."""
        return weight.flatten(1)

    def _from_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rows.reshape(weight.shape)

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        """A vector with one entry per output channel, shaped to broadcast over this layer's output."""
        return v

    def base_plain(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W ⋆ x, the base op with ``weight`` and no bias."""
        raise NotImplementedError

    def _setup_dora(self, weight: torch.Tensor) -> None:
        """Add the magnitude m = ‖W + ΔW‖ (‖W‖ for a new adapter, whose B is zero), in W's dtype."""
        self.use_dora = True
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(weight))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ per output channel (the L2 norm of each channel's row of W + s·B·A), shape (out,).

        Computed without autograd: the norm is a constant for the gradients (DoRA §4.3, as PEFT)."""
        return (self._rows(weight) + self._rows(self.delta_weight().to(weight.dtype))).norm(dim=1)

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + ΔW‖ per output channel (shape (out,)); the gradient flows to m only."""
        if self.lora_magnitude_vector is None:
            raise ValueError("this layer is not a DoRA layer (use_dora=False)")
        return self.lora_magnitude_vector / self.weight_norm(weight)

    def dora_delta(self, x: torch.Tensor, weight: torch.Tensor, plain: torch.Tensor | None = None) -> torch.Tensor:
        """What to add to the base output W⋆x + b so that the sum is the DoRA output: with k = m/‖W + ΔW‖,

            (k − 1)·(W ⋆ x) + k·s·B(A(x))     =  k·(W + ΔW) ⋆ x − W ⋆ x

        ``plain`` is W ⋆ x without the bias when the caller has it (it is recomputed otherwise). With
        dropout in training, x is dropped out first and W ⋆ dropout(x) is recomputed for the first term (the
        base output itself keeps the whole x), exactly as PEFT's DoRA does."""
        k = self.per_channel(self.dora_scale(weight))
        if self.training and not isinstance(self.dropout, nn.Identity):
            x, plain = self.dropout(x), None
        if plain is None:
            plain = self.base_plain(x, weight)
        return (k - 1) * plain + k * self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def dora_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The folded weight m/‖W + ΔW‖·(W + ΔW) in ``weight``'s layout and dtype (what a merge writes)."""
        rows = self._rows(weight) + self._rows(self.delta_weight().to(weight.dtype))
        k = self.lora_magnitude_vector / rows.norm(dim=1)
        return self._from_rows(rows * k[:, None], weight).to(weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's layout (layers with a single base parameter)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{dora}"
