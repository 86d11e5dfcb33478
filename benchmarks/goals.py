"""The transfer goals, measured with the defaults a user gets.

1. The demo (``adapter-hub demo``, library call, a fresh registry) for the ResNet and the ViT backbone: LoRA ≥ 99% of
   full fine-tuning on every domain at ≤ 3% trainable parameters, transfer ≤ 50% of the steps, the 3-task TIES
   average ≥ 85% normalized, the switch exact. The goals are the demo's own (``DemoResult.goals``).
2. A torchvision network with real pretrained weights from a local file, fine-tuned from the **CLI defaults**:
   the network (resnet18 by default) is trained on the upright digits (source pool, 64 px, ImageNet
   statistics, 10 epochs at lr 2e-3) and saved; the saved
   file is registered with ``adapter-hub backbone add ... --weights FILE --image-size 64 --mean --std`` (the
   input transform is recorded with it), a target domain is written with ``adapter-hub data digits``, and
   ``adapter-hub train TASK/lora --backbone B --data DIR --full`` trains the LoRA adapter with every default
   (rank, targets, norms, learning rates, epochs) and the full fine-tune baseline on the same data. Goal: LoRA
   ≥ 97% of the full fine-tune's test accuracy.

Usage: ``python benchmarks/goals.py [--quick] [--only demo|pretrained]``; prints the goal table and writes the
``goals`` section of RESULTS.md and results/goals.json (``--quick`` writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapter_hub import Hub, backbones, data, training
from adapter_hub.demo import DemoSettings, run_demo

sys.path.insert(0, str(Path(__file__).parent))
from results_md import write_section  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "goals.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRETRAINED_GOAL = 0.97


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTER_HUB_HOME": str(home)}
    env.pop("ADAPTER_HUB_DB", None)
    done = subprocess.run([sys.executable, "-m", "adapter_hub.cli", "--json", *args], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"adapter-hub {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def demo_goals(backbone: str, home: Path, quick: bool) -> dict:
    settings = DemoSettings(backbone=backbone, progress=False)
    if quick:
        settings.epochs, settings.backbone_epochs = 1, 1
    with Hub.open(home) as hub:
        result = run_demo(hub, settings)
    return {
        "backbone": backbone,
        "seconds": result.seconds,
        "goals": [{"goal": g, "measured": m, "met": bool(ok)} for g, m, ok in result.goals()],
    }


def pretrained_goal(arch: str, work: Path, *, domain: str, size: int, pretrain_epochs: int, quick: bool) -> dict:
    """Pretrain ``arch`` on the upright digits, save it, and fine-tune it from the CLI defaults on ``domain``."""
    inputs = data.ImageInputs.of(size, IMAGENET_MEAN, IMAGENET_STD)
    source = data.transform_dataset(data.digits("original", pool="source"), inputs)
    torch.manual_seed(0)
    net = backbones.build_backbone({"architecture": arch, "num_classes": 10, "seed": 0, "weights": None})
    start = time.perf_counter()
    training.fit(net, source.train, source.val, epochs=pretrain_epochs, lr=2e-3, seed=0, progress=False)
    pretrain_seconds = time.perf_counter() - start
    source_accuracy = training.evaluate(net, source.test)
    weights = backbones.save_weights(net, work / f"{arch}-digits.safetensors")

    home, folder = work / "home", work / domain
    cli(home, "backbone", "add", "pretrained", arch, "--weights", str(weights), "--num-classes", "10",
        "--image-size", str(size), "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std",
        ",".join(map(str, IMAGENET_STD)))  # fmt: skip
    cli(home, "task", "add", "digits-target", "--num-classes", "10")
    cli(home, "data", "digits", str(folder), "--domain", domain, "--pool", "target")
    start = time.perf_counter()
    extra = ["--epochs", "1"] if quick else []  # everything else: the defaults
    version = json.loads(cli(home, "train", "digits-target/lora", "--backbone", "pretrained", "--data", str(folder),
                             "--full", *extra).stdout)  # fmt: skip
    train_seconds = time.perf_counter() - start
    with Hub.open(home) as hub:
        metrics = {m.name: m.value for m in hub.metrics(version["ref"])}
    lora, full = metrics["test/accuracy"], metrics["baseline/full_finetune_accuracy"]
    ratio = lora / full if full else 0.0
    return {
        "architecture": arch, "domain": domain, "size": size, "source_accuracy": source_accuracy,
        "pretrain_seconds": pretrain_seconds, "train_seconds": train_seconds, "lora": lora, "full": full,
        "ratio": ratio, "trainable": version.get("trainable_params"),
        # a network that learnt nothing on its source domain is no pretrained network: that is no goal met
        "met": ratio >= PRETRAINED_GOAL and source_accuracy >= 0.9,
    }  # fmt: skip


def table(results: dict) -> str:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for demo in results.get("demo", []):
        for g in demo["goals"]:
            lines.append(f"| {demo['backbone']} demo: {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |")
    for p in results.get("pretrained", []):
        lines.append(
            f"| pretrained {p['architecture']} (local file, {p['size']} px) from the CLI defaults ≥ 97% of full "
            f"fine-tuning on `{p['domain']}` | {p['ratio']:.1%} (LoRA {p['lora']:.1%}, full {p['full']:.1%}; "
            f"source {p['source_accuracy']:.1%}) | "
            f"{'yes' if p['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one epoch everywhere; writes nothing")
    parser.add_argument("--only", choices=["demo", "pretrained"])
    parser.add_argument("--arch", default="resnet18", help="the pretrained torchvision network")
    parser.add_argument("--domain", default="rotated-noisy", help="the pretrained network's target domain")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "demo"):
            results["demo"] = [demo_goals(b, work / f"demo-{b}", args.quick) for b in ("resnet", "vit")]
        if args.only in (None, "pretrained"):
            size, epochs = (32, 1) if args.quick else (64, 10)
            results["pretrained"] = [pretrained_goal(args.arch, work, domain=args.domain, size=size,
                                                     pretrain_epochs=epochs, quick=args.quick)]  # fmt: skip
    text = table(results)
    print(text)
    if args.quick:
        return
    if RESULTS.exists() and args.only:  # one part rerun: keep the other's numbers
        results = {**json.loads(RESULTS.read_text()), **results}
        text = table(results)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_section("goals", "## Transfer goals (`benchmarks/goals.py`)\n\n" + text)


if __name__ == "__main__":
    main()
