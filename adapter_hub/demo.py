"""The main job: a real-data scenario end to end on the registry.

Real handwritten digits (scikit-learn) are split into two disjoint pools. A torchvision backbone (a small
ResNet, or a small VisionTransformer on the digits resized to 16 px) is trained on the source pool in the
original domain, frozen and registered. For three target domains (rotated, inverted, noisy: the target pool,
shifted) and a compound one (rotated and noisy) it trains a LoRA adapter (with its own head and normalisation
layers) and compares it with a head-only probe and a full fine-tune; it starts the compound domain's adapter
once more from the rotated adapter (transfer) and counts the steps to the fresh adapter's accuracy; it
combines three adapters with TIES into one multi-task adapter and routes a mixed batch of all four tasks per
sample with a Switch. Everything is registered with its metrics and lineage; a second run reuses what is
registered.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import backbones, checks, data, training
from .compose import Switch
from .data import ImageInputs, Split
from .errors import ConfigError
from .lora import LoRAConfig
from .model import AdapterModel
from .registry import Hub, parse_ref
from .registry.errors import AlreadyExists, NotFound
from .registry.records import Parent

TARGETS = ("rotated", "inverted", "noisy", "rotated-noisy")
MERGED = ("rotated", "inverted", "noisy")  # the 3-task TIES average
TRANSFER_FROM = {"rotated-noisy": "rotated"}  # a compound shift started from the adapter of one of its parts
ALIAS = "demo"


@dataclass(frozen=True)
class Recipe:
    """How the demo trains one kind of backbone and its adapters: the defaults of :class:`DemoSettings` for it,
    measured on the digits (see the README's demo section for the numbers they give).

    ``image_size``: the digits are resized to it on the data side and the size is recorded in the backbone's
    source (``inputs``), so every later use of the backbone (``train --data``, ``predict``) resizes the same
    way; None keeps the 8 px images. ``augment``: the backbone's training batches are randomly rotated,
    scaled and shifted (:class:`Augmented`) — a ViT trained from scratch on 538 images overfits without it.
    ``lr``: the adapters' peak learning rate per parameter group (``training.fit``'s groups); ``full_lr``:
    the full fine-tune's."""

    architecture: str
    rank: int
    backbone_epochs: int
    epochs: int
    backbone_lr: float
    lr: dict[str, float]
    full_lr: float
    norm_layers: str
    targets: tuple[str, ...] | None = None  # None: the catalogue entry's
    image_size: int | None = None
    augment: bool = False
    backbone_weight_decay: float = 0.0


RECIPES: dict[str, Recipe] = {
    "resnet": Recipe("resnet_small", rank=8, backbone_epochs=8, epochs=8, backbone_lr=2e-3,
                     lr={"lora": 5e-3, "head": 5e-3, "norm": 5e-3}, full_lr=1e-3, norm_layers="batchnorm"),
    # LoRA on the attention (in_proj and out_proj) and the patch embedding only: at width 128 a rank-4 delta on
    # the MLPs too would double the share past 3%.
    "vit": Recipe("vit_small", rank=4, backbone_epochs=150, epochs=20, backbone_lr=2e-3,
                  lr={"lora": 5e-3, "head": 5e-3, "norm": 5e-3}, full_lr=1e-3, norm_layers="all",
                  targets=("conv_proj", "*.self_attention"), image_size=16, augment=True, backbone_weight_decay=0.05),
}  # fmt: skip


@dataclass
class DemoSettings:
    """What a run changes; None takes the backbone's :data:`RECIPES` value (α: twice the rank)."""

    backbone: str = "resnet"  # resnet | vit
    rank: int | None = None
    alpha: float | None = None
    backbone_epochs: int | None = None
    epochs: int | None = None  # adapters and the full fine-tune alike
    seed: int = 0
    progress: bool = True

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.backbone]

    @property
    def architecture(self) -> str:
        return self.recipe.architecture


@dataclass
class TaskRow:
    task: str
    head_only: float
    lora: float
    full: float
    transfer: float | None
    merged: float | None
    switched: float
    share_head: float
    share_lora: float
    steps_fresh: int | None
    steps_transfer: int | None


@dataclass
class DemoResult:
    rows: list[TaskRow]
    backbone: str
    backbone_accuracy: float
    reused: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    lineage_root: str = ""
    seconds: float = 0.0
    rank: int = 8  # the LoRA rank the adapters were trained with

    def goals(self) -> list[tuple[str, str, bool]]:
        """(goal, measured, met) for the goals the demo reports on: on every domain LoRA reaches 99% of the full
        fine-tune's test accuracy while training at most 3% of the backbone's parameters (LoRA factors, head
        and owned norms together); the transferred adapter reaches its target in at most half the steps; the
        3-task TIES adapter keeps 85% of the tasks' own adapters' accuracy on average (normalized accuracy);
        the per-sample switch keeps all of it."""
        rows = self.rows
        ratios = [(r.lora / r.full if r.full else 0.0, r) for r in rows]
        ratio, worst = min(ratios, key=lambda t: t[0]) if ratios else (0.0, None)
        share = max(r.share_lora for r in rows) if rows else 1.0
        step_ratios = [r.steps_transfer / r.steps_fresh for r in rows if r.steps_fresh and r.steps_transfer]
        worst_steps = max(step_ratios) if step_ratios else float("nan")
        in_merge = [r for r in rows if r.merged is not None]
        merged = sum(r.merged / r.lora for r in in_merge) / len(in_merge) if in_merge else 0.0  # type: ignore[operator]
        switched = sum(r.switched / r.lora for r in rows) / len(rows) if rows else 0.0
        where = f" ({worst.task}: {worst.lora:.1%} vs {worst.full:.1%})" if worst else ""
        return [
            ("LoRA ≥ 99% of full fine-tuning on every domain", f"{ratio:.1%} on the worst{where}", ratio >= 0.99),
            ("≤ 3% of the parameters trainable (LoRA + head + norms)", f"{share:.2%}", share <= 0.03),
            ("transfer reaches the target in ≤ 50% of the steps", f"{worst_steps:.0%} of the fresh steps",
             worst_steps <= 0.5),
            ("3-task TIES average ≥ 85% normalized accuracy", f"{merged:.1%}", merged >= 0.85),
            ("switch keeps 100%", f"{switched:.1%}", switched >= 0.999),
        ]  # fmt: skip


def _say(progress: bool, text: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[dim]{text}[/dim]")


def run_demo(hub: Hub, settings: DemoSettings | None = None) -> DemoResult:
    """Run (or, where the registry already holds it, reuse) every step of the scenario, in order: the data, the
    backbone, the tasks, the per-domain adapters, the transfer, the TIES combination, the switch and the result.

    The order is part of the result: the fresh heads are drawn from torch's global generator, so the same
    seed gives the same numbers only in this order."""
    s = _checked(settings or DemoSettings(), hub)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    result = DemoResult(rows=[], backbone=f"digits-{s.recipe.architecture}", backbone_accuracy=0.0, rank=s.rank)
    inputs = ImageInputs.of(s.recipe.image_size)
    source, targets = _load_data(s.seed, inputs)
    backbone = _obtain_backbone(hub, s, inputs, source, result)
    scenario = _Scenario(hub, s, backbone, targets, result)
    scenario.register_tasks()
    scenario.domain_adapters()
    scenario.transfer()
    scenario.combine_ties()
    scenario.report(scenario.switch())
    result.seconds = time.perf_counter() - start
    return result


def _task_name(domain: str) -> str:
    return f"digits-{domain}"


def _load_data(seed: int, inputs: ImageInputs) -> tuple[data.Dataset, dict[str, data.Dataset]]:
    """The data: scikit-learn's digits split into two disjoint pools, the source pool in the original domain
    (the backbone's) and the target pool under each of TARGETS' shifts, each image transformed as the
    backbone records (``inputs``: resized for the ViT). Registers nothing. Each dataset draws from generators
    of its own, so loading them here leaves torch's global generator untouched."""
    source = data.transform_dataset(data.digits("original", pool="source", seed=seed), inputs)
    return source, {d: data.transform_dataset(data.digits(d, pool="target", seed=seed), inputs) for d in TARGETS}


class Augmented:
    """A split whose shuffled batches are randomly rotated (±12°), scaled (±10%) and shifted (±1/8 of the
    side) per image, drawn from the training generator, so a seed gives the same batches. Bilinear
    resampling with zeros outside, which is the digits' background. Evaluation batches are the images as
    they are. Rotations stay far from the ``rotated`` domain's 90°."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        for x, y in self.split.batches(size, shuffle=shuffle, generator=generator):
            yield (_jitter(x, generator) if shuffle else x), y


def _jitter(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each image through its own affine map: output pixel p samples the input at θ·p, where
    θ = R(φ)/s · [[1, 0], [0, 1]] + t in the normalized coordinates of ``F.affine_grid`` ([-1, 1] across the
    image), φ ∈ ±12°, s ∈ 1 ± 0.1 and t ∈ ±0.25 (1/8 of the side)."""
    import torch.nn.functional as F

    n = x.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle, scale, shift = uniform(n) * math.radians(12), 1 + uniform(n) * 0.1, uniform(n, 2) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _obtain_backbone(hub: Hub, s: _Plan, inputs: ImageInputs, source: data.Dataset, result: DemoResult) -> nn.Module:
    """The backbone ``digits-<architecture>``: reused when it is registered and the weights saved under the
    registry home give its registered fingerprint; otherwise trained on the source pool (with
    :class:`Augmented` batches where the recipe says so), its weights saved (safetensors, under
    ``<home>/backbones``) and registered with its fingerprint and its source, which records ``inputs`` (a
    record of the same fingerprint is kept). Sets the source-domain test accuracy on ``result`` and returns
    the backbone frozen."""
    recipe = s.recipe
    weights_path = hub.home / "backbones" / f"{result.backbone}.safetensors"
    backbone_source = backbones.with_inputs(
        {"architecture": recipe.architecture, "num_classes": 10, "seed": s.seed, "weights": str(weights_path)}, inputs
    )
    backbone = None
    try:
        known = hub.backbone(result.backbone)
        if weights_path.exists():
            candidate = backbones.build_backbone(backbone_source)
            if AdapterModel(candidate).fingerprint == known.fingerprint:
                backbone = candidate
                result.reused.append(f"backbone {result.backbone}")
    except NotFound:
        pass
    if backbone is None:
        _say(s.progress, f"training backbone {result.backbone} on the source domain")
        backbone = backbones.build_backbone({**backbone_source, "weights": None})
        train = Augmented(source.train) if recipe.augment else source.train
        training.fit(backbone, train, source.val, epochs=s.backbone_epochs, lr=recipe.backbone_lr,
                     weight_decay=recipe.backbone_weight_decay, seed=s.seed, progress=s.progress,
                     description="backbone")  # fmt: skip
        backbones.save_weights(backbone, weights_path)
        hub.add_backbone(result.backbone, backbone, architecture=recipe.architecture, source=backbone_source,
                         exist_ok=True)  # fmt: skip
        result.trained.append(f"backbone {result.backbone}")
    result.backbone_accuracy = training.evaluate(backbone, source.test)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


class _Scenario:
    """The steps over the frozen backbone, on one AdapterModel that holds every adapter of the run.

    Each registered version gets the ``demo`` alias, which is how a second run finds it to reuse it."""

    def __init__(self, hub: Hub, s: _Plan, backbone: nn.Module, sets: dict[str, data.Dataset],
                 result: DemoResult) -> None:  # fmt: skip
        self.hub, self.s, self.backbone, self.sets, self.result = hub, s, backbone, sets, result
        self.entry = backbones.entry(s.recipe.architecture)
        self.model = AdapterModel(backbone)
        self.n_backbone = self.model.num_backbone_parameters()
        targets = list(s.recipe.targets or self.entry.targets)
        self.lora_cfg = LoRAConfig(r=s.rank, alpha=s.alpha, targets=targets, heads=[self.entry.head],
                                   norm_layers=s.recipe.norm_layers)  # fmt: skip
        self.head_cfg = LoRAConfig(targets=[], heads=[self.entry.head], norm_layers="frozen")  # the head alone
        self.stats: dict[str, dict[str, float]] = {}  # per domain: its fresh adapter's metrics
        self.transfer_stats: dict[str, dict[str, float]] = {}  # per domain of TRANSFER_FROM
        self.merged_ref = f"digits-multitask/ties-r{s.rank * len(MERGED)}@{ALIAS}"

    def _lora_ref(self, domain: str, suffix: str = "") -> str:
        return f"{_task_name(domain)}/lora-r{self.s.rank}{suffix}@{ALIAS}"

    def _obtain(self, ref: str, name: str, train: Callable[[], dict[str, float]], **register: Any) -> dict[str, float]:
        """Load ``ref`` into the model as ``name`` and return its registered metrics if it is registered; else
        train it, register it with ``register``'s keywords and the metrics ``train`` returns, and alias it."""
        try:
            version = self.hub.load_into(self.model, ref, name=name)
            self.result.reused.append(version.ref)
            return {m.name: m.value for m in self.hub.metrics(version.ref)}
        except NotFound:
            metrics = train()
            parsed = parse_ref(ref)
            version = self.hub.register(self.model, name, task=parsed.task, name=parsed.adapter, metrics=metrics,
                                        **register)  # fmt: skip
            self.hub.set_alias(version.ref, ALIAS)
            self.result.trained.append(version.ref)
            return metrics

    def register_tasks(self) -> None:
        """The tasks: ``digits-<domain>`` for each of TARGETS and ``digits-multitask`` (domain: the merged
        domains joined by ``+``), each with 10 classes and ``test/accuracy`` as its metric; ones already
        registered are left as they are."""
        for name, domain in [*((_task_name(d), d) for d in TARGETS), ("digits-multitask", "+".join(MERGED))]:
            with contextlib.suppress(AlreadyExists):
                self.hub.add_task(name, domain=domain, num_classes=10, metric="test/accuracy")

    def domain_adapters(self) -> None:
        """The per-domain adapters: for each of TARGETS, reuses ``digits-<domain>/lora-r<rank>@demo`` with its
        metrics, or trains a head-only probe, the LoRA adapter (with a head of its own) and a full fine-tune,
        and registers the adapter with its test and validation accuracy, its steps to 95% of its best validation
        accuracy, and the two baselines' test accuracies and the probe's trainable share (the baselines
        themselves are not registered)."""
        for domain in TARGETS:
            self.stats[domain] = self._obtain(
                self._lora_ref(domain), domain, partial(self._train_domain, domain),
                description=f"LoRA r={self.s.rank} on the {domain} digits",
            )  # fmt: skip

    def _train_domain(self, domain: str) -> dict[str, float]:
        s, model, ds, head = self.s, self.model, self.sets[domain], self.entry.head
        _say(s.progress, f"training {_task_name(domain)}: head-only probe, LoRA adapter, full fine-tune")
        model.add_adapter(f"{domain}-head", self.head_cfg, head_modules={head: _fresh_head(self.backbone, head)})
        model.activate(f"{domain}-head")
        training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.recipe.lr, seed=s.seed, progress=s.progress,
                     description=f"{domain} head-only")  # fmt: skip
        head_only = training.evaluate(model, ds.test)
        head_share = model.num_trainable_parameters(f"{domain}-head") / self.n_backbone
        model.delete_adapter(f"{domain}-head")

        model.add_adapter(domain, self.lora_cfg, head_modules={head: _fresh_head(self.backbone, head)})
        model.activate(domain)
        fit = training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.recipe.lr, seed=s.seed, eval_every=3,
                           progress=s.progress, description=f"{domain} LoRA")  # fmt: skip
        full_model = training.full_finetune_copy(self.backbone, head, _fresh_head(self.backbone, head))
        training.fit(full_model, ds.train, ds.val, epochs=s.epochs, lr=s.recipe.full_lr, seed=s.seed,
                     progress=s.progress, description=f"{domain} full fine-tune")  # fmt: skip
        model.activate(domain)
        return {
            "test/accuracy": training.evaluate(model, ds.test),
            "val/accuracy": fit.best_accuracy,
            "baseline/head_only_accuracy": head_only,
            "baseline/head_only_share": head_share,
            "baseline/full_finetune_accuracy": training.evaluate(full_model, ds.test),
            "train/steps_to_target": float(fit.steps_to(0.95 * fit.best_accuracy) or fit.steps),
        }

    def transfer(self) -> None:
        """The transfer: for each compound domain of TRANSFER_FROM, reuses
        ``digits-<domain>/lora-r<rank>-transfer@demo``, or starts an adapter from its part's adapter (the one
        the per-domain step registered or reused), trains it, and registers it with a ``transferred_from`` edge
        to that adapter, its test and validation accuracy, and its steps to 95% of the fresh adapter's best
        validation accuracy (ten times its steps when it never gets there)."""
        for domain, parent in TRANSFER_FROM.items():
            self.transfer_stats[domain] = self._obtain(
                self._lora_ref(domain, "-transfer"), f"{domain}-transfer",
                partial(self._train_transfer, domain, parent),
                parents=[(self._lora_ref(parent), "transferred_from")],
                description=f"{domain} adapter started from the {parent} adapter",
            )  # fmt: skip

    def _train_transfer(self, domain: str, parent: str) -> dict[str, float]:
        s, model, ds = self.s, self.model, self.sets[domain]
        _say(s.progress, f"training {_task_name(domain)} from the {parent} adapter")
        training.transfer_init(model, parent, f"{domain}-transfer")
        model.activate(f"{domain}-transfer")
        fit = training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.recipe.lr, seed=s.seed, eval_every=3,
                           progress=s.progress, description=f"{domain} from {parent}")  # fmt: skip
        target = 0.95 * self.stats[domain]["val/accuracy"]
        return {
            "test/accuracy": training.evaluate(model, ds.test),
            "val/accuracy": fit.best_accuracy,
            "train/steps_to_target": float(fit.steps_to(target) or fit.steps * 10),
        }

    def combine_ties(self) -> None:
        """The TIES combination: reuses ``digits-multitask/ties-r<3·rank>@demo``, or combines the MERGED
        domains' adapters' deltas with TIES into one multi-task adapter (each task keeps its own head) and
        registers it with the chosen λ and density, its normalized validation accuracy, and one
        ``composed_from`` edge per parent carrying the weight, the method and its parameters. Each task runs
        it with its own head and norms, their statistics re-estimated under the merged deltas
        (:meth:`_task_view`)."""
        try:
            version = self.hub.load_into(self.model, self.merged_ref, name="multitask")
            self.result.reused.append(version.ref)
        except NotFound:
            metrics = self._choose_ties()
            recipe = self.model.adapters["multitask"].metadata["recipe"]
            version = self.hub.register(
                self.model, "multitask", task="digits-multitask", name=f"ties-r{self.s.rank * len(MERGED)}",
                metrics=metrics,
                parents=[Parent(self._lora_ref(d), "composed_from", weight=w, method="ties", params=recipe["params"])
                         for d, w in zip(MERGED, recipe["weights"])],
                description="TIES average of three domain adapters",
            )  # fmt: skip
            self.hub.set_alias(version.ref, ALIAS)
            self.result.trained.append(version.ref)

    def _choose_ties(self) -> dict[str, float]:
        """Combine ``multitask`` with the scale λ and density that score best on the validation sets, as in
        the TIES paper (the test sets stay unseen); returns the metrics it is registered with."""
        _say(self.s.progress, "combining three adapters with TIES (λ and density chosen on validation)")
        rank = self.s.rank * len(MERGED)
        alone: dict[str, float] = {}  # each merged task's own adapter's validation accuracy, measured once
        best = (-1.0, 1.0, 0.5)
        for lam in (0.5, 0.7, 1.0):
            for density in (0.5, 0.8):
                self.model.combine("candidate", list(MERGED), [lam] * len(MERGED), method="ties", density=density,
                                   rank=rank, head=MERGED[0])  # fmt: skip
                score = self._normalized("candidate", alone)
                self.model.delete_adapter("candidate")
                best = max(best, (score, lam, density))
        score, lam, density = best
        self.model.combine("multitask", list(MERGED), [lam] * len(MERGED), method="ties", density=density,
                           rank=rank, head=MERGED[0])  # fmt: skip
        return {"ties/weight": lam, "ties/density": density, "val/normalized_accuracy": score}

    def _normalized(self, name: str, alone: dict[str, float]) -> float:
        """Mean over the merged tasks of (merged accuracy / own adapter's accuracy), on validation, each task
        running ``name`` through :meth:`_task_view`."""
        total = 0.0
        for d in MERGED:
            if d not in alone:
                self.model.activate(d)
                alone[d] = max(training.evaluate(self.model, self.sets[d].val), 1e-9)
            with self._task_view(name, d):
                total += training.evaluate(self.model, self.sets[d].val) / alone[d]
        return total / len(MERGED)

    @contextlib.contextmanager
    def _task_view(self, merged: str, domain: str) -> Iterator[str]:
        """Inside the block, a temporary copy of ``merged`` is active that runs its deltas with ``domain``'s own
        head and norms, the norms' running statistics re-estimated under the merged deltas (the copy is
        deleted after; neither ``merged`` nor the domain's adapter changes).

        Each domain's BatchNorm statistics were gathered under its own deltas; under the merged deltas the
        activations they normalise have moved, and normalising them with the old statistics costs more than
        the merge itself. Re-estimating them is the usual repair after merging networks with BatchNorm: one
        pass over the domain's training images in train mode, without labels or gradients, averaging every
        batch's statistics equally (``momentum=None``). The validation and test images are never seen."""
        view = f"{merged}-for-{domain}"
        adapter = self.model.add_adapter_from_record(view, self.model.export_record(merged))
        own = self.model.adapters[domain]
        heads, norms = dict(own.head_items()), dict(own.norm_items())
        with torch.no_grad():
            for path, module in [*adapter.head_items(), *adapter.norm_items()]:
                module.load_state_dict((heads[path] if path in heads else norms[path]).state_dict())
            recalibrated = [m for _, m in adapter.norm_items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in recalibrated:
                m.reset_running_stats()
                m.momentum = None
            self.model.activate(view)
            if recalibrated:  # per-sample norms (a ViT's LayerNorms) keep no statistics
                self.model.train()
                try:
                    for x, _ in self.sets[domain].train.batches(64):
                        self.model(x)
                finally:
                    self.model.eval()
        try:
            yield view
        finally:
            self.model.delete_adapter(view)

    def switch(self) -> dict[str, float]:
        """The switch: one mixed batch of every target domain's test images in one forward pass, each sample
        routed to its own domain's adapter and head. Registers nothing; returns each domain's accuracy."""
        self.model.activate(Switch(*TARGETS))
        xs = torch.cat([self.sets[d].test.x for d in TARGETS])
        ys = torch.cat([self.sets[d].test.y for d in TARGETS])
        route = [d for d in TARGETS for _ in range(len(self.sets[d].test))]
        with torch.no_grad():
            routed = self.model(xs, route=route)
        return {d: float((routed.by_adapter[d].argmax(-1) == ys[routed.rows[d]]).float().mean()) for d in TARGETS}

    def report(self, switched: dict[str, float]) -> None:
        """The result: one row per domain on ``result``, with the test accuracy of its adapter, of the transferred
        adapter and of the multi-task adapter with the domain's head and norms (:meth:`_task_view`; logged on
        the multi-task version as ``test/accuracy/<domain>``), the switch's accuracy, and the baselines,
        trainable shares and steps of the earlier steps; and the root of the lineage tree the CLI prints."""
        model = self.model
        for domain in TARGETS:
            ds = self.sets[domain]
            model.activate(domain)
            lora = training.evaluate(model, ds.test)
            merged = transfer = None
            if domain in MERGED:
                with self._task_view("multitask", domain):
                    merged = training.evaluate(model, ds.test)
                self.hub.log_metric(self.merged_ref, f"test/accuracy/{domain}", merged)
            if domain in TRANSFER_FROM:
                model.activate(f"{domain}-transfer")
                transfer = training.evaluate(model, ds.test)
            st = self.stats[domain]
            moved = domain in TRANSFER_FROM
            self.result.rows.append(
                TaskRow(
                    task=domain,
                    head_only=st["baseline/head_only_accuracy"],
                    lora=lora,
                    full=st["baseline/full_finetune_accuracy"],
                    transfer=transfer,
                    merged=merged,
                    switched=switched[domain],
                    share_head=st["baseline/head_only_share"],
                    share_lora=model.num_trainable_parameters(domain) / self.n_backbone,
                    steps_fresh=int(st["train/steps_to_target"]) if moved else None,
                    steps_transfer=int(self.transfer_stats[domain]["train/steps_to_target"]) if moved else None,
                )
            )
        self.result.lineage_root = self._lora_ref(MERGED[0])


@dataclass(frozen=True)
class _Plan:
    """The settings of one run with every default taken from the backbone's recipe, checked."""

    recipe: Recipe
    rank: int
    alpha: float
    backbone_epochs: int
    epochs: int
    seed: int
    progress: bool


def _checked(s: DemoSettings, hub: Hub) -> _Plan:
    """The settings with the backbone's recipe filling what they leave None, refused before the first epoch
    when a value is out of range (or the registry home, where the backbone's weights go, cannot be
    written)."""
    if s.backbone not in RECIPES:
        raise ConfigError(f"the demo's backbone is {' or '.join(RECIPES)}, got {s.backbone!r}")
    recipe = RECIPES[s.backbone]
    checks.writable_dir(hub.home / "backbones", "registry home")
    rank = checks.whole("rank", _or(s.rank, recipe.rank), low=1, high=256)
    return _Plan(
        recipe=recipe,
        rank=rank,
        alpha=checks.number("alpha", _or(s.alpha, 2.0 * rank), above=0),
        epochs=checks.whole("epochs", _or(s.epochs, recipe.epochs), low=1, high=100),
        backbone_epochs=checks.whole(
            "backbone epochs", _or(s.backbone_epochs, recipe.backbone_epochs), low=1, high=1000
        ),  # fmt: skip
        seed=checks.seed(s.seed),
        progress=s.progress,
    )


def _or(given: Any, default: Any) -> Any:
    return default if given is None else given


def _fresh_head(backbone: nn.Module, path: str) -> nn.Module:
    """A new classifier of the same shape as the backbone's (the source task's head is not reused)."""
    original = backbone.get_submodule(path)
    assert isinstance(original, nn.Linear)
    return nn.Linear(original.in_features, original.out_features)
