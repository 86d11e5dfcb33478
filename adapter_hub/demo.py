"""The main job: a real-data scenario end to end on the registry.

Real handwritten digits (scikit-learn) are split into two disjoint pools. A torchvision backbone is
trained on the source pool in the original domain, frozen and registered. For three target domains
(rotated, inverted, noisy: the target pool, shifted) and a compound one (rotated and noisy) it trains a
conv-LoRA adapter and compares it with a head-only probe and a full fine-tune; it starts the compound
domain's adapter once more from the rotated adapter (transfer) and counts the steps to the fresh
adapter's accuracy; it combines three adapters with TIES into one multi-task adapter and routes a mixed
batch of all four tasks per sample with a Switch. Everything is
registered with its metrics and lineage; a second run reuses what is registered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backbones, checks, data, training
from .compose import Stack, Switch
from .errors import ConfigError
from .lora import LoRAConfig
from .model import AdapterModel
from .registry import Hub
from .registry.errors import AlreadyExists, NotFound
from .registry.records import Parent

TARGETS = ("rotated", "inverted", "noisy", "rotated-noisy")
MERGED = ("rotated", "inverted", "noisy")  # the 3-task TIES average
TRANSFER_FROM = {"rotated-noisy": "rotated"}  # a compound shift started from the adapter of one of its parts
ALIAS = "demo"


@dataclass
class DemoSettings:
    backbone: str = "resnet"  # resnet | vit
    rank: int = 8
    alpha: float = 16.0
    backbone_epochs: int = 8
    epochs: int = 8  # adapters and the full fine-tune alike
    lr: float = 5e-3  # LoRA and head (the full fine-tune uses 1e-3)
    seed: int = 0
    progress: bool = True

    @property
    def architecture(self) -> str:
        return {"resnet": "resnet_small", "vit": "vit_small"}[self.backbone]


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

    def goals(self) -> list[tuple[str, str, bool]]:
        """(goal, measured, met) for the goals the demo reports on."""
        rows = self.rows
        ratio = min(r.lora / r.full for r in rows) if rows else 0.0
        share = max(r.share_lora for r in rows) if rows else 1.0
        step_ratios = [r.steps_transfer / r.steps_fresh for r in rows if r.steps_fresh and r.steps_transfer]
        worst_steps = max(step_ratios) if step_ratios else float("nan")
        in_merge = [r for r in rows if r.merged is not None]
        merged = sum(r.merged / r.lora for r in in_merge) / len(in_merge) if in_merge else 0.0  # type: ignore[operator]
        switched = sum(r.switched / r.lora for r in rows) / len(rows) if rows else 0.0
        return [
            ("LoRA r=8 ≥ 95% of full fine-tuning", f"{ratio:.1%} (worst task)", ratio >= 0.95),
            ("≤ 5% of the parameters trainable", f"{share:.2%}", share <= 0.05),
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
    """Run (or, where the registry already holds it, reuse) every step of the scenario."""
    s = _checked(settings or DemoSettings(), hub)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    entry = backbones.entry(s.architecture)
    result = DemoResult(rows=[], backbone=f"digits-{s.architecture}", backbone_accuracy=0.0)

    # 1. the backbone: trained on the source pool, original domain; reused when registered
    source = data.digits("original", pool="source", seed=s.seed)
    weights_path = hub.home / "backbones" / f"{result.backbone}.safetensors"
    backbone_source = {"architecture": s.architecture, "num_classes": 10, "seed": s.seed, "weights": str(weights_path)}
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
        training.fit(backbone, source.train, source.val, epochs=s.backbone_epochs, lr=2e-3, seed=s.seed,
                     progress=s.progress, description="backbone")  # fmt: skip
        backbones.save_weights(backbone, weights_path)
        hub.add_backbone(result.backbone, backbone, architecture=s.architecture, source=backbone_source, exist_ok=True)
        result.trained.append(f"backbone {result.backbone}")
    result.backbone_accuracy = training.evaluate(backbone, source.test)
    for p in backbone.parameters():
        p.requires_grad_(False)

    model = AdapterModel(backbone)
    n_backbone = model.num_backbone_parameters()
    sets = {d: data.digits(d, pool="target", seed=s.seed) for d in TARGETS}
    lora_cfg = LoRAConfig(r=s.rank, alpha=s.alpha, targets=entry.targets, heads=[entry.head])
    head_cfg = LoRAConfig(targets=[], heads=[entry.head])

    def task_name(domain: str) -> str:
        return f"digits-{domain}"

    for name, domain in [*((task_name(d), d) for d in TARGETS), ("digits-multitask", "+".join(MERGED))]:
        with contextlib.suppress(AlreadyExists):
            hub.add_task(name, domain=domain, num_classes=10, metric="test/accuracy")

    def obtain(ref: str, name: str, train: Callable[[], dict[str, float]], **register: Any) -> dict[str, float]:
        """Load ``ref`` into the model as ``name`` if registered, else train and register it."""
        try:
            version = hub.load_into(model, ref, name=name)
            result.reused.append(version.ref)
            return {m.name: m.value for m in hub.metrics(version.ref)}
        except NotFound:
            metrics = train()
            task, _, rest = ref.partition("/")
            version = hub.register(model, name, task=task, name=rest.split("@")[0], metrics=metrics, **register)
            hub.set_alias(version.ref, ALIAS)
            result.trained.append(version.ref)
            return metrics

    fresh: dict[str, training.FitResult] = {}
    stats: dict[str, dict[str, float]] = {}
    for domain in TARGETS:
        ds = sets[domain]

        def train_fresh(domain: str = domain, ds: data.Dataset = ds) -> dict[str, float]:
            _say(s.progress, f"training {task_name(domain)}: head-only probe, LoRA adapter, full fine-tune")
            model.add_adapter(f"{domain}-head", head_cfg, head_modules={entry.head: _fresh_head(backbone, entry.head)})
            model.activate(f"{domain}-head")
            training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.lr, seed=s.seed, progress=s.progress,
                         description=f"{domain} head-only")  # fmt: skip
            head_only = training.evaluate(model, ds.test)
            head_share = model.num_trainable_parameters(f"{domain}-head") / n_backbone
            model.delete_adapter(f"{domain}-head")

            model.add_adapter(domain, lora_cfg, head_modules={entry.head: _fresh_head(backbone, entry.head)})
            model.activate(domain)
            fit = training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.lr, seed=s.seed, eval_every=3,
                               progress=s.progress, description=f"{domain} LoRA")  # fmt: skip
            fresh[domain] = fit
            full_model = training.full_finetune_copy(backbone, entry.head, _fresh_head(backbone, entry.head))
            training.fit(full_model, ds.train, ds.val, epochs=s.epochs, lr=1e-3, seed=s.seed, progress=s.progress,
                         description=f"{domain} full fine-tune")  # fmt: skip
            model.activate(domain)
            return {
                "test/accuracy": training.evaluate(model, ds.test),
                "val/accuracy": fit.best_accuracy,
                "baseline/head_only_accuracy": head_only,
                "baseline/head_only_share": head_share,
                "baseline/full_finetune_accuracy": training.evaluate(full_model, ds.test),
                "train/steps_to_target": float(fit.steps_to(0.95 * fit.best_accuracy) or fit.steps),
            }

        stats[domain] = obtain(f"{task_name(domain)}/lora-r{s.rank}@{ALIAS}", domain, train_fresh,
                               description=f"conv-LoRA r={s.rank} on the {domain} digits")  # fmt: skip

    transfer_stats: dict[str, dict[str, float]] = {}
    for domain, parent in TRANSFER_FROM.items():
        ds = sets[domain]

        def train_transfer(domain: str = domain, ds: data.Dataset = ds, parent: str = parent) -> dict[str, float]:
            _say(s.progress, f"training {task_name(domain)} from the {parent} adapter")
            training.transfer_init(model, parent, f"{domain}-transfer")
            model.activate(f"{domain}-transfer")
            fit = training.fit(model, ds.train, ds.val, epochs=s.epochs, lr=s.lr, seed=s.seed, eval_every=3,
                               progress=s.progress, description=f"{domain} from {parent}")  # fmt: skip
            target = 0.95 * stats[domain]["val/accuracy"]
            return {
                "test/accuracy": training.evaluate(model, ds.test),
                "val/accuracy": fit.best_accuracy,
                "train/steps_to_target": float(fit.steps_to(target) or fit.steps * 10),
            }

        transfer_stats[domain] = obtain(
            f"{task_name(domain)}/lora-r{s.rank}-transfer@{ALIAS}", f"{domain}-transfer", train_transfer,
            parents=[(f"{task_name(parent)}/lora-r{s.rank}@{ALIAS}", "transferred_from")],
            description=f"{domain} adapter started from the {parent} adapter",
        )  # fmt: skip

    # the multi-task adapter: TIES over three domains' deltas (each task keeps its own head). Its scale λ
    # and density are chosen on the validation sets, as in the TIES paper; the test sets stay unseen.
    chosen: dict[str, float] = {}

    alone: dict[str, float] = {}

    def normalized(name: str) -> float:
        """Mean over the merged tasks of (merged accuracy / own adapter's accuracy), on validation."""
        total = 0.0
        for d in MERGED:
            if d not in alone:
                model.activate(d)
                alone[d] = max(training.evaluate(model, sets[d].val), 1e-9)
            model.activate(Stack(name, head=d))
            total += training.evaluate(model, sets[d].val) / alone[d]
        return total / len(MERGED)

    def train_merged() -> dict[str, float]:
        _say(s.progress, "combining three adapters with TIES (λ and density chosen on validation)")
        best = (-1.0, 1.0, 0.5)
        for lam in (0.5, 0.7, 1.0):
            for density in (0.5, 0.8):
                model.combine("candidate", list(MERGED), [lam] * len(MERGED), method="ties", density=density,
                              rank=s.rank * len(MERGED), head=MERGED[0])  # fmt: skip
                score = normalized("candidate")
                model.delete_adapter("candidate")
                best = max(best, (score, lam, density))
        _, lam, density = best
        chosen.update(weight=lam, density=density, score=best[0])
        model.combine("multitask", list(MERGED), [lam] * len(MERGED), method="ties", density=density,
                      rank=s.rank * len(MERGED), head=MERGED[0])  # fmt: skip
        return {"val/normalized_accuracy": best[0], "ties/weight": lam, "ties/density": density}

    merged_ref = f"digits-multitask/ties-r{s.rank * len(MERGED)}@{ALIAS}"
    try:
        version = hub.load_into(model, merged_ref, name="multitask")
        result.reused.append(version.ref)
    except NotFound:
        train_merged()
        recipe = model.adapters["multitask"].metadata["recipe"]
        version = hub.register(
            model, "multitask", task="digits-multitask", name=f"ties-r{s.rank * len(MERGED)}",
            metrics={"ties/weight": chosen["weight"], "ties/density": chosen["density"],
                     "val/normalized_accuracy": chosen["score"]},
            parents=[Parent(f"{task_name(d)}/lora-r{s.rank}@{ALIAS}", "composed_from", weight=w, method="ties",
                            params=recipe["params"]) for d, w in zip(MERGED, recipe["weights"])],
            description="TIES average of three domain adapters",
        )  # fmt: skip
        hub.set_alias(version.ref, ALIAS)
        result.trained.append(version.ref)

    # the switch: one mixed batch, each sample routed to its own domain's adapter and head
    model.activate(Switch(*TARGETS))
    xs = torch.cat([sets[d].test.x for d in TARGETS])
    ys = torch.cat([sets[d].test.y for d in TARGETS])
    route = [d for d in TARGETS for _ in range(len(sets[d].test))]
    with torch.no_grad():
        routed = model(xs, route=route)
    switched = {d: float((routed.by_adapter[d].argmax(-1) == ys[routed.rows[d]]).float().mean()) for d in TARGETS}

    for domain in TARGETS:
        ds = sets[domain]
        model.activate(domain)
        lora = training.evaluate(model, ds.test)
        merged = transfer = None
        if domain in MERGED:
            model.activate(Stack("multitask", head=domain))
            merged = training.evaluate(model, ds.test)
            hub.log_metric(merged_ref, f"test/accuracy/{domain}", merged)
        if domain in TRANSFER_FROM:
            model.activate(f"{domain}-transfer")
            transfer = training.evaluate(model, ds.test)
        st = stats[domain]
        moved = domain in TRANSFER_FROM
        result.rows.append(
            TaskRow(
                task=domain, head_only=st["baseline/head_only_accuracy"], lora=lora,
                full=st["baseline/full_finetune_accuracy"], transfer=transfer, merged=merged,
                switched=switched[domain], share_head=st["baseline/head_only_share"],
                share_lora=model.num_trainable_parameters(domain) / n_backbone,
                steps_fresh=int(st["train/steps_to_target"]) if moved else None,
                steps_transfer=int(transfer_stats[domain]["train/steps_to_target"]) if moved else None,
            )  # fmt: skip
        )
    result.lineage_root = f"{task_name(MERGED[0])}/lora-r{s.rank}@{ALIAS}"
    result.seconds = time.perf_counter() - start
    return result


def _checked(s: DemoSettings, hub: Hub) -> DemoSettings:
    """The settings, refused before the first epoch when a value is out of range (or the registry home,
    where the backbone's weights go, cannot be written)."""
    if s.backbone not in ("resnet", "vit"):
        raise ConfigError(f"the demo's backbone is resnet or vit, got {s.backbone!r}")
    checks.writable_dir(hub.home / "backbones", "registry home")
    return replace(
        s,
        rank=checks.whole("rank", s.rank, low=1, high=256),
        alpha=checks.number("alpha", s.alpha, above=0),
        epochs=checks.whole("epochs", s.epochs, low=1, high=100),
        backbone_epochs=checks.whole("backbone epochs", s.backbone_epochs, low=1, high=100),
        lr=checks.number("lr", s.lr, above=0),
        seed=checks.seed(s.seed),
    )


def _fresh_head(backbone: nn.Module, path: str) -> nn.Module:
    """A new classifier of the same shape as the backbone's (the source task's head is not reused)."""
    original = backbone.get_submodule(path)
    assert isinstance(original, nn.Linear)
    return nn.Linear(original.in_features, original.out_features)


def demo_home_note(home: Path) -> str:
    return f"registry: {home}"
