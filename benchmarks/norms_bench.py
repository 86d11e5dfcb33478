"""Per-adapter normalisation, measured: a frozen ResNet-18 adapted to a held-out domain by LoRA with the backbone's
BatchNorm frozen, with BatchNorm owned per adapter, by PEFT's LoRA (which moves the shared running statistics),
and by a full fine-tune; then what PEFT's way costs another task's adapter.

    python benchmarks/norms_bench.py            # the scenario (about 3½ minutes on one thread of 2 busy cores)
    python benchmarks/norms_bench.py --quick    # 16 px, fewer images and epochs; prints only, writes nothing
    python benchmarks/norms_bench.py --rewrite  # only rewrite RESULTS.md from results/norms.json

The scenario. A torchvision resnet18 (10 classes) is trained on the source pool of the upright digits
(``data.digits("original", pool="source")``, 8×8 upsampled to 32 px) and frozen. The held-out domain is the
target pool under a seeded random affine (rotation ±25°, translation, scale), a Gaussian blur and low contrast,
drawn once per image. Every method trains a fresh fc head (the same initial tensors for all) for the same epochs
on the same batches with the same optimiser: ``training.fit`` (AdamW, 5% linear warm-up, cosine) with the
per-group peak learning rates of ``training.DEFAULTS`` — LoRA factors 5e-4, head 5e-3, owned norms 1e-3,
anything else (the full fine-tune's body) 1e-3. fit knows adapter-hub's groups; for PEFT's model and the full
copy the same groups are found by parameter name (``lora_`` → lora, the fc head → head). LoRA is r=8, α=16 on the
catalogue's resnet18 targets (every conv) for adapter-hub and PEFT alike, PEFT starting from the very same A
(B = 0) and head tensors.

Before any of that, an adapter for another task (the inverted digits of the target pool) is trained on each
side's shared backbone: adapter-hub's (default norms) on the AdapterModel that then takes the three adapter-hub
rows, PEFT's on the PeftModel that then trains PEFT's row. The script checks, and refuses to print numbers
otherwise, that on adapter-hub's side the backbone's state dict and the other adapter's outputs stay bit-exact
(``torch.equal``) through every training, and it measures what PEFT's training does to the other adapter and to
the bare backbone's source task.

Prints a table; a full run also writes benchmarks/results/norms.json and the norms section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from peft_copy import copy_into_peft, peft_name
from results_md import write_section
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from adapter_hub import AdapterModel, LoRAConfig, backbones, data, training
from adapter_hub.adapter import Adapter

HERE = Path(__file__).parent
RESULTS = HERE / "results"
JSON = RESULTS / "norms.json"

ARCH, HEAD, CLASSES = "resnet18", "fc", 10
R, ALPHA = 8, 16
SETTINGS = ("frozen", "batchnorm", "all")  # LoRAConfig.norm_layers, one adapter-hub row each
PRETRAIN_LR = 2e-3  # the source backbone, trained whole (as benchmarks/lr_defaults.py pretrains)
# The held-out domain: per image a rotation in ±25°, a shift of up to 12% of the side, a scale in [0.8, 1.15],
# a Gaussian blur σ in [0.8, 1.5] (5×5 at 32 px) and the contrast cut to a factor in [0.3, 0.5].
ROTATION, TRANSLATE, SCALE = 25.0, 0.12, (0.8, 1.15)
SIGMA, CONTRAST = (0.8, 1.5), (0.3, 0.5)


class InvariantBroken(AssertionError):
    """Something the comparison rests on does not hold: the numbers would not mean what the table says."""


@dataclass(frozen=True)
class Scale:
    """How big a run is: the image side, the source backbone's epochs, every method's epochs, and at most how
    many training images each task keeps (None: all)."""

    size: int
    pretrain_epochs: int
    epochs: int
    limit: int | None = None


FULL = Scale(size=32, pretrain_epochs=10, epochs=6)
QUICK = Scale(size=16, pretrain_epochs=2, epochs=1, limit=96)


# --- data ---------------------------------------------------------------------------------------------------
def upsampled(split: data.Split, size: int, limit: int | None = None) -> data.Split:
    """The 8×8 images at ``size`` px (bilinear, antialiased); the first ``limit`` images when given."""
    x, y = (split.x, split.y) if limit is None else (split.x[:limit], split.y[:limit])
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return data.Split(x.contiguous(), y)


def shift_image(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One image (3, S, S) in [0, 1] under the held-out domain's shift, its parameters drawn from ``g``."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    side = x.shape[-1]
    angle = uniform(-ROTATION, ROTATION)
    shift = [round(uniform(-TRANSLATE, TRANSLATE) * side) for _ in range(2)]
    x = TF.affine(x, angle=angle, translate=shift, scale=uniform(*SCALE), shear=[0.0, 0.0],
                  interpolation=InterpolationMode.BILINEAR, fill=0.0)  # fmt: skip
    kernel = 2 * max(1, round(side / 16)) + 1  # 5×5 at 32 px: the blur scales with the image
    sigma = uniform(*SIGMA) * side / 32
    x = TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    return TF.adjust_contrast(x, uniform(*CONTRAST)).clamp(0, 1)


def shifted(split: data.Split, seed: int) -> data.Split:
    """Every image shifted once, with parameters fixed per image by ``seed`` and its position."""
    g = torch.Generator().manual_seed(seed)
    return data.Split(torch.stack([shift_image(x, g) for x in split.x]), split.y)


def prepared(ds: data.Dataset, scale: Scale, shift_seed: int | None = None) -> data.Dataset:
    """``ds`` at the run's image size (training images cut to ``scale.limit``), each split shifted with its own
    seed when ``shift_seed`` is given."""
    splits = [upsampled(ds.train, scale.size, scale.limit), upsampled(ds.val, scale.size),
              upsampled(ds.test, scale.size)]  # fmt: skip
    if shift_seed is not None:
        splits = [shifted(s, shift_seed * 10 + i) for i, s in enumerate(splits)]
    return data.Dataset(*splits, num_classes=ds.num_classes, name=ds.name)


def datasets(scale: Scale, seed: int) -> dict[str, data.Dataset]:
    """The source task, the held-out domain, and the other task (the target pool's digits inverted)."""
    return {
        "source": prepared(data.digits("original", pool="source", seed=seed), scale),
        "affine": prepared(data.digits("original", pool="target", seed=seed), scale, shift_seed=1000 + seed),
        "inverted": prepared(data.digits("inverted", pool="target", seed=seed), scale),
    }


# --- the backbone, heads and the learning rates ---------------------------------------------------------------
def pretrain(source: data.Dataset, scale: Scale, seed: int) -> tuple[nn.Module, float, float]:
    """A resnet18 trained whole on the source task, frozen, in eval mode; its source test accuracy and seconds."""
    net = backbones.build_backbone({"architecture": ARCH, "num_classes": CLASSES, "seed": seed})
    start = time.perf_counter()
    training.fit(net, source.train, source.val, epochs=scale.pretrain_epochs, lr=PRETRAIN_LR, seed=seed,
                 progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    net.requires_grad_(False)
    return net.eval(), training.evaluate(net, source.test), seconds


def fresh_head(backbone: nn.Module, seed: int) -> nn.Module:
    """A new fc head drawn from ``seed``: every method starts from a copy of the same tensors."""
    torch.manual_seed(seed)
    return backbones.new_head(backbones.head_layer(backbone, HEAD), CLASSES)


def learning_rates() -> dict[str, float]:
    """The peak learning rate of each group, the same for every method (fit's defaults)."""
    return training.learning_rates(None)


def name_group(name: str) -> str:
    """fit's group of a parameter of a network that holds no adapter-hub Adapter (PEFT's model, the full copy):
    LoRA factors by PEFT's ``lora_`` names, the head (PEFT's ``modules_to_save`` copy or the copy's fc)."""
    if ".lora_" in name:
        return "lora"
    if ".modules_to_save." in name or name.startswith(f"{HEAD}."):
        return "head"
    return "other"


@contextmanager
def groups_by_name() -> Iterator[None]:
    """fit finds adapter-hub's groups by the Adapter modules; inside this block a network without one gets its
    groups from the parameter names (:func:`name_group`), so PEFT's LoRA and head and the full copy's head train
    with the learning rates adapter-hub's do. Order within a group is ``named_parameters()`` order, as fit's."""
    original = training.parameter_groups

    def groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
        if any(isinstance(m, Adapter) for m in model.modules()):
            return original(model)
        found: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                found.setdefault(name_group(name), []).append(p)
        return {g: found[g] for g in training.GROUPS if g in found}

    training.parameter_groups = groups  # type: ignore[assignment]
    try:
        yield
    finally:
        training.parameter_groups = original  # type: ignore[assignment]


def train(model: nn.Module, ds: data.Dataset, epochs: int, seed: int) -> dict:
    """fit with the common settings; the test accuracy, the groups' learning rates and the seconds it took."""
    start = time.perf_counter()
    with groups_by_name():
        fit = training.fit(model, ds.train, ds.val, epochs=epochs, lr=learning_rates(), seed=seed, progress=False)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"test": training.evaluate(model, ds.test), "val": fit.best_accuracy, "best_step": fit.best_step,
            "steps": fit.steps, "lrs": fit.lrs, "seconds": seconds, "trainable": trainable}  # fmt: skip


# --- checks -------------------------------------------------------------------------------------------------
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """The entries of a state dict that are not bit-exact (``torch.equal``) any more."""
    if before.keys() != after.keys():
        raise InvariantBroken(f"the state dict's entries changed: {sorted(before.keys() ^ after.keys())[:3]}")
    return [k for k in before if not torch.equal(before[k], after[k])]


@torch.no_grad()
def logits(model: nn.Module, split: data.Split) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x) for x, _ in split.batches(256)])
    model.train(was_training)
    return out


def accuracy_of(out: torch.Tensor, split: data.Split) -> float:
    return int((out.argmax(-1) == split.y).sum()) / len(split)


def expect_close(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> float:
    diff = float((got.double() - want.double()).abs().max())
    bound = rtol * float(want.abs().max()) + 1e-12
    if not diff <= bound:
        raise InvariantBroken(f"{what}: outputs differ by {diff:.3g} (allowed {bound:.3g})")
    return diff


# --- adapter-hub ----------------------------------------------------------------------------------------------
def lora_config(norm_layers: str) -> LoRAConfig:
    return LoRAConfig(r=R, alpha=ALPHA, targets=backbones.entry(ARCH).targets, heads=[HEAD], norm_layers=norm_layers)


def add_adapter(model: AdapterModel, name: str, norm_layers: str, head: nn.Module, init_seed: int) -> Adapter:
    """An adapter whose A is drawn from ``init_seed`` (B = 0) with a copy of ``head``; activated."""
    torch.manual_seed(init_seed)
    adapter = model.add_adapter(name, lora_config(norm_layers), head_modules={HEAD: copy.deepcopy(head)})
    model.activate(name)
    return adapter


def lora_tensors(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s LoRA factors and head under its file keys (no norms)."""
    tensors = model.export_record(name).tensors
    return {k: v.clone() for k, v in tensors.items() if ".lora_" in k or k.startswith(f"{HEAD}.")}


def initial_tensors(pristine: nn.Module, head: nn.Module, init_seed: int) -> dict[str, torch.Tensor]:
    """The LoRA factors and head every method starts from for one task (adapter-hub's init, given to PEFT too)."""
    model = AdapterModel(copy.deepcopy(pristine))
    add_adapter(model, "init", "frozen", head, init_seed)
    return lora_tensors(model, "init")


def ours(pristine: nn.Module, tasks: dict[str, data.Dataset], heads: dict[str, nn.Module],
         inits: dict[str, dict[str, torch.Tensor]], scale: Scale, seed: int) -> dict:  # fmt: skip
    """One AdapterModel: the inverted task's adapter first, then one adapter per norm setting on the held-out
    domain; after each training the backbone's state dict and the other adapter's outputs must be bit-exact."""
    model = AdapterModel(copy.deepcopy(pristine))
    backbone0 = snapshot(model.backbone)
    with model.disable_adapters():
        bare0 = logits(model, tasks["source"].test)
    add_adapter(model, "inverted", "batchnorm", heads["inverted"], seed + 1)
    other = train(model, tasks["inverted"], scale.epochs, seed)
    other_out = logits(model, tasks["inverted"].test)
    rows, checks, outputs = {}, [], {}
    for setting in SETTINGS:
        add_adapter(model, setting, setting, heads["affine"], seed + 2)
        if changed(inits["affine"], lora_tensors(model, setting)):
            raise InvariantBroken(f"adapter-hub's {setting} adapter does not start from the common tensors")
        row = train(model, tasks["affine"], scale.epochs, seed)
        counts = model.parameter_counts()[setting]
        row.update(lora=counts["lora"], head=counts["heads"], norms=counts["norms"])
        moved = changed(backbone0, snapshot(model.backbone))
        model.activate("inverted")
        exact_other = torch.equal(logits(model, tasks["inverted"].test), other_out)
        with model.disable_adapters():
            exact_bare = torch.equal(logits(model, tasks["source"].test), bare0)
        if moved or not exact_other or not exact_bare:
            raise InvariantBroken(f"training adapter-hub's {setting} adapter changed the shared backbone "
                                  f"({moved[:3]}) or another adapter's outputs (bit-exact: {exact_other}) or the "
                                  f"bare backbone's (bit-exact: {exact_bare})")  # fmt: skip
        checks.append(setting)
        rows[setting] = row
        model.activate(setting)
        outputs[setting] = logits(model, tasks["affine"].test)
    model.activate("inverted")
    after = logits(model, tasks["inverted"].test)
    with model.disable_adapters():
        bare1 = logits(model, tasks["source"].test)
    return {
        "rows": rows,
        "outputs": outputs,
        "other": {"before": other["test"], "after": accuracy_of(after, tasks["inverted"].test),
                  "max_logit_change": float((after - other_out).abs().max())},
        "bare": {"before": accuracy_of(bare0, tasks["source"].test), "after": accuracy_of(bare1, tasks["source"].test)},
        "bit_exact_after": checks,
    }  # fmt: skip


# --- PEFT -----------------------------------------------------------------------------------------------------
def peft_targets(pristine: nn.Module) -> list[str]:
    """The module paths adapter-hub adapts for the catalogue's targets: PEFT gets exactly these."""
    targets, _, _ = AdapterModel(copy.deepcopy(pristine)).resolve(lora_config("frozen"))
    return targets


def peft_config(targets: Sequence[str]):
    """PEFT's LoRA on exactly ``targets`` (a regex PEFT matches against whole module names), fc trained whole."""
    import peft

    pattern = "|".join(re.escape(t) for t in targets)
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=pattern, modules_to_save=[HEAD])


def peft_model(pristine: nn.Module, name: str, targets: Sequence[str], init: dict[str, torch.Tensor]):
    """A PeftModel on a copy of ``pristine`` whose first adapter ``name`` carries ``init``; it must adapt exactly
    ``targets``."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(pristine), peft_config(targets), adapter_name=name)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
    if wrapped != set(targets):
        raise InvariantBroken(f"PEFT adapts other modules than adapter-hub: {sorted(wrapped ^ set(targets))[:3]}")
    peft_load(model, name, init)
    return model


def peft_add(model, name: str, targets: Sequence[str], init: dict[str, torch.Tensor]) -> None:
    """Another PEFT adapter ``name`` carrying ``init``, made the active one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(name, peft_config(targets))
    model.set_adapter(name)
    peft_load(model, name, init)


def peft_load(model, name: str, init: dict[str, torch.Tensor]) -> None:
    """Copy adapter-hub's tensors into PEFT's adapter ``name``; they must be exactly PEFT's, and all PEFT trains."""
    copy_into_peft(model, name, init, InvariantBroken)
    wanted = {peft_name(k, name) for k in init}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable != wanted:
        raise InvariantBroken(
            f"PEFT trains other parameters than adapter {name}'s: {sorted(trainable ^ wanted)[:3]}"
        )


def peft_run(pristine: nn.Module, tasks: dict[str, data.Dataset], inits: dict[str, dict[str, torch.Tensor]],
             scale: Scale, seed: int) -> dict:  # fmt: skip
    """One PeftModel: the inverted task's adapter trained first, then the held-out domain's; what the second
    training did to the first adapter and to the bare backbone's source task."""
    targets = peft_targets(pristine)
    model = peft_model(pristine, "inverted", targets, inits["inverted"])
    base = model.get_base_model()
    with model.disable_adapter():
        bare0 = logits(model, tasks["source"].test)
    other = train(model, tasks["inverted"], scale.epochs, seed)
    other_out = logits(model, tasks["inverted"].test)
    other_tensors = {n: p.detach().clone() for n, p in model.named_parameters() if ".inverted." in n}
    backbone1 = snapshot(base)
    with model.disable_adapter():
        bare1 = logits(model, tasks["source"].test)
    peft_add(model, "affine", targets, inits["affine"])
    row = train(model, tasks["affine"], scale.epochs, seed)
    outputs = logits(model, tasks["affine"].test)
    lora = sum(t.numel() for k, t in inits["affine"].items() if ".lora_" in k)
    row.update(lora=lora, head=row["trainable"] - lora, norms=0)
    # the backbone's own entries: not an adapter's LoRA factors or head copies
    shared = [k for k in backbone1 if ".lora_" not in k and ".modules_to_save." not in k]
    after = snapshot(base)
    moved = changed({k: backbone1[k] for k in shared}, {k: after[k] for k in shared})
    own_moved = [n for n, p in model.named_parameters() if n in other_tensors and not torch.equal(p, other_tensors[n])]
    if own_moved:
        raise InvariantBroken(f"PEFT's training of the second adapter changed the first's tensors: {own_moved[:3]}")
    model.set_adapter("inverted")
    other_after = logits(model, tasks["inverted"].test)
    with model.disable_adapter():
        bare2 = logits(model, tasks["source"].test)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return {
        "row": row,
        "outputs": outputs,
        "other": {"before": other["test"], "after": accuracy_of(other_after, tasks["inverted"].test),
                  "max_logit_change": float((other_after - other_out).abs().max())},
        "bare": {"before": accuracy_of(bare0, tasks["source"].test),
                 "after_first": accuracy_of(bare1, tasks["source"].test),
                 "after": accuracy_of(bare2, tasks["source"].test)},
        "moved": sorted({k.rpartition(".")[2] for k in moved}),
        "moved_layers": len({k.rpartition(".")[0] for k in moved}),
        "norm_layers": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pristine.modules()),
        "moved_weights": [k for k in moved if not k.endswith(buffers)],
    }  # fmt: skip


def set_tensors(model: AdapterModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (file keys) into adapter ``name``'s LoRA factors and head."""
    adapter = model.adapters[name]
    with torch.no_grad():
        for path, module in [*adapter.layer_items(), *adapter.head_items()]:
            for pname, p in module.named_parameters():
                if f"{path}.{pname}" in tensors:
                    p.copy_(tensors[f"{path}.{pname}"])
    if changed(tensors, lora_tensors(model, name)):
        raise InvariantBroken(f"adapter {name} did not take the tensors given")


def start_agrees(pristine: nn.Module, head: nn.Module, init: dict[str, torch.Tensor], split: data.Split) -> float:
    """adapter-hub and PEFT carrying the same tensors give the same outputs (eval): the same targets, head and
    scaling. B is 0 at the start, so it is drawn non-zero here to check the deltas' wiring too."""
    g = torch.Generator().manual_seed(7)
    drawn = {k: torch.randn(t.shape, generator=g) * 0.02 if ".lora_B" in k else t for k, t in init.items()}
    model = AdapterModel(copy.deepcopy(pristine))
    add_adapter(model, "t", "frozen", head, 0)
    set_tensors(model, "t", drawn)
    want = logits(model, split)
    with model.disable_adapters():
        bare = logits(model, split)
    if float((want - bare).norm() / bare.norm()) < 1e-2:
        raise InvariantBroken("the drawn deltas hardly change the outputs: the agreement would prove nothing")
    theirs = peft_model(pristine, "t", peft_targets(pristine), drawn)
    return expect_close("adapter-hub vs PEFT before training", logits(theirs, split), want)


# --- full fine-tune -------------------------------------------------------------------------------------------
def full(pristine: nn.Module, ds: data.Dataset, head: nn.Module, scale: Scale, seed: int) -> dict:
    model = training.full_finetune_copy(pristine, HEAD, head)
    row = train(model, ds, scale.epochs, seed)
    row.update(lora=0, head=sum(p.numel() for p in head.parameters()), norms=0)
    return row


# --- the run ------------------------------------------------------------------------------------------------
def measure(scale: Scale, seed: int = 0) -> dict:
    """The whole comparison at ``scale``: the results as stored in norms.json."""
    load = os.getloadavg()[0]
    tasks = datasets(scale, seed)
    pristine, source_accuracy, pretrain_seconds = pretrain(tasks["source"], scale, seed)
    untrained = snapshot(pristine)
    heads = {task: fresh_head(pristine, seed + 10 + i) for i, task in enumerate(("inverted", "affine"))}
    inits = {"inverted": initial_tensors(pristine, heads["inverted"], seed + 1),
             "affine": initial_tensors(pristine, heads["affine"], seed + 2)}  # fmt: skip
    agreement = start_agrees(pristine, heads["affine"], inits["affine"], tasks["affine"].test)
    no_training = training.evaluate(pristine, tasks["affine"].test)
    full_row = full(pristine, tasks["affine"], heads["affine"], scale, seed)
    theirs = peft_run(pristine, tasks, inits, scale, seed)
    mine = ours(pristine, tasks, heads, inits, scale, seed)
    peft_out, our_out = theirs.pop("outputs"), mine.pop("outputs")
    if changed(untrained, snapshot(pristine)):
        raise InvariantBroken("a method changed the pristine backbone it was meant to copy")
    backbone = sum(p.numel() for p in pristine.parameters())
    rows = {"full fine-tune": full_row, "PEFT LoRA": theirs["row"],
            **{f"adapter-hub LoRA, norm_layers={s!r}": mine["rows"][s] for s in SETTINGS}}  # fmt: skip
    for row in rows.values():
        row["of_full"] = row["test"] / full_row["test"] if full_row["test"] else None
        row["share"] = row["trainable"] / backbone
    return {
        "environment": {**environment(), "load": load, "load_after": os.getloadavg()[0]},
        "scale": asdict(scale),
        "seed": seed,
        "lrs": learning_rates(),
        "backbone_parameters": backbone,
        "source_accuracy": source_accuracy,
        "pretrain_seconds": pretrain_seconds,
        "no_training_accuracy": no_training,
        "sizes": {t: {s: len(getattr(ds, s)) for s in ("train", "val", "test")} for t, ds in tasks.items()},
        "start_agreement": agreement,
        # PEFT's row against adapter-hub's with owned BatchNorm: test logits and predictions
        "peft_vs_batchnorm": {
            "max_logit_diff": float((peft_out - our_out["batchnorm"]).abs().max()),
            "predictions_differ": int((peft_out.argmax(-1) != our_out["batchnorm"].argmax(-1)).sum()),
        },
        "all_vs_batchnorm_equal": torch.equal(our_out["all"], our_out["batchnorm"]),
        "rows": rows,
        "cost": {"peft": {k: v for k, v in theirs.items() if k != "row"},
                 "ours": {k: v for k, v in mine.items() if k != "rows"}},
    }  # fmt: skip


def environment() -> dict:
    import peft

    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "peft": peft.__version__}  # fmt: skip


# --- report -------------------------------------------------------------------------------------------------
def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def setup_text(results: dict) -> str:
    scale, sizes = results["scale"], results["sizes"]["affine"]
    lrs = ", ".join(f"{g} {v:g}" for g, v in results["lrs"].items())
    return (
        f"A torchvision resnet18 (10 classes, {results['backbone_parameters']:,} parameters) trained whole for "
        f"{plural(scale['pretrain_epochs'], 'epoch')} on the source pool of the upright digits at {scale['size']} px "
        f"(source test accuracy {results['source_accuracy']:.1%}), then frozen. Held-out domain: the target pool "
        f"under a random affine (rotation ±{ROTATION:g}°, shift ≤ {TRANSLATE:.0%}, scale {SCALE[0]}–{SCALE[1]}), "
        f"Gaussian blur and contrast × {CONTRAST[0]}–{CONTRAST[1]}, drawn once per image ({sizes['train']} "
        f"training, {sizes['val']} validation, {sizes['test']} test images); the frozen source model scores "
        f"{results['no_training_accuracy']:.1%} on it. Every method: a fresh fc head (the same tensors), "
        f"{plural(scale['epochs'], 'epoch')} of batch 64 over the same batches, `training.fit` (AdamW, warm-up, "
        f"cosine, best validation step kept) with peak learning rates {lrs} (PEFT's LoRA factors and head and the "
        f"full copy's head found by name, at the same rates); LoRA r={R}, α={ALPHA} on every conv (the "
        "catalogue's resnet18 targets), PEFT starting from adapter-hub's very A and head tensors (with B drawn "
        f"non-zero the two give the same outputs to {results['start_agreement']:.1e}). Trainable parameters count "
        "the head; the share is of the backbone's."
    )


def cost_text(results: dict) -> list[str]:
    peft_cost, our_cost = results["cost"]["peft"], results["cost"]["ours"]
    weights = peft_cost["moved_weights"]
    return [
        "### What PEFT's training costs another task",
        "",
        "Before the held-out domain, each side trained an adapter for another task (the target pool's digits "
        "inverted; adapter-hub with its default norms) on its shared backbone; PEFT's row above is the second "
        "adapter of that PeftModel, adapter-hub's three rows are the second to fourth of that AdapterModel. The "
        "table gives the first adapter's test accuracy right after its own training and after the held-out "
        "domain's training, and the bare backbone's accuracy on its own source test set before any adapter and "
        "after all of them.",
        "",
        "| | PEFT: before | PEFT: after | adapter-hub: before | adapter-hub: after |",
        "|---|---|---|---|---|",
        f"| inverted-digits adapter | {pct(peft_cost['other']['before'])} | {pct(peft_cost['other']['after'])} | "
        f"{pct(our_cost['other']['before'])} | {pct(our_cost['other']['after'])} |",
        f"| bare backbone, source task | {pct(peft_cost['bare']['before'])} | {pct(peft_cost['bare']['after'])} | "
        f"{pct(our_cost['bare']['before'])} | {pct(our_cost['bare']['after'])} |",
        "",
        f"PEFT: the held-out domain's training changed the {', '.join(peft_cost['moved']) or 'nothing'} of "
        f"{peft_cost['moved_layers']} of the backbone's {peft_cost['norm_layers']} BatchNorm layers and "
        f"{'no weight' if not weights else ', '.join(weights)}; the first adapter's own tensors are unchanged "
        f"(`torch.equal`), yet its logits moved by up to {peft_cost['other']['max_logit_change']:.3g} (the bare "
        f"backbone's source accuracy was {pct(peft_cost['bare']['after_first'])} already after the first "
        "adapter's training). adapter-hub: after each of its three trainings the backbone's state dict, the other "
        "adapter's logits and the bare backbone's logits were checked bit-exact (`torch.equal`; the script "
        "reports nothing otherwise).",
    ]


def markdown(results: dict) -> str:
    env, rows = results["environment"], results["rows"]
    lines = [
        "## Per-adapter normalisation (benchmarks/norms_bench.py)",
        "",
        f"{env['machine']} ({plural(env['threads'], 'thread')}, load average {env['load']:.1f} at the start, "
        f"{env['load_after']:.1f} at the end); "
        f"torch {env['torch']}, torchvision {env['torchvision']}, peft {env['peft']}; seed {results['seed']}.",
        "",
        setup_text(results),
        "",
        "| method | test accuracy | of full fine-tune | trainable parameters | train time |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['test']:.1%} | {pct(row['of_full'])} | {row['trainable']:,} "
                     f"({row['share']:.2%}) | {row['seconds']:.1f} s |")  # fmt: skip
    same = results["peft_vs_batchnorm"]
    lines += [
        "",
        "PEFT's row and adapter-hub's with owned BatchNorm are separate runs: both normalise with each batch's "
        "statistics in training and with running statistics gathered on the held-out domain in eval; adapter-hub "
        "also trains the norms' affine parameters, and keeps them and the statistics in the adapter. Their test logits "
        f"differ by up to {same['max_logit_diff']:.3g} and {same['predictions_differ']} of "
        f"{results['sizes']['affine']['test']} test predictions differ.",
    ]
    if results["all_vs_batchnorm_equal"]:
        lines += ["", 'resnet18 has no normalisation layer but BatchNorm, so `"all"` owns the same layers as '
                      '`"batchnorm"`: its row repeats that run, and its test logits equal it bit for bit.']  # fmt: skip
    lines += ["", *cost_text(results), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 px, 96 training images, 1 epoch; writes nothing")
    parser.add_argument("--epochs", type=int, help=f"every method's epochs (default {FULL.epochs})")
    parser.add_argument("--seed", type=int, default=0)
    # on busy cores a second thread mostly waits: resnet18's forward was 25× slower with 2 threads than with 1
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from results/norms.json")
    args = parser.parse_args(argv)
    if args.rewrite:
        results = json.loads(JSON.read_text())
        write_section("norms", markdown(results))
        return results
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    if args.epochs is not None:
        scale = Scale(scale.size, scale.pretrain_epochs, args.epochs, scale.limit)
    try:
        results = measure(scale, args.seed)
    except InvariantBroken as exc:
        sys.exit(f"norms_bench: refusing to report: {exc}")
    text = markdown(results)
    print(text)
    if not args.quick:  # a smoke run never replaces the recorded full run
        RESULTS.mkdir(exist_ok=True)
        JSON.write_text(json.dumps(results, indent=1) + "\n")
        write_section("norms", text)
    return results


if __name__ == "__main__":
    main()
