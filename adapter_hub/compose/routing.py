"""Per-sample routing: sort the batch by adapter once, and give the outputs back in input order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
