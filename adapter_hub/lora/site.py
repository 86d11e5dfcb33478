"""Where deltas meet the backbone: one site per adapted module, shared routing, exact merge.

A site takes over its module's ``forward`` through an instance attribute (the class, the parameter
names and the state dict of the backbone stay untouched) and adds the deltas that the shared
``Routing`` says are active: a weighted sum on every sample (single adapter, stack) and/or one
adapter per group of rows (per-sample switch). For a switch, the batch is sorted by adapter once per
forward, before the backbone runs, so every site sees each adapter's rows as one contiguous slice:
no index lists are rebuilt and no rows are gathered or scattered inside the network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LoRAMultiheadAttention
from .base import LoRALayer


@dataclass
class Routing:
    """What the sites of one model apply in the current forward."""

    enabled: bool = True
    weighted: tuple[tuple[str, float], ...] = ()  # (adapter, weight) summed on every sample
    head: str | None = None  # the adapter whose head runs when not routed per sample
    segments: tuple[tuple[str | None, int, int], ...] | None = None  # (adapter, start, end) of sorted rows
    batch_size: int = 0
    widths: dict[str | None, int] = field(default_factory=dict)  # output width of each routed head


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

    def add(self, name: str, layer: LoRALayer) -> None:
        if not self.layers:
            self.attach()
        self.layers[name] = layer
        self._cache.clear()

    def remove(self, name: str) -> None:
        self.layers.pop(name, None)
        self._cache.clear()  # a later tensor may reuse a freed one's id
        if not self.layers:
            self.detach()

    def active(self) -> bool:
        r = self.routing
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
        r = self.routing
        if not r.enabled:
            return out
        for name, w in r.weighted:
            layer = self.layers.get(name)
            if layer is not None:
                d = delta(layer, x)
                out = out.add_(d) if w == 1.0 else out.add_(d, alpha=w)
        if r.segments is not None:
            if x.shape[0] != r.batch_size:
                raise RuntimeError(
                    f"per-sample routing needs every adapted layer to keep the batch as dimension 0; "
                    f"{self.path} got {x.shape[0]} rows for a batch of {r.batch_size}"
                )
            for name, start, end in r.segments:
                layer = self.layers.get(name) if name is not None else None
                if layer is not None:
                    out[start:end] += delta(layer, x[start:end])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return self.base_forward(x)
        m = self.module
        if isinstance(m, nn.Linear) and self._fusable():
            return self.project(x, m.weight, m.bias, F.linear, _linear_part, "weight")
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and x.dim() == m.weight.dim() and self._fusable():
            return self.project(x, m.weight, m.bias, m._conv_forward, _linear_part, "weight")
        return self.add_deltas(self.base_forward(x), x, _call_layer)

    # --- fast path -----------------------------------------------------------------------------
    def _fusable(self) -> bool:
        """Whether the active deltas can run as plain A/B products (no dropout on their input)."""
        r = self.routing
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
        r = self.routing
        if r.segments is None:
            active = [(part(self.layers[n]), w) for n, w in r.weighted if n in self.layers]
            return self._fused(x, weight, bias, op, active, slot)
        if x.shape[0] != r.batch_size:
            raise RuntimeError(
                f"per-sample routing needs every adapted layer to keep the batch as dimension 0; "
                f"{self.path} got {x.shape[0]} rows for a batch of {r.batch_size}"
            )
        out = op(x, weight, bias)
        for name, start, end in r.segments:
            layer = self.layers.get(name) if name is not None else None
            if layer is None:
                continue
            a_w, b_w, scale = part(layer)
            a = op(x[start:end], a_w, None)
            rows = out[start:end]
            if op is F.linear:
                rows.view(-1, rows.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), b_w.t(), alpha=scale)
            else:
                rows.flatten(2).baddbmm_(b_w.expand(a.shape[0], *b_w.shape), a.flatten(2), alpha=scale)
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
        """op(x, [W; A₁; …]) once, then each B applied by one fused, scaled multiply-add."""
        if not active:
            return op(x, weight, bias)
        w_all, b_all = self._stacked(slot, weight, bias, [p[0] for p, _ in active])
        y = op(x, w_all, b_all)
        out_features, offset = weight.shape[0], weight.shape[0]
        linear = op is F.linear
        flat = y.reshape(-1, y.shape[-1]) if linear else y.flatten(2)
        result = flat[:, :out_features]
        for (a_w, b_w, scale), w in active:
            k = a_w.shape[0]
            a = flat[:, offset : offset + k]
            offset += k
            if linear:
                result = torch.addmm(result, a, b_w.t(), alpha=w * scale)
            else:
                result = torch.baddbmm(result, b_w.expand(a.shape[0], *b_w.shape), a, alpha=w * scale)
        if linear:
            return result.reshape(*y.shape[:-1], out_features)
        return result.view(y.shape[0], out_features, *y.shape[2:])

    def _stacked(
        self, slot: str, weight: torch.Tensor, bias: torch.Tensor | None, a_weights: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[W; A₁; …] and [b; 0; …], cached while none of them changes (never across autograd graphs)."""
        if not a_weights:
            return weight, bias
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
        for name, _ in weighted:
            layer = self.layers.get(name)
            if layer is not None and (why := layer.merge_blocker()) is not None:
                return f"adapter {name!r} at {self.path}: {why}"
        return None

    @torch.no_grad()
    def merge(self, weighted: Iterable[tuple[str, float]]) -> None:
        """W ← W + Σ wᵢ·ΔWᵢ in place; the original tensors are kept so unmerge is bit-exact."""
        total: dict[str, torch.Tensor] = {}
        for name, w in weighted:
            layer = self.layers.get(name)
            if layer is None:
                continue
            for pname, d in layer.delta_weights().items():
                total[pname] = total[pname] + w * d if pname in total else w * d
        for pname, d in total.items():
            p = self.module.get_parameter(pname)
            self._saved.setdefault(pname, p.detach().clone())
            p.add_(d.to(p.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for pname, original in self._saved.items():
            self.module.get_parameter(pname).copy_(original)
        self._saved.clear()


def _call_layer(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# (A weight, B as a matrix (out, k), scaling) of one delta, for the fast path
Part = tuple[torch.Tensor, torch.Tensor, float]


def _linear_part(layer: LoRALayer) -> Part:
    b = layer.lora_B.weight
    return layer.lora_A.weight, b.reshape(b.shape[0], b.shape[1]), layer.scaling


def _out_proj_part(layer: LoRALayer) -> Part:
    assert isinstance(layer, LoRAMultiheadAttention)
    return _linear_part(layer.out_proj)


class AttentionSite(LayerSite):
    """nn.MultiheadAttention with deltas on in_proj and out_proj, computed in activation space so
    that stacks and per-sample routing work like for any other layer (no merge around the forward)."""

    module: nn.MultiheadAttention

    def forward(  # same signature as nn.MultiheadAttention.forward
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.active():
            return self.base_forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )  # fmt: skip
        mha = self.module
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not mha.batch_first:  # work batch-first so that routed rows are dim 0
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, e = query.shape
        w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
        fast = self._fusable()
        if self_attention:
            if fast:
                qkv = self.project(query, w_in, b_in, F.linear, _linear_part, "in_proj")
            else:
                qkv = self.add_deltas(F.linear(query, w_in, b_in), query, _in_delta)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            parts = []
            for i, x in enumerate((query, key, value)):
                b = b_in[i * e : (i + 1) * e] if b_in is not None else None
                y = F.linear(x, w_in[i * e : (i + 1) * e], b)
                parts.append(self.add_deltas(y, x, _in_delta_part(i)))
            q, k, v = parts
        heads = mha.num_heads
        q, k, v = (t.reshape(n, -1, heads, e // heads).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, n, heads, q.dtype)
        dropout_p = mha.dropout if mha.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            probs = scores.softmax(dim=-1)
            attn = F.dropout(probs, dropout_p, training=mha.training) @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
        else:
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None
            )
        attn = attn.transpose(1, 2).reshape(n, length, e)
        w_out, b_out = mha.out_proj.weight, mha.out_proj.bias
        if fast:
            out = self.project(attn, w_out, b_out, F.linear, _out_proj_part, "out_proj")
        else:
            out = self.add_deltas(F.linear(attn, w_out, b_out), attn, _out_delta)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _in_delta(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(layer, LoRAMultiheadAttention)
    return layer.in_delta(x)


def _in_delta_part(part: int) -> Callable[[LoRALayer, torch.Tensor], torch.Tensor]:
    def delta(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(layer, LoRAMultiheadAttention)
        return layer.in_delta_part(x, part)

    return delta


def _out_delta(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(layer, LoRAMultiheadAttention)
    return layer.out_proj(x)


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    n: int,
    heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True or -inf = blocked) as one additive float mask."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (N·heads, L, S)
            mask = mask.reshape(n, heads, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).reshape(n, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    return mask


class HeadSite(_Site):
    """A task head trained in full and kept per adapter: the active adapter's copy runs in place of
    the backbone's module. Routed per sample, each group of rows goes through its own adapter's head;
    heads of different output sizes are zero-padded on the last dimension to the largest, and each
    head's width is left in ``Routing.widths`` for the owner to trim the rows back."""

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
        r = self.routing
        if not r.enabled:
            return self.base_forward(x, *args, **kwargs)
        if r.segments is None:
            return self._head(r.head)(x, *args, **kwargs)
        outs = [self._head(name)(x[start:end], *args, **kwargs) for name, start, end in r.segments]
        r.widths.update({name: y.shape[-1] for (name, _, _), y in zip(r.segments, outs)})
        width = max(y.shape[-1] for y in outs)
        return torch.cat([F.pad(y, (0, width - y.shape[-1])) for y in outs])


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without the forwards that sites put on it (and without the sites)."""
    taken = [(m, m.__dict__.pop("forward")) for m in module.modules() if "forward" in m.__dict__]
    try:
        return copy.deepcopy(module)
    finally:
        for m, forward in taken:
            m.forward = forward
