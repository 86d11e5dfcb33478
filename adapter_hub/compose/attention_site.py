"""The site of an ``nn.MultiheadAttention``: its forward, re-done with the deltas on in_proj and out_proj.

The deltas are applied in activation space (never merged around the forward), so a ``Stack`` and a
per-sample ``Switch`` work here as at any other layer; the attention itself follows
``nn.MultiheadAttention.forward`` (masks, ``need_weights``, ``is_causal``, batch-first or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoRALayer, LoRAMultiheadAttention
from .sites import LayerSite, Part, linear_part


def _out_proj_part(layer: LoRALayer) -> Part:
    assert isinstance(layer, LoRAMultiheadAttention)
    return linear_part(layer.out_proj)


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
                qkv = self.project(query, w_in, b_in, F.linear, linear_part, "in_proj")
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


