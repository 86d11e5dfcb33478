"""Per-sample routing: sort the batch by adapter once, and give the outputs back in input order.

Every input travels with the batch: each tensor, at any depth of the arguments (tuples, lists, dicts and
mappings such as Hugging Face's ``BatchEncoding`` or ``ModelOutput``), whose first dimension is the batch size
is sorted with the batch, and each such tensor of the output is put back in input order. A tensor whose first
dimension equals the batch size by coincidence (not one row per sample) is passed by keyword and named in
``unrouted`` — the rule is never guessed per tensor."""

from __future__ import annotations

import copy
import dataclasses
from collections import UserDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """A stable sort of the batch by adapter: ``perm`` takes input rows to sorted rows; adapter
    ``name``'s rows are the contiguous slice ``segments[i] = (name, start, end)`` of the sorted batch."""

    perm: torch.Tensor
    segments: tuple[tuple[str | None, int, int], ...]

    @classmethod
    def build(cls, route: Sequence[str | None], names: Sequence[str], batch: int, device: torch.device) -> Plan:
        if len(route) != batch:
            raise ConfigError(f"route has {len(route)} entries for a batch of {batch} samples")
        order = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(n) for n in route if n is not None and n not in order})
        if unknown:
            raise ConfigError(f"route names {unknown} which are not in the active Switch {list(names)}")
        codes = torch.tensor([order[n] if n is not None else len(names) for n in route], dtype=torch.long)
        perm = torch.sort(codes, stable=True).indices
        counts = torch.bincount(codes, minlength=len(names) + 1).tolist()
        segments, start = [], 0
        for name, count in zip([*names, None], counts):
            if count:
                segments.append((name, start, start + count))
                start += count
        return cls(perm.to(device), tuple(segments))


class RoutedOutput:
    """What a Switch forward returns: each adapter's outputs through its own head.

    - ``by_adapter[name]``: the outputs of the samples routed to ``name`` (in their input order),
      trimmed to that adapter's head width — compute each task's loss from these;
    - ``rows[name]``: their positions in the input batch;
    - ``out[i]`` / ``list(out)``: sample i's output, in input order;
    - ``padded``: all outputs in input order as one tensor, zero-padded to the widest head;
    - ``stack()``: the same when every head has the same width (an error otherwise).
    """

    def __init__(self, sorted_out: torch.Tensor, plan: Plan, widths: dict[str | None, int]) -> None:
        self._sorted, self._plan = sorted_out, plan
        full = sorted_out.shape[-1] if sorted_out.dim() else 0
        self.widths = {name: widths.get(name, full) for name, _, _ in plan.segments}
        self.by_adapter: dict[str | None, torch.Tensor] = {}
        self.rows: dict[str | None, torch.Tensor] = {}
        for name, start, end in plan.segments:
            self.by_adapter[name] = sorted_out[start:end, ..., : self.widths[name]]
            self.rows[name] = plan.perm[start:end]

    @property
    def padded(self) -> torch.Tensor:
        inverse = torch.empty_like(self._plan.perm)
        inverse[self._plan.perm] = torch.arange(len(self._plan.perm), device=self._plan.perm.device)
        return self._sorted.index_select(0, inverse)

    def stack(self) -> torch.Tensor:
        if len(set(self.widths.values())) > 1:
            raise ConfigError(f"the routed heads differ in width {self.widths}; use by_adapter, padded or list()")
        return self.padded

    def __len__(self) -> int:
        return len(self._plan.perm)

    def __getitem__(self, i: int) -> torch.Tensor:
        return list(self)[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self)
        for name, start, end in self._plan.segments:
            width = self.widths[name]
            for j, row in enumerate(self._plan.perm[start:end].tolist()):
                out[row] = self._sorted[start + j, ..., :width]
        return iter(out)  # type: ignore[arg-type]


def map_tensors(
    obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], leaf: Callable[[Any], Any] | None = None
) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside it, keeping each container's type: tuples (named ones
    too), lists, dicts and other mappings (``UserDict`` such as ``BatchEncoding``, dataclass mappings such as
    ``ModelOutput``) and dataclasses. Anything else is returned as it is, or as ``leaf`` returns it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn, leaf) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(v, fn, leaf) for v in obj]
    if isinstance(obj, UserDict):
        new = copy.copy(obj)
        new.data = {k: map_tensors(v, fn, leaf) for k, v in obj.data.items()}
        return new
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(v, fn, leaf) for k, v in obj.items()}
        if dataclasses.is_dataclass(obj):  # ModelOutput: a dataclass that is also an ordered dict
            return type(obj)(**mapped)
        if type(obj) is dict:
            return mapped
        try:
            return type(obj)(mapped)
        except TypeError:
            return mapped
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return dataclasses.replace(obj, **{f: map_tensors(getattr(obj, f), fn, leaf) for f in fields})
    return leaf(obj) if leaf is not None else obj


def _opaque(obj: Any) -> str | None:
    """The type name of an object that holds tensors where routing cannot reach them (an attribute of a plain
    object, a dataclass field that its constructor does not take), else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        hidden = [f.name for f in dataclasses.fields(obj) if not f.init]
        return type(obj).__name__ if any(isinstance(getattr(obj, f, None), torch.Tensor) for f in hidden) else None
    attributes = getattr(obj, "__dict__", None)
    plain = isinstance(attributes, dict) and not isinstance(obj, torch.nn.Module)
    if plain and any(isinstance(v, torch.Tensor) for v in attributes.values()):
        return type(obj).__name__
    return None


def _refuse_opaque(obj: Any, where: str) -> Any:
    name = _opaque(obj)
    if name is not None:
        raise ConfigError(
            f"a {name} in the {where} holds tensors that per-sample routing cannot reach (not a tensor, tuple, list, "
            "mapping or dataclass): pass them as tensors, or run each adapter's rows in its own call"
        )
    return obj


def _cache_rows(cache: Any) -> int | None:
    """The batch size a key/value cache holds (None while it is empty)."""
    for layer in getattr(cache, "layers", ()) or ():
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() > 0:
            return keys.shape[0]
    return None


def is_cache(obj: Any) -> bool:
    """A key/value cache (Hugging Face's ``Cache`` classes): per-sample tensors inside an object that reorders
    its own rows (``reorder_cache``, what beam search uses)."""
    return not isinstance(obj, torch.Tensor) and callable(getattr(obj, "reorder_cache", None))


def inverse_of(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse


def route_inputs(
    args: tuple,
    kwargs: dict[str, Any],
    perm: torch.Tensor,
    batch: int,
    unrouted: Collection[str] = (),
    caches: list[Any] | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The arguments with every per-sample tensor (first dimension ``batch``) taken in ``perm`` order; keyword
    arguments named in ``unrouted`` pass unchanged. At least one tensor must have the batch's rows.

    A key/value cache (:func:`is_cache`) is reordered in place, since the model appends to that very object;
    each one is added to ``caches`` so that the caller puts it back in input order after the forward."""
    unknown = sorted(set(unrouted) - set(kwargs))
    if unknown:
        raise ConfigError(f"unrouted names {unknown}, which are not keyword arguments of this call")
    seen: list[int] = []  # the leading size of every tensor met, in order

    def take(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0] if t.dim() else 0)
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        return t.index_select(0, perm.to(t.device))

    def collect(obj: Any) -> Any:
        if is_cache(obj):
            if all(c is not obj for c in met):
                met.append(obj)
            return obj
        return _refuse_opaque(obj, "inputs")

    met: list[Any] = []
    routed_args = map_tensors(args, take, collect)
    routed_kwargs = {k: (v if k in unrouted else map_tensors(v, take, collect)) for k, v in kwargs.items()}
    if batch not in seen:
        first = next((n for n in seen if n), None)
        size = f"a batch of {first} samples" if first is not None else "inputs that hold no tensor"
        raise ConfigError(f"route has {batch} entries for {size} (no input tensor has {batch} rows)")
    for cache in met:  # every check before the first cache is touched
        rows = _cache_rows(cache)
        if rows is not None and rows != batch:
            raise ConfigError(f"the key/value cache holds {rows} rows for a route of {batch}")
    for cache in met:
        cache.reorder_cache(perm.to(_device_of(cache, perm)))
        if caches is not None:
            caches.append(cache)
    return routed_args, routed_kwargs


def restore_order(obj: Any, perm: torch.Tensor, batch: int, done: Sequence[Any] = ()) -> Any:
    """``obj`` (a backbone's output of any structure, computed on the sorted batch) with every tensor whose
    first dimension is ``batch`` put back in input order, and every key/value cache in it reordered in place
    (except those in ``done``: the input caches, which the caller puts back itself)."""
    inverse = inverse_of(perm)

    def back(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        return t.index_select(0, inverse.to(t.device))

    def reorder(other: Any) -> Any:
        if is_cache(other):
            if all(c is not other for c in done):
                other.reorder_cache(inverse.to(_device_of(other, inverse)))
            return other
        return _refuse_opaque(other, "outputs")

    _refuse_per_sample_lists(obj, batch)
    return map_tensors(obj, back, reorder)


def _refuse_per_sample_lists(obj: Any, batch: int) -> None:
    """An output list or tuple with one non-tensor entry per sample (a dict per image, say) cannot be told from
    one that has as many entries by chance, so it is refused rather than returned in sorted order."""
    if isinstance(obj, (list, tuple)):
        entries = len(obj) == batch and not any(isinstance(v, torch.Tensor) for v in obj)
        if entries and any(_tensors_in(v) for v in obj):
            raise ConfigError(
                f"the backbone returns a sequence of {batch} entries that hold tensors, one per sample or not: "
                "routing cannot tell which; return per-sample results as tensors with the batch as dimension 0"
            )
        for v in obj:
            _refuse_per_sample_lists(v, batch)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _refuse_per_sample_lists(v, batch)


def _tensors_in(obj: Any) -> bool:
    found: list[bool] = []
    map_tensors(obj, lambda t: found.append(True) or t)
    return bool(found)


def put_back(caches: Sequence[Any], perm: torch.Tensor) -> None:
    """Reorder the key/value caches that :func:`route_inputs` took in ``perm`` order back to input order."""
    inverse = inverse_of(perm)
    for cache in caches:
        cache.reorder_cache(inverse.to(_device_of(cache, inverse)))


def _device_of(cache: Any, default: torch.Tensor) -> torch.device:
    """Where a cache keeps its tensors (the first layer's keys), for the index it is reordered by."""
    for layer in getattr(cache, "layers", ()) or ():
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.device
    return default.device
