"""Where deltas meet the backbone: the runtime that executes a composition policy.

One site per adapted module (``LayerSite``; ``AttentionSite`` in ``attention_site``) and per module kept
per adapter (``HeadSite``: a task head, or a normalisation layer an adapter owns), all reading one shared
``Routing``. A site takes over its module's ``forward`` through an
instance attribute (the class, the parameter names and the state dict of the backbone stay untouched) and
adds the deltas that the ``Routing`` says are active: a weighted sum on every sample (single adapter,
``Stack``) and/or one adapter per group of rows (per-sample ``Switch``). For a switch, the batch is sorted
by adapter once per forward, before the backbone runs (``routing.Plan``), so every site sees each adapter's
rows as one contiguous slice: no index lists are rebuilt and no rows are gathered or scattered inside the
network. A ``LayerSite`` also merges: it folds the weighted deltas into the backbone weights and restores
them bit for bit. The maths of each delta lives in ``adapter_hub.lora``; this module only schedules it.

A DoRA layer (``LoRALayer.use_dora``) is not an additive delta (its output is normalised by the norm of its
own W + ΔW), so a site holding one runs the plain non-fused path, and refuses to sum it with another delta
or to weight it (``LayerSite.dora_blocker``); alone and per-sample routed it is exact.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointRoutingError, ConfigError
from ..lora import LoRALayer
from .fused_train import FusedLoRA, Group, conv_geometry, merge_pays
from .routing import map_tensors


@dataclass
class Routing:
    """What the sites of one model apply in the current forward.

    Sites read it through :meth:`now`. Under activation checkpointing (``torch.utils.checkpoint``, reentrant
    or not, and Hugging Face's ``gradient_checkpointing_enable``) the backward pass runs the checkpointed
    layers a second time, after the forward has returned and the live routing may have moved on (a Switch's
    rows are only set during its forward). So every forward leaves a snapshot of its routing on its outputs
    (:meth:`keep_for_backward`); when the backward reaches them the snapshot is filed under that backward
    pass, and a recomputation inside the pass applies it instead of the live routing."""

    enabled: bool = True
    weighted: tuple[tuple[str, float], ...] = ()  # (adapter, weight) summed on every sample
    head: str | None = None  # the adapter whose head runs when not routed per sample
    segments: tuple[tuple[str | None, int, int], ...] | None = None  # (adapter, start, end) of sorted rows
    batch_size: int = 0
    widths: dict[str | None, int] = field(default_factory=dict)  # output width of each routed head
    switch: bool = False  # a per-sample Switch is active: a forward must carry its rows (segments)
    generation: int = 0  # counts activations, merges and unmerges (which change what trains)
    # backward pass id → the routings of the forwards it runs through (one entry per distinct routing)
    replays: dict[int, dict[tuple, Routing]] = field(default_factory=dict, repr=False)

    def key(self) -> tuple:
        return (self.enabled, self.weighted, self.head, self.segments, self.batch_size, self.switch, self.generation)

    def now(self) -> Routing:
        """The routing to apply: the live one, or the snapshot of the forward being recomputed."""
        if self.replays:
            states = self.replays.get(torch._C._current_graph_task_id())
            if states:
                if len(states) > 1:
                    raise CheckpointRoutingError(
                        "one backward pass recomputes checkpointed layers of forwards that ran with different "
                        "adapters or routes; call backward once per forward (or sum losses of forwards with the "
                        "same composition)"
                    )
                state = next(iter(states.values()))
                if state.generation != self.generation:
                    raise CheckpointRoutingError(
                        "adapters were activated, merged or unmerged between a forward and its backward, which "
                        "recomputes checkpointed layers; call backward before changing the composition"
                    )
                return state
        if self.switch and self.segments is None and self.enabled:
            raise ConfigError(
                "a Switch is active but this forward carries no route: call the AdapterModel with "
                "route=[adapter per sample], not its backbone (under activation checkpointing, take the loss from "
                "the AdapterModel's outputs, not from a tensor captured inside the backbone)"
            )
        return self

    def keep_for_backward(self, output: Any) -> None:
        """Hook every tensor of ``output`` that autograd will differentiate: when the backward reaches it,
        the routing of this forward is filed for the recomputations of that backward pass."""
        if not torch.is_grad_enabled():
            return
        state = Routing(self.enabled, self.weighted, self.head, self.segments, self.batch_size, {}, self.switch,
                        self.generation)
        tensors = [t for t in _tensors(output) if t.requires_grad]
        for t in tensors:
            # Reading grad_fn first settles the autograd history of a view whose base a Switch changed in place;
            # registering a hook on such a view without it crashes PyTorch 2.14 (pytorch/pytorch#196459).
            if not torch.compiler.is_compiling():  # Dynamo cannot trace grad_fn (and runs no eager view here)
                _ = t.grad_fn
            t.register_hook(functools.partial(self._file, state))

    def _file(self, state: Routing, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        states = self.replays.setdefault(task, {})
        if not states:  # the first snapshot of this pass: forget the pass's snapshots when it ends
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.replays.pop(task, None))
            while len(self.replays) > 64:  # passes that raised never ran their callback
                self.replays.pop(next(iter(self.replays)))
        states.setdefault(state.key(), state)


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_tensors(obj, take)
    return found


class _Site:
    """Shared mechanics: take over the module's forward while the site has something to hold."""

    def __init__(self, module: nn.Module, path: str, routing: Routing) -> None:
        self.module, self.path, self.routing = module, path, routing

    def attach(self) -> None:
        self.module.forward = self.forward  # instance attribute shadows the class's forward

    def detach(self) -> None:
        self.module.__dict__.pop("forward", None)

    def base_forward(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - replaced by subclasses
        raise NotImplementedError


class LayerSite(_Site):
    """A base layer carrying LoRA deltas of one or more adapters."""

    def __init__(self, module: nn.Module, path: str, routing: Routing) -> None:
        super().__init__(module, path, routing)
        self.layers: dict[str, LoRALayer] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}
        self._dora = False  # some adapter here is DoRA: while one is active, the non-fused ``_dora_forward`` runs

    def add(self, name: str, layer: LoRALayer) -> None:
        if not self.layers:
            self.attach()
        self.layers[name] = layer
        self._cache.clear()
        self._dora = any(layer.use_dora for layer in self.layers.values())

    def remove(self, name: str) -> None:
        self.layers.pop(name, None)
        self._cache.clear()  # a later tensor may reuse a freed one's id
        self._dora = any(layer.use_dora for layer in self.layers.values())
        if not self.layers:
            self.detach()

    def active(self) -> bool:
        r = self.routing.now()
        if not r.enabled:
            return False
        if any(name in self.layers for name, _ in r.weighted):
            return True
        return r.segments is not None and any(name in self.layers for name, _, _ in r.segments)

    def add_deltas(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        delta: Callable[[LoRALayer, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """out + Σ wᵢ·deltaᵢ(x) on every row, plus each routed adapter's delta on its own rows (dim 0).

        The sums are taken in place: ``out`` is a fresh output of the base op, which autograd does not
        keep (linear, conv and embedding backward need their input and weight, not their output).
        """
        r = self.routing.now()
        if not r.enabled:
            return out
        for name, w in r.weighted:
            layer = self.layers.get(name)
            if layer is not None:
                d = delta(layer, x)
                out = out.add_(d) if w == 1.0 else out.add_(d, alpha=w)
        if r.segments is not None:
            self._check_rows(x, r)
            for (name, start, end), rows in zip(r.segments, _row_groups(x, r.segments)):
                layer = self.layers.get(name) if name is not None else None
                if layer is not None:
                    out[start:end] += delta(layer, rows)
        return out

    def _check_rows(self, x: torch.Tensor, r: Routing) -> None:
        """The rows of a per-sample routing are slices of dimension 0: a layer that sees another layout would
        give one sample's delta to another."""
        if x.shape[0] != r.batch_size:
            raise ConfigError(
                f"per-sample routing needs every adapted layer to keep the batch as dimension 0; "
                f"{self.path} got {x.shape[0]} rows for a batch of {r.batch_size}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return self.base_forward(x)
        if self._dora and self._dora_active():
            return self._dora_forward(x)
        m = self.module
        if isinstance(m, nn.Linear) and self._fusable():
            return self.project(x, m.weight, m.bias, F.linear, linear_part, "weight")
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and x.dim() == m.weight.dim() and self._fusable():
            return self.project(x, m.weight, m.bias, m._conv_forward, linear_part, "weight")
        return self.add_deltas(self.base_forward(x), x, _call_layer)

    # --- DoRA ----------------------------------------------------------------------------------
    def dora_blocker(self, weighted: Iterable[tuple[str, float]]) -> str | None:
        """Why ``weighted`` cannot run (or merge) here, or None: a DoRA delta must be the only one at its
        layer, with weight 1. Its output m·(W + ΔW)⋆x/‖W + ΔW‖ is normalised by its own ΔW, so it is not a
        delta that adds to another adapter's or scales by a weight."""
        present = [(n, w) for n, w in weighted if n in self.layers]
        dora = [n for n, _ in present if self.layers[n].use_dora]
        if not dora or (len(present) == 1 and present[0][1] == 1.0):
            return None
        if len(present) == 1:
            what = f"with weight {present[0][1]:g}"
        else:
            what = "together with " + ", ".join(repr(n) for n, _ in present if n != dora[0])
        return (
            f"adapter {dora[0]!r} is DoRA at {self.path} {what}: a DoRA layer computes m·(W + ΔW)⋆x/‖W + ΔW‖ "
            "with its own ΔW in the norm, which does not sum with other deltas or scale by a weight; run a DoRA "
            "adapter alone or in a Switch"
        )

    def _dora_active(self) -> bool:
        r = self.routing.now()
        names = [n for n, _ in r.weighted] + ([n for n, _, _ in r.segments] if r.segments else [])
        return any(layer.use_dora for n in names if n is not None and (layer := self.layers.get(n)) is not None)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus each active delta, where a DoRA layer adds k·(W + ΔW)⋆x − W⋆x
        (``LoRALayer.dora_delta``, k = m/‖W + ΔW‖) on its rows, and a plain layer its s·B·A⋆x."""
        r = self.routing.now()
        m = self.module
        weight, bias = m.weight, getattr(m, "bias", None)
        out = self.base_forward(x)
        if bias is None:
            plain, out = out, out.clone()  # autograd keeps ``plain`` for m's gradient: sum into a copy
        else:
            if isinstance(m, nn.modules.conv._ConvNd):
                bias = bias.view(-1, *([1] * (weight.dim() - 2)))
            plain = out - bias

        def delta(layer: LoRALayer, w: float, x_rows: torch.Tensor, plain_rows: torch.Tensor) -> torch.Tensor:
            if layer.use_dora:
                return layer.dora_delta(x_rows, weight, plain_rows)
            d = layer(x_rows)
            return d if w == 1.0 else d * w

        if r.weighted:
            if (why := self.dora_blocker(r.weighted)) is not None:
                raise ConfigError(f"cannot run this Stack: {why}")
            for name, w in r.weighted:
                if (layer := self.layers.get(name)) is not None:
                    out = out + delta(layer, w, x, plain)
        if r.segments is not None:
            self._check_rows(x, r)
            rows = zip(r.segments, _row_groups(x, r.segments), _row_groups(plain, r.segments))
            for (name, start, end), x_rows, plain_rows in rows:
                layer = self.layers.get(name) if name is not None else None
                if layer is not None:
                    out[start:end] += delta(layer, 1.0, x_rows, plain_rows)
        return out

    # --- fast path -----------------------------------------------------------------------------
    def _fusable(self) -> bool:
        """Whether the active deltas can run as plain A/B products (no dropout on their input)."""
        r = self.routing.now()
        names = [n for n, _ in r.weighted] + ([n for n, _, _ in r.segments] if r.segments else [])
        return all(
            isinstance(layer.dropout, nn.Identity) or not layer.training
            for n in names
            if n is not None and (layer := self.layers.get(n)) is not None
        )

    def project(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        part: Callable[[LoRALayer], Part],
        slot: str,
    ) -> torch.Tensor:
        """``op(x, W, b)`` (a linear map or a conv) plus the active deltas s·B·(A ⋆ x), fast.

        Single adapter or stack: one call of ``op`` with the A's stacked under W, ``[W; A₁; …]``,
        computes the base output and every A ⋆ x in one pass over x; each B is then applied with one
        fused multiply-add (``addmm``/``baddbmm``) that also scales and sums. The stacked weight is
        cached until W or an A changes. Per-sample routing: ``op`` on the whole batch, then each
        adapter's A ⋆ x on its own contiguous rows, added in place by the same fused multiply-add.
        """
        r = self.routing.now()
        if r.segments is None:
            active = [(part(self.layers[n]), w) for n, w in r.weighted if n in self.layers]
            return self._fused(x, weight, bias, op, active, slot)
        self._check_rows(x, r)
        linear = op is F.linear
        if self._training(weight, bias, [part(self.layers[n])[0] for n, _, _ in r.segments if n in self.layers]):
            factors: list[torch.Tensor] = []
            groups = []
            for name, start, end in r.segments:
                terms: tuple[tuple[int, float], ...] = ()
                if name is not None and name in self.layers:
                    a_w, b_w, scale = part(self.layers[name])
                    terms = ((len(factors) // 2, scale),)
                    factors += [a_w, b_w]
                groups.append((start, end, terms))
            trained = self._train_fused(x, weight, bias, tuple(groups), factors, linear)
            if trained is not None:
                return trained
        out = op(x, weight, bias)
        for (name, start, end), x_rows in zip(r.segments, _row_groups(x, r.segments)):
            layer = self.layers.get(name) if name is not None else None
            if layer is None:
                continue
            a_w, b_w, scale = part(layer)
            rows = out[start:end]  # B·A⋆x is added into a view of its rows (flatten(2) of NCHW or NHWC is one)
            rows = rows.view(-1, rows.shape[-1]) if linear else rows.flatten(2)
            _add_b(rows, _flat(op(x_rows, a_w, None), linear), b_w, scale, linear, inplace=True)
        return out

    def _fused(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        active: list[tuple[Part, float]],
        slot: str,
    ) -> torch.Tensor:
        """op(x, [W; A₁; …]) once, then each B applied by one fused, scaled multiply-add.

        In training (an A that requires grad) ``FusedLoRA`` runs instead: autograd would give a stacked [W; A] a
        weight gradient in full — a product as large as the layer's own — to keep A's rows. Where it does not
        apply (a trainable base weight, a grouped conv) the base op and each A run apart."""
        if not active:
            return op(x, weight, bias)
        linear = op is F.linear
        if torch.is_grad_enabled() and any(a_w.requires_grad for (a_w, _, _), _ in active):
            if self._training(weight, bias, [a_w for (a_w, _, _), _ in active]):
                terms = tuple((i, w * scale) for i, ((_, _, scale), w) in enumerate(active))
                factors = [t for (a_w, b_w, _), _ in active for t in (a_w, b_w)]
                trained = self._train_fused(x, weight, bias, ((0, x.shape[0], terms),), factors, linear)
                if trained is not None:
                    return trained
            y = op(x, weight, bias)
            result = _flat(y, linear)
            parts = [_flat(op(x, a_w, None), linear) for (a_w, _, _), _ in active]
        else:
            w_all, b_all = self._stacked(slot, weight, bias, [p[0] for p, _ in active])
            y = op(x, w_all, b_all)
            flat = _flat(y, linear)
            bounds = list(itertools.accumulate([weight.shape[0], *(a_w.shape[0] for (a_w, _, _), _ in active)]))
            result = flat[:, : bounds[0]]
            parts = [flat[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        for a, ((_, b_w, scale), w) in zip(parts, active):
            result = _add_b(result, a, b_w, w * scale, linear)
        out_features = weight.shape[0]
        shape = (*y.shape[:-1], out_features) if linear else (y.shape[0], out_features, *y.shape[2:])
        return result.reshape(shape)

    @staticmethod
    def _training(weight: torch.Tensor, bias: torch.Tensor | None, a_weights: list[torch.Tensor]) -> bool:
        """A training forward of trainable deltas on a frozen base layer: what ``FusedLoRA`` is for. Under autocast
        (its backward would meet a low-precision gradient) and torch.func transforms (it has no ``setup_context``)
        the plain autograd path runs instead."""
        return (
            torch.is_grad_enabled()
            and any(a.requires_grad for a in a_weights)
            and not weight.requires_grad
            and not (bias is not None and bias.requires_grad)
            and not torch.is_autocast_enabled(weight.device.type)
            and not torch._C._are_functorch_transforms_active()
        )

    def _train_fused(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        groups: tuple[Group, ...],
        factors: list[torch.Tensor],
        linear: bool,
    ) -> torch.Tensor | None:
        """The training step's fast path (``fused_train.FusedLoRA``: the bare layer's cost plus products r/out
        its size), or None where it does not apply (a grouped conv) or does not pay (``merge_pays``) for the
        smallest group of rows that carries deltas."""
        stride = None if linear else self.module.stride
        for start, end, terms in groups:  # a plain loop: torch.compile traces it without a graph break
            if terms and not merge_pays(x[start:end], weight, stride):
                return None
        geometry = None
        if not linear:
            found = conv_geometry(self.module)
            if found is None:
                return None
            geometry, pre, mode = found
            if pre is not None:
                x = F.pad(x, pre, mode=mode)
        return FusedLoRA.apply(x, weight, bias, geometry, groups, *factors)

    def _stacked(
        self, slot: str, weight: torch.Tensor, bias: torch.Tensor | None, a_weights: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[W; A₁; …] and [b; 0; …], cached while none of them changes (never across autograd graphs)."""
        if not a_weights:
            return weight, bias
        if torch.compiler.is_compiling():  # the compiled graph holds no cache; Dynamo cannot trace is_inference
            b_all = torch.cat([bias, bias.new_zeros(sum(a.shape[0] for a in a_weights))]) if bias is not None else None
            return torch.cat([weight, *a_weights]), b_all
        tensors = [weight, *a_weights, *([bias] if bias is not None else [])]
        # inference tensors (made under torch.inference_mode) keep no version counter: never cached
        cacheable = not any(t.is_inference() for t in tensors) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        )
        stamp = tuple((id(t), t._version) for t in tensors) if cacheable else None
        cached = self._cache.get(slot)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        w_all = torch.cat([weight, *a_weights])
        extra = sum(a.shape[0] for a in a_weights)
        b_all = torch.cat([bias, bias.new_zeros(extra)]) if bias is not None else None
        if stamp is not None:
            self._cache[slot] = (stamp, w_all, b_all)  # one entry per slot: memory stays ≤ one copy
        return w_all, b_all

    # --- merge ---------------------------------------------------------------------------------
    def merge_blocker(self, weighted: Iterable[tuple[str, float]]) -> str | None:
        weighted = tuple(weighted)
        for name, _ in weighted:
            layer = self.layers.get(name)
            if layer is not None and (why := layer.merge_blocker()) is not None:
                return f"adapter {name!r} at {self.path}: {why}"
        return self.dora_blocker(weighted)

    @torch.no_grad()
    def merge(self, weighted: Iterable[tuple[str, float]]) -> None:
        """W ← W + Σ wᵢ·ΔWᵢ in place, or for a DoRA adapter (alone here, see ``dora_blocker``)
        W ← m/‖W + ΔW‖·(W + ΔW) per output channel; the original tensors are kept so unmerge is bit-exact."""
        total: dict[str, torch.Tensor] = {}
        folded: dict[str, torch.Tensor] = {}
        for name, w in weighted:
            layer = self.layers.get(name)
            if layer is None:
                continue
            if layer.use_dora:
                folded["weight"] = layer.dora_weight(self.module.get_parameter("weight"))
                continue
            for pname, d in layer.delta_weights().items():
                total[pname] = total[pname] + w * d if pname in total else w * d
        for pname, d in total.items():
            p = self.module.get_parameter(pname)
            self._saved.setdefault(pname, p.detach().clone())
            p.add_(d.to(p.dtype))
        for pname, new in folded.items():
            p = self.module.get_parameter(pname)
            self._saved.setdefault(pname, p.detach().clone())
            p.copy_(new)

    @torch.no_grad()
    def unmerge(self) -> None:
        for pname, original in self._saved.items():
            self.module.get_parameter(pname).copy_(original)
        self._saved.clear()


def _row_groups(x: torch.Tensor, segments: tuple[tuple[str | None, int, int], ...]) -> list[torch.Tensor]:
    """Each segment's rows of ``x`` (dimension 0), as views from one ``split``: its gradient is one
    concatenation of the groups' gradients, where a slice per group would each get a zero-filled gradient the
    size of the whole batch, added up (a BatchNorm per adapter: four batch-sized fills and adds per layer)."""
    sizes = [end - start for _, start, end in segments]
    if sum(sizes) != x.shape[0]:  # (not the routed batch: the caller's row check says so, or slices run)
        return [x[start:end] for _, start, end in segments]
    if len(sizes) == 1:  # one task's batch: x itself, which a head may change in place (a split's views may not)
        return [x]
    return list(x.split(sizes))


def _flat(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """A linear map's output as (rows, features), a conv's as (batch, channels, positions)."""
    return t.reshape(-1, t.shape[-1]) if linear else t.flatten(2)


def _add_b(
    out: torch.Tensor, a: torch.Tensor, b_w: torch.Tensor, alpha: float, linear: bool, *, inplace: bool = False
) -> torch.Tensor:
    """out + alpha·B·a on :func:`_flat` tensors (``addmm`` for a linear map; for a conv's positions a batched
    ``baddbmm``, or where autograd records it ``B @ a`` then an add); ``inplace`` adds into ``out`` itself.

    ``baddbmm`` needs B expanded over the batch, and the gradient of an expanded B is one (out, r) product per
    sample, summed afterwards: on a resnet18's last stage (one position per sample) a batch of 64 such products
    cost 8 ms and 1 MiB per layer, against 0.4 ms for ``B @ a``, whose gradient is one product over all rows."""
    if b_w.dtype != a.dtype:  # under autocast A⋆x comes out in the lower precision; B joins it there
        b_w = b_w.to(a.dtype)
    if linear:
        return out.addmm_(a, b_w.t(), alpha=alpha) if inplace else torch.addmm(out, a, b_w.t(), alpha=alpha)
    if torch.is_grad_enabled() and (b_w.requires_grad or a.requires_grad):
        d = torch.matmul(b_w, a)
        return out.add_(d, alpha=alpha) if inplace else out.add(d, alpha=alpha)
    b = b_w.expand(a.shape[0], *b_w.shape)
    return out.baddbmm_(b, a, alpha=alpha) if inplace else torch.baddbmm(out, b, a, alpha=alpha)


def _call_layer(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# (A weight, B as a matrix (out, k), scaling) of one delta, for the fast path
Part = tuple[torch.Tensor, torch.Tensor, float]


def linear_part(layer: LoRALayer) -> Part:
    b = layer.lora_B.weight
    return layer.lora_A.weight, b.reshape(b.shape[0], b.shape[1]), layer.scaling


class HeadSite(_Site):
    """A module kept per adapter and trained in full — a task head, or a normalisation layer the adapter
    owns (``LoRAConfig.norm_layers``): the copy of the adapter whose head runs (``Routing.head``) runs in
    place of the backbone's module. Routed per sample, each group of rows goes through its own adapter's
    copy (in training mode a BatchNorm normalises those rows with their own batch statistics and updates
    only that adapter's running statistics). Heads of different output sizes are zero-padded on the last
    dimension to the largest, and each head's width is left in ``Routing.widths`` for the owner to trim the
    rows back; outputs of one size (a norm's, say) are neither padded nor recorded."""

    def __init__(self, module: nn.Module, path: str, routing: Routing) -> None:
        super().__init__(module, path, routing)
        self.heads: dict[str, nn.Module] = {}

    def add(self, name: str, head: nn.Module) -> None:
        if not self.heads:
            self.attach()
        self.heads[name] = head

    def remove(self, name: str) -> None:
        self.heads.pop(name, None)
        if not self.heads:
            self.detach()

    def _head(self, name: str | None) -> Callable[..., torch.Tensor]:
        head = self.heads.get(name) if name is not None else None
        return head if head is not None else self.base_forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r = self.routing.now()
        if not r.enabled:
            return self.base_forward(x, *args, **kwargs)
        if r.segments is None:
            return self._head(r.head)(x, *args, **kwargs)
        outs = []
        for (name, _, _), rows in zip(r.segments, _row_groups(x, r.segments)):
            head = self._head(name)
            _check_batch_statistics(head, rows, name, self.path)
            outs.append(head(rows, *args, **kwargs))
        widths = {y.shape[-1] for y in outs}
        if len(widths) == 1:
            return torch.cat(outs)
        r.widths.update({name: y.shape[-1] for (name, _, _), y in zip(r.segments, outs)})
        width = max(widths)
        return torch.cat([F.pad(y, (0, width - y.shape[-1])) for y in outs])


def _check_batch_statistics(head: Callable[..., torch.Tensor], rows: torch.Tensor, name: str, path: str) -> None:
    """Refuse, naming the adapter, a group of rows that an adapter's own BatchNorm cannot normalise in training
    mode: one value per channel has no batch variance (a per-sample Switch can give a task a single row of a
    batch; torch's own error would not say whose rows or which layer)."""
    if not (isinstance(head, nn.modules.batchnorm._BatchNorm) and head.training):
        return
    if rows.dim() >= 2 and rows.numel() // max(1, rows.shape[1]) == 1:
        raise ConfigError(
            f"adapter {name!r} has a single row in this training batch, and its own {type(head).__name__} at "
            f"{path!r} needs more than one value per channel for batch statistics in training mode: give each "
            "adapter at least 2 rows per batch, or train with norm_layers='frozen'"
        )


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without the forwards that sites put on it (and without the sites).

    It lives next to ``_Site.attach`` because it undoes exactly that: a copy taken with the instance
    ``forward`` still set would carry the site (and through it every adapter) along."""
    taken = [(m, m.__dict__.pop("forward")) for m in module.modules() if "forward" in m.__dict__]
    try:
        return copy.deepcopy(module)
    finally:
        for m, forward in taken:
            m.forward = forward
