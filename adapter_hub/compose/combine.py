"""Average: combine several adapters into one new adapter, layer by layer, on ΔW = s·B·A.

Every method works on each adapter's full delta (never on A and B separately, whose products would
carry cross terms BᵢAⱼ). Exact methods (linear, cat) concatenate the factors; svd truncates the exact
sum from its factors; the dense methods (ties, dare_*, magnitude_prune) build the combined ΔW per layer
and factorise it back to rank k. A grouped conv is combined group block by group block, so the result
stays mergeable. A DoRA adapter is refused: its layers are not additive deltas (see ``LoRALayer``).

``combine`` takes the source adapters and returns an ``AdapterRecord``; ``AdapterModel.combine`` adds it
like any other record, so this module needs no model. The per-layer maths is in ``compose.methods``; the
method names (torch-free, for the command line) in ``adapter_hub.combine_methods``. Combining makes a new
adapter; it never *merges* (folds deltas into the backbone weights, ``AdapterModel.merge``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..combine_methods import EXACT, check_method
from ..errors import CombineError, ConfigError
from ..formats.record import AdapterRecord
from ..lora import LoRAConfig, LoRALayer
from . import methods
from .sites import plain_copy

Factors = list[tuple[torch.Tensor, torch.Tensor]]


def combine(
    sources: Sequence[tuple[str, Adapter]],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    *,
    base_for: Callable[[str], nn.Module],
    fingerprint: str = "",
    density: float | None = None,
    rank: int | None = None,
    sign: str = "total",
    seed: int = 0,
    head: str | None = None,
    norms: str | None = None,
) -> AdapterRecord:
    """The record of the adapter that combines ``sources`` (name, adapter) by ``method`` (see
    ``AdapterModel.combine``). ``base_for(path)`` gives the backbone module at a path, which fixes the
    combined layers' shapes; ``fingerprint`` is the backbone's, written into the record."""
    check_method(method, density)
    if not sources:
        raise ConfigError("combine needs at least one adapter")
    names = [n for n, _ in sources]
    ws = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
    if len(ws) != len(names):
        raise ConfigError(f"combine got {len(names)} adapters but {len(ws)} weights")
    if rank is not None and (isinstance(rank, bool) or int(rank) < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank}")
    adapters = [a for _, a in sources]
    for name, adapter in sources:
        dora = next((p for p, layer in adapter.layer_items() if layer.use_dora), None)
        if dora is not None:
            raise CombineError(
                f"cannot combine {name!r}: it is a DoRA adapter (at {dora}), whose output m·(W + ΔW)⋆x/‖W + ΔW‖ "
                "is normalised by its own ΔW, so it has no delta that sums with others; combine works on Σ wᵢ·ΔWᵢ"
            )
    generator = torch.Generator().manual_seed(seed)
    workspace: dict[str, torch.Tensor] = {}  # one buffer for the dense methods' deltas, reused across layers

    layer_maps = [dict(a.layer_items()) for a in adapters]
    paths = list(dict.fromkeys(p for layers in layer_maps for p in layers))
    if rank is not None and method not in EXACT:
        _check_rank(rank, [layer for layers in layer_maps for layer in layers.values()])
    merged: dict[str, dict[str, Factors]] = {}
    specs: dict[str, dict[str, Any]] = {}
    kinds: dict[str, type[LoRALayer]] = {}
    reports: dict[str, list[methods.TruncationReport]] = {}
    for path in paths:
        present = [(layers[path], w) for layers, w in zip(layer_maps, ws) if path in layers]
        layers = [layer for layer, _ in present]
        if len({type(layer) for layer in layers}) > 1:
            raise ConfigError(f"cannot combine {path}: the adapters use different layer types there")
        for layer in layers:
            if (why := layer.merge_blocker()) is not None:
                raise CombineError(f"cannot combine {path}: {why}")
        per_param: dict[str, Factors] = {}
        for param, _ in layers[0].factors().items():
            blocks_per_adapter = [layer.factors()[param] for layer in layers]
            out_blocks: Factors = []
            for j in range(len(blocks_per_adapter[0])):
                factors = [blocks[j] for blocks in blocks_per_adapter]
                b, a, report = _combine_block(
                    factors, [w for _, w in present], method, density, rank, sign, generator, workspace
                )
                out_blocks.append((b, a))
                if report is not None:
                    reports.setdefault(path, []).append(report)
            per_param[param] = out_blocks
        merged[path] = per_param
        specs[path] = _spec(layers[0], per_param)
        kinds[path] = type(layers[0])

    heads = _combine_heads(adapters, names, ws, head)
    norm_modules = _combine_norms(adapters, names, ws, norms, base_for)
    errors = {p: methods.overall_rel_error(r) for p, r in reports.items()}
    all_reports = [r for rs in reports.values() for r in rs]
    config = LoRAConfig(
        r=max((s["r"] for s in specs.values()), default=1),
        alpha=max((s["r"] for s in specs.values()), default=1),
        targets=list(paths),
        heads=list(heads),
        norm_layers=_norm_policy(adapters, norms, names) if norm_modules else "frozen",
    )
    layer_specs, tensors = _layer_state(kinds, specs, merged, config, base_for)
    for path, module in [*heads.items(), *norm_modules.items()]:
        tensors.update({f"{path}.{k}": t.detach().cpu().contiguous() for k, t in module.state_dict().items()})
    recipe = {
        "sources": list(names),
        "weights": ws,
        "method": method,
        "params": {
            k: v
            for k, v in {
                "density": density,
                "rank": rank,
                "sign": sign if method in ("ties", "dare_ties") else None,
                "seed": seed if method.startswith("dare") else None,
                "head": head,
                "norms": norms,
            }.items()
            if v is not None
        },  # fmt: skip
        "rel_error": methods.overall_rel_error(all_reports) if all_reports else 0.0,
        "layer_rel_error": errors,
    }
    return AdapterRecord(
        config=config,
        layers=layer_specs,
        heads=list(heads),
        tensors=tensors,
        metadata={"recipe": recipe},
        fingerprint=fingerprint,
        source="combined adapter",
        norms=list(norm_modules),
    )


def _layer_state(
    kinds: dict[str, type[LoRALayer]],
    specs: dict[str, dict[str, Any]],
    merged: dict[str, dict[str, Factors]],
    config: LoRAConfig,
    base_for: Callable[[str], nn.Module],
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Each combined layer's full spec and its tensors under their file keys, read off a scratch layer
    set to the combined factors (only the layer class knows how factors map onto its A and B)."""
    bases = {path: base_for(path) for path in specs}
    cuda = sorted({p.device.index or 0 for b in bases.values() for p in b.parameters() if p.is_cuda})
    layer_specs: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    # the scratch layers' random init must not move the global generators: adding the record draws from
    # them exactly as adding the adapter directly always has
    with torch.random.fork_rng(devices=cuda):
        for path, spec in specs.items():
            layer = kinds[path].from_spec(
                bases[path], spec, use_rslora=config.use_rslora, dropout=config.dropout, init=config.init
            )
            layer.set_factors(merged[path])
            layer_specs[path] = layer.spec()
            tensors.update({f"{path}.{k}": t.detach().cpu().contiguous() for k, t in layer.state_dict().items()})
    return layer_specs, tensors


def _check_rank(rank: int, layers: list[LoRALayer]) -> None:
    """Refuse a target rank above what any combined ΔW block can have (min of its rows and columns): beyond
    that the factors would only be padded with zeros, at the cost of memory the rank asks for."""
    most = max((min(b.shape[0], a.shape[1]) for layer in layers if layer.merge_blocker() is None
                for blocks in layer.factors().values() for b, a in blocks), default=0)  # fmt: skip
    if most and rank > most:  # (no mergeable layer: the loop refuses the first one with its reason)
        raise ConfigError(f"rank {rank} is more than any combined layer's ΔW can have (at most {most} here)")


def _combine_block(
    factors: Factors,
    weights: list[float],
    method: str,
    density: float | None,
    rank: int | None,
    sign: str,
    generator: torch.Generator,
    workspace: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, methods.TruncationReport | None]:
    full_rank = sum(a.shape[0] for _, a in factors)
    k = rank if rank is not None else full_rank
    if method in EXACT:
        b, a = methods.linear(factors, weights)
        return b, a, None
    if method == "svd":
        return methods.svd(factors, weights, k)
    deltas = _dense_deltas(factors, workspace)
    if method == "ties":
        dense = methods.ties(deltas, weights, density, sign)  # type: ignore[arg-type]
    elif method == "magnitude_prune":
        dense = methods.magnitude_prune(deltas, weights, density)  # type: ignore[arg-type]
    elif method == "dare_linear":
        dense = methods.dare_linear(deltas, weights, density, generator)  # type: ignore[arg-type]
    else:
        dense = methods.dare_ties(deltas, weights, density, generator, sign)  # type: ignore[arg-type]
    return methods.factorize(dense, k)


def _dense_deltas(factors: Factors, workspace: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``[B_i @ A_i]``, written into one buffer kept in ``workspace`` and reused by the next layer.

    The dense methods only read their deltas and return new tensors, so one buffer serves every layer: a
    fresh (out, n) tensor per adapter and layer costs more in first-touch page faults than the product.
    """
    dtype = factors[0][0].dtype
    for b, a in factors:
        dtype = torch.promote_types(torch.promote_types(dtype, b.dtype), a.dtype)
    device = factors[0][0].device
    shape = (len(factors), factors[0][0].shape[0], factors[0][1].shape[1])
    size = shape[0] * shape[1] * shape[2]
    buffer = workspace.get("deltas")
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
        grown = 0 if buffer is None else 2 * buffer.numel()  # later layers are often larger
        buffer = workspace["deltas"] = torch.empty(max(size, grown), dtype=dtype, device=device)
    out = buffer[:size].view(shape)
    for i, (b, a) in enumerate(factors):  # the combination is built, not trained: no autograd graph
        torch.matmul(b.detach().to(dtype), a.detach().to(dtype), out=out[i])
    return list(out.unbind(0))


def _spec(layer: LoRALayer, per_param: dict[str, Factors]) -> dict[str, Any]:
    """Layer geometry for the combined delta: scaling 1 (α = r), rank from the combined factors, one
    block per group (a layer with ``groups`` > 1 keeps its A grouped, so the result stays mergeable)."""
    total = next(iter(per_param.values()))[0][1].shape[0] * layer.groups
    spec: dict[str, Any] = {"r": total, "alpha": float(total)}
    if layer.groups > 1:
        spec.update(rank=total, a_groups=layer.groups)
    return spec


def _combine_heads(
    adapters: list[Adapter], names: Sequence[str], ws: list[float], head: str | None
) -> dict[str, nn.Module]:
    """Heads of the new adapter: ``head=""`` none, ``head=name`` that adapter's, otherwise the weighted
    average Σwᵢθᵢ/Σwᵢ of the sources' heads at each path (their shapes must agree)."""
    if head == "":
        return {}
    if head is not None:
        if head not in names:
            raise ConfigError(f"head {head!r} is not one of the combined adapters {list(names)}")
        return {p: plain_copy(h) for p, h in adapters[list(names).index(head)].head_items()}
    out: dict[str, nn.Module] = {}
    head_maps = [dict(a.head_items()) for a in adapters]
    for path in dict.fromkeys(p for heads in head_maps for p in heads):
        sources = [(n, heads[path], w) for n, heads, w in zip(names, head_maps, ws) if path in heads]
        shapes = {n: {k: tuple(t.shape) for k, t in h.state_dict().items()} for n, h, _ in sources}
        first = next(iter(shapes.values()))
        for n, shape in shapes.items():
            if shape != first:
                key = next(k for k in first if first[k] != shape.get(k))
                raise ConfigError(
                    f"the heads at {path} differ: {sources[0][0]} has {key} {first[key]}, "
                    f"{n} has {key} {shape.get(key)}; choose one with head='<adapter>' (or head='' for none)"
                )
        total = sum(w for _, _, w in sources)
        if abs(total) < 1e-12:
            raise ConfigError(f"the weights of the heads at {path} sum to 0; choose one with head='<adapter>'")
        new = plain_copy(sources[0][1])
        state = new.state_dict()
        with torch.no_grad():
            for key, t in state.items():
                if t.is_floating_point():
                    t.copy_(sum(w * h.state_dict()[key] for _, h, w in sources) / total)
        out[path] = new
    return out


def _norm_policy(adapters: list[Adapter], norms: str | None, names: Sequence[str]) -> str:
    """The combined adapter's ``norm_layers``: the chosen adapter's, or the widest of the sources'."""
    if norms:
        return adapters[list(names).index(norms)].config.norm_layers
    kinds = {a.config.norm_layers for a in adapters}
    return "all" if "all" in kinds else "batchnorm"


def _combine_norms(
    adapters: list[Adapter], names: Sequence[str], ws: list[float], norms: str | None,
    base_for: Callable[[str], nn.Module],
) -> dict[str, nn.Module]:
    """Norms of the new adapter: ``norms=""`` none (the backbone's run), ``norms=name`` that adapter's,
    otherwise at each path the weighted average Σwᵢθᵢ/Σwᵢ over every source (one that owns no norm there ran
    the backbone's, which is what it contributes) of the affine parameters and of the running mean and
    running variance (a BatchNorm's ``num_batches_tracked`` is the largest). An average whose running
    variance is not positive somewhere (a negative weight) is refused: that norm would divide by the square
    root of a negative number."""
    if norms == "":
        return {}
    if norms is not None:
        if norms not in names:
            raise ConfigError(f"norms {norms!r} is not one of the combined adapters {list(names)}")
        return {p: plain_copy(m) for p, m in adapters[list(names).index(norms)].norm_items()}
    out: dict[str, nn.Module] = {}
    maps = [dict(a.norm_items()) for a in adapters]
    for path in dict.fromkeys(p for m in maps for p in m):
        sources = [(m[path] if path in m else base_for(path), w) for m, w in zip(maps, ws)]
        total = sum(w for _, w in sources)
        if abs(total) < 1e-12:
            raise ConfigError(f"the weights of the norms at {path} sum to 0; choose one with norms='<adapter>'")
        new = plain_copy(sources[0][0])
        with torch.no_grad():
            for key, t in new.state_dict().items():
                values = [m.state_dict()[key] for m, _ in sources]
                if t.is_floating_point():
                    t.copy_(sum(w * v for v, (_, w) in zip(values, sources)) / total)
                else:
                    t.copy_(torch.stack(values).amax(0))
            var = getattr(new, "running_var", None)
            if isinstance(var, torch.Tensor) and not bool((var > 0).all()):
                raise CombineError(
                    f"the weighted running variance of the norms at {path} is not positive everywhere (weights "
                    f"{[w for _, w in sources]}); choose one adapter's norms with norms='<adapter>'"
                )
        out[path] = new
    return out
