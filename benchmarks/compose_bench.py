"""Composition speed and combine quality, side by side with PEFT in the same run.

    python benchmarks/compose_bench.py            # full run (a few minutes on 2 cores)
    python benchmarks/compose_bench.py --quick    # fewer repeats, smaller batch

Prints a table, writes benchmarks/results/compose.json, the "Composition" section of
benchmarks/RESULTS.md and benchmarks/results/compose_mixed.png (forward time against K adapters).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from results_md import fmt, ratio, write_section
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Switch

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192, mlp_dim=768, num_classes=10
    ).eval()


RESNET_TARGETS = ["conv1", "layer*.conv*", "layer*.downsample.0", "fc"]
RESNET_PEFT = ["conv1", "conv2", "downsample.0", "fc"]
VIT_TARGETS = ["*.self_attention", "*.mlp.0", "*.mlp.3"]
VIT_PEFT = ["self_attention", "mlp.0", "mlp.3"]


def ours_model(bb: nn.Module, targets: list[str], k: int, r: int) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(bb))
    for i in range(k):
        model.add_adapter(f"t{i}", LoRAConfig(r=r, alpha=2 * r, targets=targets))
        randomize(model.adapters[f"t{i}"].parameters(), i)
    return model.eval()


def peft_model(bb: nn.Module, targets: list[str], k: int, r: int):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            copy.deepcopy(bb), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter_name="t0"
        )
        for i in range(1, k):
            model.add_adapter(f"t{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    for i in range(k):
        randomize([p for n, p in model.named_parameters() if f".t{i}." in n and "lora_" in n], i)
    return model.eval()


def forward_table(bb: nn.Module, x: torch.Tensor, targets: list[str], peft_targets: list[str], ks: list[int],
                  repeats: int, r: int) -> dict:  # fmt: skip
    """Every case is timed in interleaved rounds (one call of each case per round, medians over the rounds),
    so that a slow spell of the machine hits all cases alike instead of one of them."""
    n = x.shape[0]
    # models are built outside inference mode, as a user would load them
    unmerged, merged = ours_model(bb, targets, 1, r), ours_model(bb, targets, 1, r)
    unmerged.activate("t0")
    merged.activate("t0")
    merged.merge("t0")
    p_unmerged, p_merged = peft_model(bb, peft_targets, 1, r), peft_model(bb, peft_targets, 1, r)
    bare = copy.deepcopy(bb)
    cases: dict[tuple[str, str], Callable[[], object]] = {
        ("bare", "ours"): lambda: bare(x),
        ("one adapter, unmerged", "ours"): lambda: unmerged(x),
        ("one adapter, merged", "ours"): lambda: merged(x),
        ("one adapter, unmerged", "peft"): lambda: p_unmerged(x),
    }
    failures: dict[tuple[str, str], str] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_merged.merge_adapter()
        cases[("one adapter, merged", "peft")] = lambda: p_merged(x)
    except Exception as exc:  # PEFT refuses some merges (e.g. grouped convs)
        failures[("one adapter, merged", "peft")] = f"fails: {type(exc).__name__}"
    for k in ks:
        route = [f"t{i % k}" for i in range(n)]
        mk = ours_model(bb, targets, k, r)
        mk.activate(Switch(*[f"t{i}" for i in range(k)]))
        key = f"mixed batch, K={k}"
        cases[(key, "ours")] = lambda mk=mk, route=route: mk(x, route=route)
        pk = peft_model(bb, peft_targets, k, r)
        try:
            with torch.inference_mode():
                pk(x[:2], adapter_names=route[:2])
            cases[(key, "peft")] = lambda pk=pk, route=route: pk(x, adapter_names=route)
        except Exception as exc:
            failures[(key, "peft")] = f"fails: {type(exc).__name__}"
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
            fn()
        for _ in range(repeats):
            for case, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[case].append(time.perf_counter() - start)
    rows: dict = {}
    for (case, side), ts in times.items():
        rows.setdefault(case, {})[side] = statistics.median(ts)
    for (case, side), why in failures.items():
        rows.setdefault(case, {})[side] = why
    rows["bare"]["peft"] = rows["bare"]["ours"]
    base = rows["bare"]["ours"]
    for row in rows.values():
        for side in ("ours", "peft"):
            if isinstance(row.get(side), float):
                row[f"{side}_x_bare"] = row[side] / base
        if isinstance(row.get("peft"), float):
            row["peft_over_ours"] = row["peft"] / row["ours"]
    return rows


def dense_delta_ours(layer, param: str) -> torch.Tensor:
    return layer.delta_weights()[param].double()


def combine_table(bb: nn.Module, k: int, r: int, rank: int, repeats: int) -> dict:
    """Combine k adapters into one: time and relative Frobenius error against the exact target."""
    from adapter_hub.compose import methods

    out: dict = {}
    ours = ours_model(bb, RESNET_TARGETS, k, r)
    names = [f"t{i}" for i in range(k)]
    weights = [1.0 / k] * k
    pk = peft_model(bb, RESNET_PEFT, k, r)
    peft_layers = {n: m for n, m in pk.base_model.model.named_modules() if hasattr(m, "lora_A") and "t0" in m.lora_A}

    def exact_sum(path: str) -> torch.Tensor:
        layers = [dict(ours.adapters[n].layer_items())[path] for n in names]
        return sum(w * dense_delta_ours(layer, "weight") for layer, w in zip(layers, weights))

    def ties_target(path: str) -> torch.Tensor:
        layers = [dict(ours.adapters[n].layer_items())[path] for n in names]
        return methods.ties([dense_delta_ours(layer, "weight") for layer in layers], weights, 0.2, "total").double()

    def rel_error(get_delta: Callable[[str], torch.Tensor], target: Callable[[str], torch.Tensor]) -> float:
        num = den = 0.0
        for path, _ in ours.adapters["t0"].layer_items():
            t = target(path)
            num += float((get_delta(path).double().reshape(t.shape) - t).square().sum())
            den += float(t.square().sum())
        return (num / den) ** 0.5

    def peft_delta(name: str) -> Callable[[str], torch.Tensor]:
        return lambda path: peft_layers[path].get_delta_weight(name).detach()

    counter, pcounter = itertools.count(), itertools.count()
    for method, target, ours_kwargs, peft_kwargs in [
        ("svd", exact_sum, {"method": "svd", "rank": rank}, {"combination_type": "svd", "svd_rank": rank}),
        ("ties", ties_target, {"method": "ties", "density": 0.2, "rank": rank},
         {"combination_type": "ties", "density": 0.2}),
    ]:  # fmt: skip

        def run_ours(ours_kwargs=ours_kwargs):
            name = f"ours_{next(counter)}"
            ours.combine(name, names, weights, **ours_kwargs)
            return name

        t_ours = median_time(run_ours, repeats, warmup=1)
        last = run_ours()
        ours_err = rel_error(lambda p, last=last: dict(ours.adapters[last].layer_items())[p].delta_weight(), target)

        def run_peft(peft_kwargs=peft_kwargs):
            name = f"peft_{next(pcounter)}"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                pk.add_weighted_adapter(names, weights, name, **peft_kwargs)
            return name

        try:
            t_peft = median_time(run_peft, repeats, warmup=1)
            plast = run_peft()
            peft_err = rel_error(peft_delta(plast), target)
        except Exception as exc:
            t_peft, peft_err = f"fails: {type(exc).__name__}", None
        out[method] = {"ours_s": t_ours, "ours_rel_error": ours_err, "peft_s": t_peft, "peft_rel_error": peft_err}
        if isinstance(t_peft, float):
            out[method]["speedup"] = t_peft / t_ours
    return out


NOTES = [
    "How it runs: a single adapter or a stack computes `[W; A₁; …] ⋆ x` in one conv/linear call and applies "
    "each B with one fused, scaled multiply-add (`baddbmm`/`addmm`); a mixed batch is sorted by adapter once, "
    "the base op runs on the whole batch and each adapter's A on its own contiguous rows. PEFT's "
    "`adapter_names` path refuses `nn.MultiheadAttention` (the TypeError in the ViT table).",
    "",
    "Where a target is missed: the resnet18 mixed batch with K=8 stays above 1.25× bare because the A convs "
    "(8 output channels) run far below the base convs' efficiency on this CPU: about 12% of the FLOPs of "
    "layer1's convs but about 25% of their time. Tried: one fused `[W; A_k]` conv per adapter's rows on the "
    "large early feature maps (no gain end to end), one grouped conv over all segments (gains only in the "
    "last stage, loses on the stem), all A's on all rows (doubles layer1). The same A-conv cost keeps the "
    "ratio to PEFT's mixed batch near 1.25× rather than 1.3×. TIES is exact per layer on the dense ΔW "
    "(float64, top-k per layer), hence seconds, where PEFT's A/B-wise TIES is fast and far off (error 1.9).",
]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "## Composition (benchmarks/compose_bench.py)",
        "",
        f"{env['machine']}; torch {env['torch']}, torchvision {env['torchvision']}, peft {env['peft']}; "
        f"{env['threads']} threads; median of {env['repeats']} interleaved rounds; inference mode.",
        "",
    ]
    titles = {
        "resnet18": "torchvision resnet18, LoRA r=8 on every conv and the fc",
        "vit": "torchvision VisionTransformer (6 layers, width 192), LoRA r=8 on attention and MLP",
    }
    for key, title in titles.items():
        table = results[key]
        lines += [f"### {title}, batch {table['batch']}", "",
                  "| case | ours | ours ÷ bare | PEFT | PEFT ÷ bare | PEFT ÷ ours | target | met |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for case, row in table["rows"].items():
            target, met = results["targets"].get(key, {}).get(case, ("", None))
            lines.append(
                f"| {case} | {fmt(row['ours'])} | {ratio(row.get('ours_x_bare'))} | {fmt(row.get('peft', '—'))} | "
                f"{ratio(row.get('peft_x_bare'))} | {ratio(row.get('peft_over_ours'))} | {target} | "
                f"{'' if met is None else ('yes' if met else '**no**')} |"
            )
        lines.append("")
    c = results["combine"]
    lines += [f"### Combining {c['k']} resnet18 adapters (r=8) into one of rank {c['rank']}", "",
              "| method | ours | ours rel. error | PEFT | PEFT rel. error | PEFT ÷ ours | target | met |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ("svd", "ties"):
        row = c[method]
        target, met = results["targets"]["combine"].get(method, ("", None))
        perr = f"{row['peft_rel_error']:.3g}" if row["peft_rel_error"] is not None else "—"
        lines.append(
            f"| {method} | {fmt(row['ours_s'])} | {row['ours_rel_error']:.3g} | {fmt(row['peft_s'])} | {perr} | "
            f"{ratio(row.get('speedup'))} | {target} | {'' if met is None else ('yes' if met else '**no**')} |"
        )
    lines += ["", *NOTES]
    lines += ["", "Errors are relative Frobenius norms over all layers: svd against the exact Σ wᵢ·ΔWᵢ; "
              "ties against TIES applied to the dense ΔWᵢ (density 0.2), which is what PEFT's A/B-wise "
              "TIES approximates.", "", "![forward time against K](results/compose_mixed.png)", ""]  # fmt: skip
    return "\n".join(lines)


def judge(results: dict) -> dict:
    res, v = results["resnet18"]["rows"], results["vit"]["rows"]

    def x(row, key="ours_x_bare"):
        return row.get(key) if isinstance(row.get(key), float) else None

    targets = {
        "resnet18": {
            "one adapter, unmerged": ("≤ 1.15× bare", (x(res["one adapter, unmerged"]) or 9) <= 1.15),
            "one adapter, merged": ("≤ 1.02× bare", (x(res["one adapter, merged"]) or 9) <= 1.02),
        },
        "vit": {},
        "combine": {},
    }
    if "mixed batch, K=8" in res:
        row = res["mixed batch, K=8"]
        targets["resnet18"]["mixed batch, K=8"] = (
            "≤ 1.25× bare, PEFT ≥ 1.3× ours",
            (x(row) or 9) <= 1.25 and (x(row, "peft_over_ours") or 0) >= 1.3,
        )
    if "mixed batch, K=8" in v:
        targets["vit"]["mixed batch, K=8"] = ("≤ 1.3× bare", (x(v["mixed batch, K=8"]) or 9) <= 1.3)
    svd = results["combine"]["svd"]
    ok = (
        isinstance(svd.get("speedup"), float)
        and svd["speedup"] >= 10
        and (svd["peft_rel_error"] is None or svd["ours_rel_error"] <= svd["peft_rel_error"] + 1e-6)
    )
    targets["combine"]["svd"] = ("≥ 10× faster than PEFT, error ≤ PEFT's", ok)
    return targets


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("resnet18", "vit")):
        rows = results[key]["rows"]
        ks = sorted(int(c.split("=")[1]) for c in rows if c.startswith("mixed"))
        bare = rows["bare"]["ours"] * 1000
        ax.plot(ks, [rows[f"mixed batch, K={k}"]["ours"] * 1000 for k in ks], "o-", label="adapter-hub Switch")
        peft_ks = [k for k in ks if isinstance(rows[f"mixed batch, K={k}"].get("peft"), float)]
        if peft_ks:
            ax.plot(
                peft_ks,
                [rows[f"mixed batch, K={k}"]["peft"] * 1000 for k in peft_ks],
                "s--",
                label="PEFT adapter_names",
            )
        ax.axhline(bare, color="gray", linestyle=":", label="bare backbone")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("adapters in the batch (K)")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(f"{key}, batch {results[key]['batch']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "compose_mixed.png", dpi=110)


def rewrite_from_json() -> None:
    """Regenerate the RESULTS.md section from results/compose.json without measuring again."""
    results = json.loads((RESULTS / "compose.json").read_text())
    write_section("compose", markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from results/compose.json")
    args = parser.parse_args()
    if args.rewrite:
        rewrite_from_json()
        return
    torch.set_num_threads(args.threads)
    import peft

    repeats = 3 if args.quick else 11
    batch = 16 if args.quick else 64
    ks = [2, 4, 8] if args.quick else [2, 4, 8, 16]
    g = torch.Generator().manual_seed(0)
    results: dict = {
        "environment": {
            "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "peft": peft.__version__,
            "threads": args.threads,
            "repeats": repeats,
        },  # fmt: skip
    }
    x = torch.randn(batch, 3, 64, 64, generator=g)
    results["resnet18"] = {
        "batch": f"{batch}×3×64×64",
        "rows": forward_table(resnet(), x, RESNET_TARGETS, RESNET_PEFT, ks, repeats, 8),
    }
    xv = torch.randn(batch, 3, 32, 32, generator=g)
    results["vit"] = {
        "batch": f"{batch}×3×32×32",
        "rows": forward_table(vit(), xv, VIT_TARGETS, VIT_PEFT, ks, repeats, 8),
    }
    results["combine"] = {"k": 8, "rank": 8, **combine_table(resnet(), 8, 8, 8, 1 if args.quick else 3)}
    results["targets"] = judge(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compose.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    print(text)
    write_section("compose", text)
    plot(results)


if __name__ == "__main__":
    main()
