"""Data-parallel training across the processes `torchrun` starts (gloo on CPU, NCCL on GPUs).

Every process holds the whole model and draws the same seeded global batches; each takes its own
contiguous rows, and the gradients are summed across processes before every optimizer step. The loss of
each process is its rows' loss sum divided by the *global* batch size, so the summed gradient is exactly
the gradient of the global batch's mean loss: the same as one process on the whole batch, including a
last batch that does not split evenly and a Switch whose adapters are missing from one process's rows
(which torch's DistributedDataParallel would need `find_unused_parameters` for, and still average
unevenly). Only the rank-0 process writes to the registry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from .errors import ConfigError


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def setup() -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); True if distributed."""
    dist = _dist()
    if dist is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def shard(n: int) -> slice:
    """This process's contiguous rows of a global batch of ``n`` (sizes differ by at most one)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every gradient over the processes. A parameter no process computed a gradient for keeps
    ``grad=None`` (so the optimizer skips it, as it would in one process); one that only some processes
    reached counts as zero on the others."""
    rank, size = world()
    if size == 1:
        return
    dist = _dist()
    assert dist is not None
    device = params[0].device if params else torch.device("cpu")
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(reached)
    live = [p for p, r in zip(params, reached.tolist()) if r > 0]
    for p, r in zip(params, reached.tolist()):
        if r == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = torch.zeros_like(p)
    if live:  # one flat buffer: one collective per step instead of one per tensor
        flat = torch.cat([p.grad.reshape(-1) for p in live])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        offset = 0
        for p in live:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every process rank 0's values (as DistributedDataParallel does when it wraps a model), so
    that adapters initialised from each process's own random state start the same."""
    if world()[1] == 1 or not params:
        return
    dist = _dist()
    assert dist is not None
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def refuse_batch_statistics(modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
    """Refuse to train in more than one process when one of ``modules`` (an adapter's own norms and heads) is
    a BatchNorm in training mode: each process would normalise its rows with their own batch statistics, so
    N processes would not train what one process trains on the same global batches. Every process makes the
    same check before the first step, so all of them stop."""
    _, size = world()
    if size == 1:
        return
    for path, module in modules:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            raise ConfigError(
                f"the adapter owns the BatchNorm {path}, whose batch statistics each of the {size} processes would "
                "take over its own rows only (not what one process trains): train in one process, or with "
                "norm_layers='frozen' (train --norm-layers frozen)"
            )


def barrier() -> None:
    if world()[1] > 1:
        dist = _dist()
        assert dist is not None
        dist.barrier()


def teardown() -> None:
    dist = _dist()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
