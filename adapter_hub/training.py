"""Training: fit what is trainable (an adapter's deltas and head, or a whole network), evaluate, and start
a new domain's adapter from an existing one."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split
from .errors import AdapterHubError


class TrainingInterrupted(AdapterHubError, RuntimeError):
    """Training stopped by the user (Ctrl-C); nothing was registered."""


@dataclass
class FitResult:
    """Best validation accuracy, the step it was reached at, and the accuracy measured along the way."""

    best_accuracy: float
    best_step: int
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)

    def steps_to(self, accuracy: float) -> int | None:
        """The first evaluated step whose validation accuracy reached ``accuracy`` (None if never)."""
        return next((step for step, acc in self.history if acc >= accuracy), None)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in split.batches(batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


@contextmanager
def _interruptible() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        raise TrainingInterrupted("training interrupted; nothing was registered") from None


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    epochs: int = 5,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
    description: str = "training",
) -> FitResult:
    """Train every parameter of ``model`` that requires grad (for an AdapterModel: the active adapter's
    deltas and heads) with AdamW and a cosine schedule; evaluate on ``val`` every ``eval_every`` steps
    (default: each epoch) and keep the best state. Deterministic on CPU for a given seed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterHubError("nothing to train: activate an adapter (or unfreeze parameters) first")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    every = eval_every or steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    result = FitResult(best_accuracy=-1.0, best_step=0, steps=0)
    best_state: list[torch.Tensor] = [p.detach().clone() for p in params]
    bar = _progress(progress, description, total)
    step = 0
    with _interruptible(), bar:
        task = bar.add_task(description, total=total) if bar else None
        for _ in range(epochs):
            model.train()
            for x, y in train.batches(batch_size, shuffle=True, generator=generator):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if step % every == 0 or step == total:
                    acc = evaluate(model, val)
                    result.history.append((step, acc))
                    if acc > result.best_accuracy:
                        result.best_accuracy, result.best_step = acc, step
                        best_state = [p.detach().clone() for p in params]
                if bar:
                    bar.update(task, advance=1, description=f"{description} loss {loss.item():.3f}")
    with torch.no_grad():
        for p, best in zip(params, best_state):
            p.copy_(best)
    result.steps = step
    model.eval()
    return result


def _progress(enabled: bool, description: str, total: int):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)  # fmt: skip


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def __bool__(self) -> bool:
        return False


def transfer_init(model, source: str, new_name: str, *, head_modules: dict[str, nn.Module] | None = None):
    """Start adapter ``new_name`` from adapter ``source``: the same deltas and, where given heads do not
    replace them, the same heads (a head of another size starts fresh)."""
    adapter = model.adapter_from_bytes(new_name, model.adapter_to_bytes(source))
    for path, head in (head_modules or {}).items():
        key = path.replace(".", "/")
        if key in adapter.heads:
            mine = adapter.heads[key]
            if any(a.shape != b.shape for a, b in zip(mine.state_dict().values(), head.state_dict().values())):
                adapter.heads[key] = head
                model._head_sites[path].heads[new_name] = head
    adapter.metadata = {"transferred_from": source}
    return adapter


def full_finetune_copy(backbone: nn.Module, head_path: str, head: nn.Module) -> nn.Module:
    """A trainable copy of the backbone with a fresh head, for the full fine-tuning baseline."""
    from .lora import plain_copy

    model = plain_copy(backbone)
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, copy.deepcopy(head))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
