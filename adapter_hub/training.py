"""Training: fit what is trainable (an adapter's deltas and head, or a whole network) with learning rates
chosen by what each parameter is, evaluate, and start a new domain's adapter from an existing one."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import checks, distributed
from .adapter import Adapter, module_key
from .compose.routing import map_tensors
from .data import Split
from .errors import AdapterHubError, ConfigError


class TrainingInterrupted(AdapterHubError, RuntimeError):
    """Training stopped by the user (Ctrl-C); nothing was registered."""


@dataclass
class FitResult:
    """Best validation accuracy, the step it was reached at, the accuracy measured along the way, and the
    peak learning rate and weight decay each parameter group trained with (see :data:`DEFAULTS`)."""

    best_accuracy: float
    best_step: int
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)
    weight_decays: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 0

    def steps_to(self, accuracy: float) -> int | None:
        """The first evaluated step whose validation accuracy reached ``accuracy`` (None if never)."""
        return next((step for step, acc in self.history if acc >= accuracy), None)


# --- learning rates by what is trained ------------------------------------------------------------------
@dataclass(frozen=True)
class GroupDefault:
    """The peak learning rate and the AdamW weight decay of one parameter group."""

    lr: float
    weight_decay: float


# The defaults of fit(lr=None), measured by benchmarks/lr_defaults.py (its table is in benchmarks/RESULTS.md):
# LoRA r=8 with the catalogue's targets on torchvision MobileNetV2 and ResNet-18 pretrained on digits at 64 px and
# on the demo's resnet_small / vit_small, runs of about 54 steps, against a full fine-tune of the same network.
DEFAULTS: dict[str, GroupDefault] = {
    # LoRA factors A, B (and DoRA magnitudes). Adam moves every entry by about lr per step whatever its gradient,
    # so the delta grows as lr·α/r. 5e-3 was the best measured: 1e-3 lost 4 to 14 points, 5e-4 6 to 23. The
    # divergence seen at 5e-3 with frozen BatchNorm and no warm-up came at 1e-2 here (ResNet-18: the first step
    # raised the loss, 28.7% in the end); with the warm-up and adapter-owned norms 1e-2 trained well too.
    "lora": GroupDefault(lr=5e-3, weight_decay=0.0),
    # A fresh task head, trained whole: it starts at chance and its gradient steers the factors; 1e-3 here
    # lost 2 to 4 points against 5e-3.
    "head": GroupDefault(lr=5e-3, weight_decay=0.0),
    # An adapter's own norm layers (affine scale and shift, starting from the backbone's): 5e-3, 1e-3 and 2e-4
    # were within noise of each other, 5e-3 a point ahead on average.
    "norm": GroupDefault(lr=5e-3, weight_decay=0.0),
    # Anything else: a plain network trained whole (the full fine-tune baseline, a backbone from scratch).
    # Adam's usual 1e-3; 3e-4 lost up to 13 points. 3e-3 was a point better on three of the four digits-pretrained
    # networks, but would wash out more of a strongly pretrained network's features.
    "other": GroupDefault(lr=1e-3, weight_decay=0.0),
}  # weight decay 0 everywhere: 0.05 changed nothing measurable in runs of tens of steps (AdamW decays lr·λ a step)
GROUPS = tuple(DEFAULTS)
# A linear warm-up over this share of the steps (at least one) before the cosine decay: the first steps, taken
# while the fresh head is still at chance, are small. 10% and 20% gave the same accuracy within noise, 20% slows
# the first steps (what steps-to-accuracy counts).
WARMUP_FRACTION = 0.1

# Modules whose parameters are a normalisation's affine scale and shift.
_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                       *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))  # fmt: skip

# fit's lr= and weight_decay=: None (the defaults), one number for every group, or some groups by name.
PerGroup = float | Mapping[str, float] | None


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of ``model`` that require grad, by group, in ``model.parameters()`` order; only
    groups that hold some. For each :class:`~adapter_hub.adapter.Adapter` inside ``model``: its layers'
    parameters (LoRA A and B, DoRA magnitudes) are ``lora``; its heads' are ``head``; its ``norms``' are
    ``norm``, and so is a head that is a normalisation layer (or a normalisation layer inside a head).
    Every other parameter (a plain network trained whole) is ``other``."""
    kind: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, Adapter):
            continue
        for p in module.layers.parameters():
            kind[id(p)] = "lora"
        for part, name in ((module.heads, "head"), (getattr(module, "norms", None), "norm")):
            for owner in part.modules() if part is not None else ():
                group = "norm" if isinstance(owner, _NORMS) else name
                for p in owner.parameters(recurse=False):
                    kind[id(p)] = group
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for p in model.parameters():
        if p.requires_grad:
            groups[kind.get(id(p), "other")].append(p)
    return {g: ps for g, ps in groups.items() if ps}


def _per_group(what: str, value: PerGroup, default: Callable[[str], float], low: float | None) -> dict[str, float]:
    """One value per group: the defaults (None), one number for every group, or a mapping of some groups
    (the others keep their defaults). A number is checked: finite and greater than ``low``, or at least 0."""

    def check(name: str, v: Any) -> float:
        if low is None:
            out = checks.number(name, v)
            if out < 0:
                raise ConfigError(f"{name} must be at least 0, got {out:g}")
            return out
        return checks.number(name, v, above=low)

    if value is None:
        return {g: default(g) for g in GROUPS}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise ConfigError(f"{what} names unknown parameter group(s) {', '.join(map(repr, unknown))}; the groups "
                              f"are {', '.join(GROUPS)}")  # fmt: skip
        return {g: check(f"{what}[{g!r}]", value[g]) if g in value else default(g) for g in GROUPS}
    number = check(what, value)
    return dict.fromkeys(GROUPS, number)


def learning_rates(lr: PerGroup = None, model: nn.Module | None = None) -> dict[str, float]:
    """The peak learning rate of every group for fit's ``lr``: None gives :data:`DEFAULTS`, a number sets
    every group, a mapping (e.g. ``{"lora": 1e-3}``) sets the groups it names. With ``model``, only the groups
    it would train now (what :func:`fit` will use and record, to say before training)."""
    lrs = _per_group("lr", lr, lambda g: DEFAULTS[g].lr, 0.0)
    return lrs if model is None else {g: lrs[g] for g in parameter_groups(model)}


def weight_decays(weight_decay: PerGroup = None) -> dict[str, float]:
    """The AdamW weight decay of every group, read as :func:`learning_rates` reads ``lr`` (at least 0)."""
    return _per_group("weight_decay", weight_decay, lambda g: DEFAULTS[g].weight_decay, None)


def warmup_steps(total: int) -> int:
    """The linear warm-up's length for ``total`` steps: ⌈WARMUP_FRACTION · total⌉, at least 1."""
    return max(1, math.ceil(WARMUP_FRACTION * total))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``.

    Warm-up: (s + 1) / (w + 1) for s < w, so that even one warm-up step starts below the peak; then the
    cosine ½ (1 + cos(π (s − w) / (T − w))) from 1 at s = w down towards 0 at s = T."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def format_lrs(lrs: Mapping[str, float]) -> str:
    """``lora 0.005, head 0.005``: the learning rates of a fit, for one line of output."""
    return ", ".join(f"{g} {v:g}" for g, v in lrs.items())


class Batches(Protocol):
    """What fit and evaluate read: a sized collection of labelled samples that yields (inputs, labels) batches
    (``data.Split`` for images, ``text.TextSplit`` for texts)."""

    def __len__(self) -> int: ...

    def batches(
        self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterable[tuple[Any, torch.Tensor]]: ...


def call(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """Run ``model`` on a batch's inputs of any structure: a mapping (a dict, a Hugging Face ``BatchEncoding``)
    is passed as keywords, a tuple or list as positional arguments, anything else (a tensor) as the one
    argument. ``kwargs`` (``route=``) are passed along."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def batch_rows(batch: Any) -> int:
    """The number of samples in a batch of any structure: the first dimension its tensors share. A tensor
    without that first dimension cannot be split into samples (for data-parallel training), so it is refused."""
    sizes: list[int] = []

    def note(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.shape[0] if t.dim() else -1)
        return t

    map_tensors(batch, note)
    if not sizes:
        raise AdapterHubError("a batch holds no tensors")
    if len(set(sizes)) > 1 or sizes[0] < 0:
        raise AdapterHubError(f"every tensor of a batch needs the samples as its first dimension; got first "
                              f"dimensions {sorted(set(sizes))}")  # fmt: skip
    return sizes[0]


def take_rows(batch: Any, rows: slice) -> Any:
    """The same structure with every tensor cut to ``rows`` (its first dimension)."""
    return map_tensors(batch, lambda t: t[rows])


def loss_sum(model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
    """Σ over the batch's samples of the cross-entropy of ``model(inputs)`` against the labels; the inputs are
    passed as :func:`call` says."""
    inputs, y = batch
    out = call(model, inputs)
    if not isinstance(out, torch.Tensor):  # GoogLeNet / Inception v3 return their auxiliary logits in training
        raise ConfigError(f"the model returns a {type(out).__name__} in training, not a tensor of logits: build "
                          "it without auxiliary outputs (torchvision: aux_logits=False) or train it with your own "
                          "loss")  # fmt: skip
    return F.cross_entropy(out, y, reduction="sum")


@torch.no_grad()
def evaluate(model: nn.Module, split: Batches, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode, restored afterwards); the inputs of a batch may
    have any structure :func:`call` takes."""
    was_training = model.training
    model.eval()
    correct = 0
    for inputs, y in split.batches(batch_size):
        correct += int((call(model, inputs).argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn Ctrl-C inside the block into TrainingInterrupted: one line for the CLI, and the caller has not
    registered anything yet."""
    try:
        yield
    except KeyboardInterrupt:
        raise TrainingInterrupted("training interrupted; nothing was registered") from None


# A batch is a tuple whose tensors, at any depth (an inputs dict, a BatchEncoding), share the first dimension:
# the samples. Its loss function returns the *sum* of the per-sample losses of the rows it is given (see
# distributed.py for why a sum over the global size).
Batch = tuple[Any, ...]


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    *,
    epochs: int = 5,
    lr: PerGroup = None,
    weight_decay: PerGroup = None,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
    description: str = "training",
) -> FitResult:
    """Train every parameter of ``model`` that requires grad (for an AdapterModel: the active adapter's
    deltas and heads) with AdamW, a linear warm-up and a cosine schedule (:func:`lr_factor`); evaluate on
    ``val`` every ``eval_every`` steps (default: each epoch) and keep the best state. Deterministic on CPU
    for a given seed. Under torchrun the global batches are split across the processes (see
    ``adapter_hub.distributed``).

    The parameters train in groups (:func:`parameter_groups`: ``lora``, ``head``, ``norm``, ``other``), each
    with its own peak learning rate and weight decay: :data:`DEFAULTS` when ``lr`` / ``weight_decay`` is
    None, one number for all groups, or a mapping of some groups (``{"lora": 1e-3}``). The result records
    the ones used.

    ``train`` and ``val`` yield (inputs, labels) batches; the inputs may be a tensor, a tuple of tensors or a
    mapping of tensors (a tokenizer's output: ``model(**inputs)``), see :func:`call`."""
    return _train_loop(
        model, lambda g: train.batches(batch_size, shuffle=True, generator=g), lambda b: loss_sum(model, b),
        lambda: evaluate(model, val),
        steps_per_epoch=math.ceil(len(train) / batch_size), epochs=epochs, lr=lr, weight_decay=weight_decay,
        seed=seed, eval_every=eval_every, progress=progress, description=description,
    )  # fmt: skip


def _train_loop(
    model: nn.Module,
    batches: Callable[[torch.Generator], Iterable[Batch]],
    loss_sum: Callable[[Batch], torch.Tensor],
    score: Callable[[], float],
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: PerGroup,
    weight_decay: PerGroup,
    seed: int,
    eval_every: int | None,
    progress: bool,
    description: str,
) -> FitResult:
    with interruptible():
        return _train(model, batches, loss_sum, score, steps_per_epoch=steps_per_epoch, epochs=epochs, lr=lr,
                      weight_decay=weight_decay, seed=seed, eval_every=eval_every, progress=progress,
                      description=description)  # fmt: skip


def _train(
    model: nn.Module,
    batches: Callable[[torch.Generator], Iterable[Batch]],
    loss_sum: Callable[[Batch], torch.Tensor],
    score: Callable[[], float],
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: PerGroup,
    weight_decay: PerGroup,
    seed: int,
    eval_every: int | None,
    progress: bool,
    description: str,
) -> FitResult:
    lrs, decays = learning_rates(lr), weight_decays(weight_decay)  # bad values refused before any work
    groups = parameter_groups(model)
    if not groups:
        raise AdapterHubError("nothing to train: activate an adapter (or unfreeze parameters) first")
    params = [p for ps in groups.values() for p in ps]
    was_training = model.training
    model.train()
    try:
        distributed.refuse_batch_statistics(_adapter_norms(model))  # before the first collective
    except ConfigError:
        model.train(was_training)
        raise
    distributed.broadcast_parameters(params)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # the same batches in every process
    total = epochs * steps_per_epoch
    every = eval_every or steps_per_epoch
    warmup = warmup_steps(total)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lrs[g], "weight_decay": decays[g], "name": g} for g, ps in groups.items()]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    result = FitResult(best_accuracy=-1.0, best_step=0, steps=0, lrs={g: lrs[g] for g in groups},
                       weight_decays={g: decays[g] for g in groups}, warmup_steps=warmup)  # fmt: skip
    # a BatchNorm that trains (an adapter's own, or a network's trained whole) moves its running statistics
    # with every step: the best step's are kept with its parameters (the frozen backbone's are in eval mode)
    kept = [*params, *(b for m in model.modules() if m.training for b in m.buffers(recurse=False))]
    best_state: list[torch.Tensor] = [t.detach().clone() for t in kept]
    bar = _progress(progress and distributed.is_main(), description, total)
    step, acc = 0, float("nan")
    with bar:
        task = bar.add_task(description, total=total) if bar else None
        for _ in range(epochs):
            model.train()
            for batch in batches(generator):
                n = batch_rows(batch)
                rows = distributed.shard(n)
                optimizer.zero_grad(set_to_none=True)
                loss = None
                if rows.stop > rows.start:
                    loss = loss_sum(take_rows(batch, rows)) / n
                    loss.backward()
                distributed.all_reduce_gradients(params)
                optimizer.step()
                schedule.step()
                step += 1
                if step % every == 0 or step == total:
                    acc = score()
                    result.history.append((step, acc))
                    if acc > result.best_accuracy:
                        result.best_accuracy, result.best_step = acc, step
                        best_state = [t.detach().clone() for t in kept]
                if bar:
                    shown = f"loss {loss.item():.3f}" if loss is not None else ""
                    bar.update(task, advance=1, description=f"{description} {shown} val acc {acc:.1%}")
    optimizer.zero_grad(set_to_none=True)  # the last step's gradients would hold memory for nothing
    with torch.no_grad():
        for t, best in zip(kept, best_state):
            t.copy_(best)
    result.steps = step
    model.eval()
    return result


def _adapter_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The normalisation layers and heads of the adapters being trained, by backbone path."""
    for adapter in model.modules():
        if isinstance(adapter, Adapter) and any(p.requires_grad for p in adapter.parameters()):  # being trained
            for path, module in [*adapter.norm_items(), *adapter.head_items()]:
                yield from ((f"{path}.{n}" if n else path, m) for n, m in module.named_modules())


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


# --- several tasks at once: a Switch over their adapters, mixed batches ---------------------------------
@torch.no_grad()
def evaluate_routed(model: Any, name: str, split: Batches, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of adapter ``name`` on ``split`` through the active Switch (its own head)."""
    was_training = model.training
    model.eval()
    correct = 0
    for inputs, y in split.batches(batch_size):
        out = call(model, inputs, route=[name] * len(y)).by_adapter[name]
        correct += int((out.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


def multitask_loss_sum(model: Any, names: Sequence[str], batch: Batch) -> torch.Tensor:
    """Σ over the samples of a mixed batch of each sample's loss through its own adapter and head.

    ``batch`` is (x, y, task index into ``names``). One backward over it gives each adapter the gradient
    of its own samples' losses only: the routing sends no other sample through its deltas or head."""
    x, y, codes = batch
    out = model(x, route=[names[int(c)] for c in codes])
    total = x.new_zeros(())
    for name, logits in out.by_adapter.items():
        total = total + F.cross_entropy(logits, y[out.rows[name]], reduction="sum")
    return total


@dataclass
class MultiTaskResult(FitResult):
    """A FitResult whose accuracy is the mean over the tasks; ``per_task`` at the best step."""

    per_task: dict[str, float] = field(default_factory=dict)


def fit_multitask(
    model: Any,
    tasks: Mapping[str, tuple[Split, Split]],
    *,
    epochs: int = 5,
    lr: PerGroup = None,
    weight_decay: PerGroup = None,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
    description: str = "multi-task",
) -> MultiTaskResult:
    """Train several task adapters together: ``tasks`` maps adapter names to (train, val) splits. The
    training sets are pooled and shuffled, so each batch mixes the tasks; a Switch routes every sample
    through its own adapter and head, and one optimizer step updates each adapter from its own samples.
    The best state is the one with the best mean validation accuracy over the tasks; ``lr`` and
    ``weight_decay`` are read as :func:`fit` reads them."""
    from .compose import Switch

    names = list(tasks)
    if not names:
        raise AdapterHubError("fit_multitask needs at least one task")
    shapes = {tuple(train.x.shape[1:]) for train, _ in tasks.values()}
    if len(shapes) > 1:
        raise AdapterHubError(f"the tasks' images differ in shape ({sorted(shapes)}); one batch cannot mix them")
    pooled = Split(torch.cat([t.x for t, _ in tasks.values()]), torch.cat([t.y for t, _ in tasks.values()]))
    codes = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, (t, _) in enumerate(tasks.values())])
    model.activate(Switch(*names))
    per_task: dict[str, float] = {}

    def batches(g: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(pooled), generator=g)
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            yield pooled.x[rows], pooled.y[rows], codes[rows]

    def score() -> float:
        accs = {n: evaluate_routed(model, n, val) for n, (_, val) in tasks.items()}
        mean = sum(accs.values()) / len(accs)
        if not per_task or mean > sum(per_task.values()) / len(per_task):
            per_task.clear()
            per_task.update(accs)
        return mean

    base = _train_loop(
        model, batches, lambda b: multitask_loss_sum(model, names, b), score,
        steps_per_epoch=math.ceil(len(pooled) / batch_size), epochs=epochs, lr=lr, weight_decay=weight_decay,
        seed=seed, eval_every=eval_every, progress=progress, description=description,
    )  # fmt: skip
    return MultiTaskResult(base.best_accuracy, base.best_step, base.steps, base.history, base.lrs,
                           base.weight_decays, base.warmup_steps, per_task=dict(per_task))  # fmt: skip


def transfer_init(model, source: str, new_name: str, *, head_modules: dict[str, nn.Module] | None = None):
    """Start adapter ``new_name`` from adapter ``source``: the same deltas and, where given heads do not
    replace them, the same heads (a head of another size starts fresh)."""
    adapter = model.add_adapter_from_record(new_name, model.export_record(source))  # a copy, no bytes between
    for path, head in (head_modules or {}).items():
        key = module_key(path)
        if key in adapter.heads:
            mine = adapter.heads[key]
            if any(a.shape != b.shape for a, b in zip(mine.state_dict().values(), head.state_dict().values())):
                model.set_head(new_name, path, head)
    adapter.metadata = {"transferred_from": source}
    return adapter


def full_finetune_copy(backbone: nn.Module, head_path: str, head: nn.Module) -> nn.Module:
    """A trainable copy of the backbone with a fresh head, for the full fine-tuning baseline."""
    from .compose.sites import plain_copy

    model = plain_copy(backbone)
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, copy.deepcopy(head))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
