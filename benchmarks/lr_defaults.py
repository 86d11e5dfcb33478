"""The learning rates of ``training.fit(lr=None)``, measured: LoRA (with its head and the norm layers it owns)
against a full fine-tune, on pretrained torchvision networks and on the demo's small backbones.

    python benchmarks/lr_defaults.py --threads 1     # every model, domain and setting (about 2 h on 2 busy cores)
    python benchmarks/lr_defaults.py --models resnet18 --domains rotated --settings "defaults (lr=None)"
    python benchmarks/lr_defaults.py --rewrite        # only rewrite RESULTS.md from results/lr_defaults.json

The pretrained networks: torchvision ``mobilenet_v2(num_classes=10)`` (25 epochs) and ``resnet18(num_classes=10)``
(10 epochs) trained from scratch with lr 2e-3 on scikit-learn's digits, source pool, original domain, resized to
64 px and normalised with the ImageNet mean and std; their state dict is saved (under ``--cache``) and reloaded
as the frozen backbone. The small ones: ``resnet_small`` at 8 px (8 epochs, as the demo) and ``vit_small`` at
16 px (40 epochs), trained on the same source pool. Then, on the target pool of another domain, each setting
trains a LoRA adapter (r=8, α=16, the catalogue's targets, a fresh 10-class head, and by default its own copy
of every BatchNorm, see ``LoRAConfig.norm_layers``, trained in the ``norm`` group) or a full fine-tune
(``training.full_finetune_copy``), ``--epochs`` epochs of batch 64, and reports the test accuracy of the best
validation state. "step 1" is the training loss of the first batch before and after the first optimizer step
of that very run (a loss that grows there is the divergence the defaults must avoid). Every run is kept in
results/lr_defaults.json; a run already there is reused unless ``--again`` or the defaults it ran with moved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from results_md import write_section
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, backbones, data, training

HERE = Path(__file__).parent
RESULTS = HERE / "results"
JSON = RESULTS / "lr_defaults.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as a pretrained torchvision model expects


@dataclass(frozen=True)
class Model:
    """A backbone: its catalogue name, the image size, whether images are ImageNet-normalised, and how it is
    pretrained on the source domain."""

    arch: str
    size: int
    normalise: bool
    pretrain_epochs: int
    pretrain_lr: float


MODELS = {
    "mobilenet_v2": Model("mobilenet_v2", 64, True, pretrain_epochs=25, pretrain_lr=2e-3),
    "resnet18": Model("resnet18", 64, True, pretrain_epochs=10, pretrain_lr=2e-3),
    "resnet_small": Model("resnet_small", 8, False, pretrain_epochs=8, pretrain_lr=2e-3),  # as the demo
    "vit_small": Model("vit_small", 16, False, pretrain_epochs=40, pretrain_lr=2e-3),  # the demo's 16 px
}
DOMAINS = ("rotated", "rotated-noisy")


@dataclass(frozen=True)
class Setting:
    """What one run trains (``lora``: adapter, head and the norms ``norms`` names, see LoRAConfig.norm_layers,
    None for its default; ``full``: the whole network) and with which ``lr`` (None: training.DEFAULTS), with or
    another warm-up (``warmup``: a share of the steps, 0 for none)."""

    name: str
    kind: str
    lr: float | Mapping[str, float] | None = None
    warmup: float | None = None  # the share of the steps warmed up; None: training.WARMUP_FRACTION
    norms: str | None = None
    weight_decay: float | Mapping[str, float] | None = None


def lora(lora_lr: float, head_lr: float) -> Setting:
    return Setting(f"lora {lora_lr:g}, head {head_lr:g}", "lora", {"lora": lora_lr, "head": head_lr})


SETTINGS = [
    Setting("5e-3 for all, frozen norms, no warm-up (before)", "lora", 5e-3, warmup=0, norms="frozen"),
    Setting("1e-2 for all, frozen norms, no warm-up", "lora", 1e-2, warmup=0, norms="frozen"),
    Setting("1e-2 for all", "lora", 1e-2),
    Setting("5e-3 for all", "lora", 5e-3),
    Setting("5e-3 for all, frozen norms", "lora", 5e-3, norms="frozen"),
    *(lora(a, 5e-3) for a in (5e-3, 2e-3, 1e-3, 5e-4, 2e-4)),
    lora(5e-4, 1e-3),
    lora(1e-3, 2e-3),
    Setting("defaults (lr=None)", "lora"),
    Setting("defaults, no warm-up", "lora", warmup=0),
    Setting("defaults, warm-up 5%", "lora", warmup=0.05),
    Setting("defaults, warm-up 10%", "lora", warmup=0.1),
    Setting("defaults, warm-up 20%", "lora", warmup=0.2),
    Setting("defaults, frozen norms", "lora", norms="frozen"),
    Setting("defaults, every norm owned", "lora", norms="all"),
    Setting("defaults, norms at 5e-3", "lora", {"norm": 5e-3}),
    Setting("defaults, norms at 2e-4", "lora", {"norm": 2e-4}),
    Setting("defaults, weight decay 0.05", "lora", weight_decay=0.05),
    Setting("full 3e-4", "full", 3e-4),
    Setting("full 1e-3", "full", 1e-3),
    Setting("full 3e-3", "full", 3e-3),
    Setting("full, defaults (lr=None)", "full"),
]
BY_NAME = {s.name: s for s in SETTINGS}


# --- data and backbones ---------------------------------------------------------------------------------
def prepared(ds: data.Dataset, model: Model) -> data.Dataset:
    """``ds`` at the model's image size (bilinear), ImageNet-normalised where the model wants it."""

    def convert(split: data.Split) -> data.Split:
        x = split.x
        if x.shape[-1] != model.size:
            x = F.interpolate(x, size=(model.size, model.size), mode="bilinear", align_corners=False)
        if model.normalise:
            x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        return data.Split(x.contiguous(), split.y)

    return data.Dataset(convert(ds.train), convert(ds.val), convert(ds.test), ds.num_classes, ds.name)


def pretrained(model: Model, cache: Path, seed: int) -> tuple[nn.Module, float]:
    """The backbone trained on the source pool (reloaded from ``cache`` when it is there), frozen, and its
    source test accuracy."""
    source = prepared(data.digits("original", pool="source", seed=seed), model)
    path = cache / f"{model.arch}-{model.size}px-e{model.pretrain_epochs}-lr{model.pretrain_lr:g}-s{seed}.safetensors"
    spec = {"architecture": model.arch, "num_classes": 10, "seed": seed}
    if not path.exists():
        net = backbones.build_backbone(spec)
        print(f"pretraining {model.arch} at {model.size} px on the source pool", file=sys.stderr)
        fit = training.fit(net, source.train, source.val, epochs=model.pretrain_epochs, lr=model.pretrain_lr,
                           seed=seed, progress=False)  # fmt: skip
        print(f"validation accuracy {fit.history}", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        backbones.save_weights(net, path)
    net = backbones.build_backbone({**spec, "weights": str(path)})
    net.requires_grad_(False)
    return net, training.evaluate(net, source.test)


# --- one run --------------------------------------------------------------------------------------------
@contextmanager
def warmup(fraction: float | None) -> Iterator[None]:
    """fit with a warm-up over ``fraction`` of the steps (0: none, the cosine from the first step as before;
    None: the library's)."""
    original = training.warmup_steps
    if fraction is not None:
        training.warmup_steps = lambda total: math.ceil(fraction * total)  # type: ignore[assignment]
    try:
        yield
    finally:
        training.warmup_steps = original  # type: ignore[assignment]


def build(setting: Setting, backbone: nn.Module, model: Model) -> nn.Module:
    """The network a run trains, its fresh head drawn from the seeded global generator."""
    entry = backbones.entry(model.arch)
    head = backbones.new_head(backbones.head_layer(backbone, entry.head), 10)
    if setting.kind == "full":
        return training.full_finetune_copy(backbone, entry.head, head)
    adapted = AdapterModel(backbone)
    norms = {} if setting.norms is None else {"norm_layers": setting.norms}
    adapted.add_adapter("a", LoRAConfig(r=8, alpha=16, targets=entry.targets, heads=[entry.head], **norms),
                        head_modules={entry.head: head})  # fmt: skip
    adapted.activate("a")
    return adapted


def first_step(net: nn.Module, split: data.Split, setting: Setting, epochs: int, seed: int) -> tuple[float, float]:
    """The loss of fit's first batch before and after fit's first optimizer step (same groups, learning rates,
    warm-up factor and batch); the network is put back as it was."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    groups = training.parameter_groups(net)
    lrs, decays = training.learning_rates(setting.lr), training.weight_decays(setting.weight_decay)
    total = epochs * math.ceil(len(split) / 64)
    with warmup(setting.warmup):
        factor = training.lr_factor(0, total, training.warmup_steps(total))
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lrs[g] * factor, "weight_decay": decays[g]}
                                   for g, ps in groups.items()])  # fmt: skip
    x, y = next(iter(split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(seed))))
    net.train()
    torch.manual_seed(seed)
    before = F.cross_entropy(net(x), y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(net(x), y)
    net.load_state_dict(saved)
    net.zero_grad(set_to_none=True)
    return before.item(), after.item()


def run(setting: Setting, pristine: nn.Module, model: Model, ds: data.Dataset, epochs: int, seed: int) -> dict:
    backbone = copy.deepcopy(pristine)  # an AdapterModel takes over the adapted modules' forward: one per run
    torch.manual_seed(seed)
    net = build(setting, backbone, model)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    loss0, loss1 = first_step(net, ds.train, setting, epochs, seed)
    start = time.perf_counter()
    with warmup(setting.warmup):
        fit = training.fit(net, ds.train, ds.val, epochs=epochs, lr=setting.lr, weight_decay=setting.weight_decay,
                           seed=seed, progress=False)  # fmt: skip
    if setting.kind == "lora":
        assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in frozen.items()), "the backbone moved"
    return {
        "test": training.evaluate(net, ds.test), "val": fit.best_accuracy, "best_step": fit.best_step,
        "steps": fit.steps, "lrs": fit.lrs, "warmup_steps": fit.warmup_steps,
        "loss0": loss0, "loss1": loss1, "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


# --- the table ------------------------------------------------------------------------------------------
def key(model: str, domain: str, setting: str, seed: int, epochs: int) -> str:
    return f"{model}|{domain}|{setting}|seed{seed}|e{epochs}"


def cell(runs: dict, model: str, domain: str, setting: str, seeds: list[int], epochs: int) -> dict | None:
    """The mean over seeds of the runs present (None if none)."""
    found = [runs[k] for s in seeds if (k := key(model, domain, setting, s, epochs)) in runs]
    if not found:
        return None
    mean = {f: sum(r[f] for r in found) / len(found) for f in ("test", "loss0", "loss1")}
    return {**mean, "n": len(found), "lrs": found[0]["lrs"], "warmup_steps": found[0]["warmup_steps"]}


def markdown(results: dict) -> str:
    env, runs, epochs, seeds = results["env"], results["runs"], results["epochs"], results["seeds"]
    out = [
        "## Learning-rate defaults (benchmarks/lr_defaults.py)",
        "",
        f"{env['machine']} ({env['threads']} threads); torch {env['torch']}, torchvision {env['torchvision']}; "
        f"{epochs} epochs of batch 64, AdamW, cosine; seeds {', '.join(map(str, seeds))} (means).",
        "",
        "Test accuracy on the target pool of each domain (about 180 images: one image is 0.56 points); \"of full\" "
        "is LoRA's accuracy over the full fine-tune's with the default lr (`full, defaults`); \"step 1\" is the "
        "loss of the first batch before → after the first step (**↑**: it grew). The defaults: "
        + ", ".join(f"{g} {v}" for g, v in results["defaults"].items())
        + f"; a linear warm-up over {results['warmup_fraction']:.0%} of the steps (at least one), then the cosine.",
    ]  # fmt: skip
    for name, model in results["models"].items():
        domains = [d for d in DOMAINS if any(k.startswith(f"{name}|{d}|") for k in runs)]
        if not domains:
            continue
        out += ["", f"### {name} at {model['size']} px, pretrained on the source pool (source test accuracy "
                    f"{model['source_accuracy']:.1%})", ""]  # fmt: skip
        head = "| setting | peak lrs; warm-up steps |" + "".join(f" {d}: step 1 | {d}: test | of full |"
                                                             for d in domains)  # fmt: skip
        out += [head, "|---|---|" + "---|---|---|" * len(domains)]
        full = {d: cell(runs, name, d, "full, defaults (lr=None)", seeds, epochs) for d in domains}
        best = {d: max((c["test"], s.name) for s in SETTINGS if s.kind == "full"
                       and (c := cell(runs, name, d, s.name, seeds, epochs))) for d in domains}  # fmt: skip
        for setting in SETTINGS:
            cells = [cell(runs, name, d, setting.name, seeds, epochs) for d in domains]
            if not any(cells):
                continue
            first = next(c for c in cells if c)
            lrs = {g: first["lrs"][g] for g in training.GROUPS if g in first["lrs"]}
            stale = any(not current(r, setting) for d in domains for s in seeds
                        if (r := runs.get(key(name, d, setting.name, s, epochs))))  # fmt: skip
            shown = setting.name + (" †" if stale else "")
            row = f"| {shown} | {training.format_lrs(lrs)}; {first['warmup_steps']} |"
            for d, c in zip(domains, cells):
                if c is None:
                    row += " — | — | — |"
                    continue
                grew = " **↑**" if c["loss1"] > c["loss0"] else ""
                ratio = f"{c['test'] / full[d]['test']:.1%}" if full[d] and setting.kind == "lora" else ""
                row += f" {c['loss0']:.2f} → {c['loss1']:.2f}{grew} | {c['test']:.1%} | {ratio} |"
            out.append(row)
        out += ["", "Best full fine-tune: " + "; ".join(f"{d} {best[d][0]:.1%} ({best[d][1]})" for d in domains) + "."]
    out += ["", "† ran under earlier defaults (a 5% warm-up, or LoRA 5e-4 / norms 1e-3 where the setting takes "
                "them from the defaults): its warm-up steps and learning rates are the ones shown."]  # fmt: skip
    return "\n".join(out) + "\n"


def current(previous: dict, setting: Setting) -> bool:
    """Whether a stored run trained with the learning rates and the warm-up ``setting`` gives now (the defaults
    may have moved)."""
    lrs = training.learning_rates(setting.lr)
    with warmup(setting.warmup):
        steps = training.warmup_steps(previous["steps"])
    return previous["warmup_steps"] == steps and all(lrs[g] == v for g, v in previous["lrs"].items())


# --- main -----------------------------------------------------------------------------------------------
def environment() -> dict:
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__}  # fmt: skip


def load() -> dict:
    return json.loads(JSON.read_text()) if JSON.exists() else {"runs": {}, "models": {}}


def save(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    JSON.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=list(DOMAINS))
    parser.add_argument("--settings", nargs="+", choices=list(BY_NAME), default=list(BY_NAME), metavar="SETTING")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "adapter-hub-lr-defaults")
    parser.add_argument("--again", action="store_true", help="rerun runs already in results/lr_defaults.json")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from the json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 on a busy machine: more threads than free cores only wait)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = load()
    if not args.rewrite:
        results.update(env=environment(), epochs=args.epochs, seeds=sorted(set(args.seeds)),
                       defaults={g: f"{d.lr:g} (wd {d.weight_decay:g})" for g, d in training.DEFAULTS.items()},
                       warmup_fraction=training.WARMUP_FRACTION)  # fmt: skip
        for name in args.models:
            model = MODELS[name]
            for seed in args.seeds:
                backbone, source_accuracy = pretrained(model, args.cache, seed)
                results["models"][name] = {"size": model.size, "source_accuracy": source_accuracy}
                for domain in args.domains:
                    ds = prepared(data.digits(domain, pool="target", seed=seed), model)
                    for setting in (BY_NAME[s] for s in args.settings):
                        k = key(name, domain, setting.name, seed, args.epochs)
                        if k in results["runs"] and not args.again and current(results["runs"][k], setting):
                            continue
                        r = results["runs"][k] = run(setting, backbone, model, ds, args.epochs, seed)
                        print(f"{k}: test {r['test']:.1%}, step 1 {r['loss0']:.2f} → {r['loss1']:.2f}, "
                              f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
                        save(results)
    text = markdown(results)
    print(text)
    write_section("lr_defaults", text)


if __name__ == "__main__":
    main()
