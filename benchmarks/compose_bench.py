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
import torch.nn.functional as F
import torchvision
from results_md import fmt, ratio, write_section
from timing import interleaved
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
    with torch.inference_mode():
        times = interleaved(cases, repeats)
    rows: dict = {}
    for (case, side), t in times.items():
        rows.setdefault(case, {})[side] = t
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

    def dense_target(method: str) -> Callable[[], Callable[[str], torch.Tensor]]:
        """The dense method on the float64 ΔWᵢ, layer by layer in the order combine takes them (DARE's masks come
        from one generator seeded as combine seeds it, so each layer gets the same draws)."""

        def make() -> Callable[[str], torch.Tensor]:
            generator = torch.Generator().manual_seed(0)

            def target(path: str) -> torch.Tensor:
                deltas = [dense_delta_ours(dict(ours.adapters[n].layer_items())[path], "weight") for n in names]
                if method == "ties":
                    return methods.ties(deltas, weights, 0.2, "total")
                if method == "dare_ties":
                    return methods.dare_ties(deltas, weights, 0.2, generator, "total")
                return methods.magnitude_prune(deltas, weights, 0.2)

            return target

        return make

    def rel_error(get_delta: Callable[[str], torch.Tensor], make_target: Callable) -> float:
        target = make_target()
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
        ("svd", lambda: exact_sum, {"method": "svd", "rank": rank}, {"combination_type": "svd", "svd_rank": rank}),
        *((m, dense_target(m), {"method": m, "density": 0.2, "rank": rank}, {"combination_type": m, "density": 0.2})
          for m in ("ties", "dare_ties", "magnitude_prune")),
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
            # PEFT draws DARE's masks from torch's global generator: another random target, no error to compare
            peft_err = None if method.startswith("dare") else rel_error(peft_delta(plast), target)
        except Exception as exc:
            t_peft, peft_err = f"fails: {type(exc).__name__}", None
        out[method] = {"ours_s": t_ours, "ours_rel_error": ours_err, "peft_s": t_peft, "peft_rel_error": peft_err}
        if isinstance(t_peft, float):
            out[method]["speedup"] = t_peft / t_ours
    return out


# --- training ----------------------------------------------------------------------------------
class Disagreement(RuntimeError):
    """Ours and PEFT (or the mixed batch and each adapter alone) compute different gradients: no timing."""


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU memory allocated by PyTorch during ``fn()`` above what was allocated when it started: the
    allocations and frees the profiler records, summed in order (an op's own net allocation, and the frees
    the profiler attributes to no op)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    current = top = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        top = max(top, current)
    return top


def file_tensors(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s trainable tensors under their file keys (LoRA factors, heads, owned norms)."""
    adapter = model.adapters[name]
    return {f"{path}.{pname}": p for path, module in adapter.module_items()
            for pname, p in module.named_parameters()}  # fmt: skip


def train_models(bb: nn.Module, spec: dict, k: int) -> dict:
    """Full fine-tune, PEFT with one adapter, ours with one adapter and ours with k adapters, PEFT's adapters
    holding ours' very tensors (B drawn non-zero), all in train mode."""
    import peft
    from peft_copy import copy_into_peft

    def ours(n: int) -> AdapterModel:
        model = AdapterModel(copy.deepcopy(bb))
        for i in range(n):
            model.add_adapter(f"t{i}", LoRAConfig(r=8, alpha=16, targets=spec["targets"], heads=spec["heads"]))
            randomize([p for key, p in file_tensors(model, f"t{i}").items() if "lora_B" in key], i)
        return model.train()

    ours1, ours_k = ours(1), ours(k)
    ours1.activate("t0")
    ours_k.activate(Switch(*[f"t{i}" for i in range(k)]))
    peft_models = []
    for n in (1, k):
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=spec["peft_targets"],
                                 modules_to_save=spec["peft_save"])  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(bb), config, adapter_name="t0")
            for i in range(1, n):
                pm.add_adapter(f"t{i}", copy.deepcopy(config))
        for i in range(n):
            if spec["peft_exact"]:
                copy_into_peft(pm, f"t{i}", file_tensors(ours_k if n == k else ours1, f"t{i}"), Disagreement)
            else:  # PEFT nests out_proj's factors under its MHA wrapper: draw its B apart, same shapes
                randomize([p for name, p in pm.named_parameters() if f"lora_B.t{i}." in name], i)
        peft_models.append(pm.train())
    full = copy.deepcopy(bb).train()
    for p in full.parameters():
        p.requires_grad_(True)
    # The floor of any LoRA step: the same network with only what both sides train besides the factors (the
    # head and, on the resnet18, the BatchNorms) and nothing else: every layer's forward and the input gradients
    # that reach the first adapted layer, with no factor, no factor gradient and no fold.
    floor = copy.deepcopy(bb).train()
    for name, p in floor.named_parameters():
        p.requires_grad_(any(f".{s}." in f".{name}" for s in spec["peft_save"]))
    return {"full": full, "peft1": peft_models[0], "peft_k": peft_models[1], "ours1": ours1, "ours_k": ours_k,
            "floor": floor}


def mixed_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Each adapter's cross-entropy on its own rows, summed, over the whole batch (the mean over samples)."""
    total = sum(F.cross_entropy(out.by_adapter[n], labels[out.rows[n]], reduction="sum") for n in out.by_adapter)
    return total / len(labels)


def check_training(m: dict, x: torch.Tensor, labels: torch.Tensor, route: list[str], peft_exact: bool) -> dict:
    """Before any timing: one adapter's gradients, ours vs PEFT in float64 (where PEFT computes the same function)
    and each side's float32 error against its float64 gradients; the mixed batch's gradients of each adapter vs
    that adapter alone on its rows. Raises Disagreement."""
    from peft_copy import peft_name

    checks: dict = {}

    def grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n, p in params.items() if p.grad is None]
        if missing:
            raise Disagreement(f"no gradient reached {missing[0]}")
        return {n: p.grad.detach().double().clone() for n, p in params.items()}

    def rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
        """The largest difference of any tensor relative to that tensor's largest entry."""
        return max(float((got[k] - w).abs().max() / w.abs().max()) for k, w in want.items())

    def one_adapter(key: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = m[key].to(dtype).zero_grad(set_to_none=True) or m[key]
        F.cross_entropy(model(x.to(dtype)), labels).backward()
        if key == "ours1":
            return grads(file_tensors(model, "t0"))
        params = dict(model.named_parameters())
        return grads({k: params[peft_name(k, "t0")] for k in file_tensors(m["ours1"], "t0")})

    # eval mode: the same function on both sides (no dropout; BatchNorm from its running statistics); a float32
    # model goes to float64 and back exactly
    for key in ("ours1", "peft1", "ours_k"):
        m[key].eval()
    sides = ("ours1", "peft1") if peft_exact else ("ours1",)
    found = {(key, dt): one_adapter(key, dt) for key in sides for dt in (torch.float32, torch.float64)}
    for key in sides:
        m[key].float()
    ours64 = found[("ours1", torch.float64)]
    checks["min_grad_of_a"] = min(float(g.abs().max()) for k, g in ours64.items() if "lora_A" in k)
    if not checks["min_grad_of_a"] > 0:
        raise Disagreement("a LoRA A got an all-zero gradient: B is zero, the check would prove nothing")
    checks["ours_float32_error"] = rel(found[("ours1", torch.float32)], ours64)
    if peft_exact:
        checks["ours_vs_peft_float64"] = rel(ours64, found[("peft1", torch.float64)])
        if checks["ours_vs_peft_float64"] > 1e-9:
            raise Disagreement(f"ours vs PEFT in float64: relative difference {checks['ours_vs_peft_float64']:.3g}")
        checks["peft_float32_error"] = rel(found[("peft1", torch.float32)], found[("peft1", torch.float64)])
    m["ours_k"].zero_grad(set_to_none=True)
    mixed_loss(m["ours_k"](x, route=route), labels).backward()
    names = sorted(set(route))
    mixed = {n: grads(file_tensors(m["ours_k"], n)) for n in names}
    switch, worst = m["ours_k"].active, 0.0
    try:
        for n in names:
            m["ours_k"].zero_grad(set_to_none=True)
            m["ours_k"].activate(n)
            rows = torch.tensor([i for i, r in enumerate(route) if r == n])
            (F.cross_entropy(m["ours_k"](x[rows]), labels[rows], reduction="sum") / len(labels)).backward()
            worst = max(worst, rel(mixed[n], grads(file_tensors(m["ours_k"], n))))
    finally:
        m["ours_k"].activate(switch)
    if worst > 1e-4:
        raise Disagreement(f"mixed-batch gradients vs each adapter alone: relative difference {worst:.3g}")
    checks["mixed_grads_vs_alone"] = worst
    for model in m.values():
        model.train().zero_grad(set_to_none=True)
    return checks


def training_table(bb: nn.Module, spec: dict, x: torch.Tensor, labels: torch.Tensor, k: int, repeats: int) -> dict:
    """One optimizer step each (forward, cross-entropy, backward, AdamW), interleaved rounds; then the peak
    memory of one more step of each. PEFT cannot route a mixed batch in training, so the mixed row's PEFT
    side is k sequential steps, one per adapter on its own rows."""
    with torch.no_grad():  # torchvision's ViT starts its head at zero, which would leave every other gradient zero
        for name in spec["heads"]:
            head = bb.get_submodule(name)
            if not head.weight.any():
                head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    m = train_models(bb, spec, k)
    route = [f"t{i % k}" for i in range(len(labels))]
    checks = check_training(m, x, labels, route, spec["peft_exact"])
    # fused AdamW for every case: PyTorch's default on CPU steps each tensor in Python, which would weigh the
    # optimizer (4× the tensors in the mixed batch) more than the network
    opts = {key: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
            for key, model in m.items()}  # fmt: skip

    def step(key: str, loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            opts[key].zero_grad(set_to_none=True)
            loss_of().backward()
            opts[key].step()

        return run

    peft_k = m["peft_k"]
    subsets = [(f"t{i}", torch.tensor([j for j, r in enumerate(route) if r == f"t{i}"])) for i in range(k)]

    def peft_sequential() -> None:
        for name, rows in subsets:
            peft_k.set_adapter(name)
            opts["peft_k"].zero_grad(set_to_none=True)
            F.cross_entropy(peft_k(x[rows]), labels[rows]).backward()
            opts["peft_k"].step()

    mixed = f"mixed batch, K={k}"
    # the floor needs the input gradient through every layer, as a LoRA on the first one does (a ViT's first
    # adapted layer sits after the patch embedding, which a leaf input with requires_grad reaches)
    x_floor = x.detach().clone().requires_grad_(spec["floor_input_grad"])
    cases = {
        ("full fine-tune", "ours"): step("full", lambda: F.cross_entropy(m["full"](x), labels)),
        (FLOOR, "ours"): step("floor", lambda: F.cross_entropy(m["floor"](x_floor), labels)),
        ("one adapter", "ours"): step("ours1", lambda: F.cross_entropy(m["ours1"](x), labels)),
        ("one adapter", "peft"): step("peft1", lambda: F.cross_entropy(m["peft1"](x), labels)),
        (mixed, "ours"): step("ours_k", lambda: mixed_loss(m["ours_k"](x, route=route), labels)),
        (mixed, "peft"): peft_sequential,
    }
    times = interleaved(cases, repeats, warmup=2)
    rows: dict = {}
    for (case, side), t in times.items():
        rows.setdefault(case, {})[side] = t
        rows[case][f"{side}_peak"] = peak_bytes(cases[(case, side)])
    one = rows["one adapter"]["ours"]
    full = rows["full fine-tune"]["ours"]
    for row in rows.values():
        row["ours_x_one"] = row["ours"] / one
        row["ours_x_full"] = row["ours"] / full
        if isinstance(row.get("peft"), float):
            row["ours_over_peft"] = row["ours"] / row["peft"]
    # what is left of each side's step once the floor is taken off: the cost of the LoRA part itself
    floor_t = rows[FLOOR]["ours"]
    rows["one adapter"]["lora_part_ours_over_peft"] = (one - floor_t) / (rows["one adapter"]["peft"] - floor_t)
    rows["one adapter"]["floor_over_peft"] = floor_t / rows["one adapter"]["peft"]
    # the mixed row's PEFT side runs a quarter of the batch at a time: its peak is not comparable
    rows["one adapter"]["peak_ours_over_peft"] = rows["one adapter"]["ours_peak"] / rows["one adapter"]["peft_peak"]
    trainable = {key: sum(p.numel() for p in model.parameters() if p.requires_grad) for key, model in m.items()}
    return {"rows": rows, "checks": checks, "trainable": trainable, "k": k}


FLOOR = "no LoRA (floor)"
TRAIN_SPECS = {
    "resnet18": {"targets": RESNET_TARGETS[:-1], "heads": ["fc"], "peft_targets": RESNET_PEFT[:-1],
                 # the default config owns every BatchNorm: PEFT's counterpart keeps a copy of each
                 "peft_save": ["fc", "bn1", "bn2", "downsample.1"], "peft_exact": True, "floor_input_grad": False},
    "vit": {"targets": VIT_TARGETS, "heads": ["heads.head"], "peft_targets": VIT_PEFT, "peft_save": ["heads.head"],
            "peft_exact": False, "floor_input_grad": True},
}  # fmt: skip
# ViT: PEFT ≤ 0.21 adds the out_proj delta of nn.MultiheadAttention twice (see README), so its gradients are not
# compared with ours, and its tensors are drawn apart (PEFT nests out_proj's factors under its MHA wrapper)


NOTES = [
    "How it runs: a single adapter or a stack computes `[W; A₁; …] ⋆ x` in one conv/linear call and applies "
    "each B with one fused, scaled multiply-add (`baddbmm`/`addmm`; in training a product and an add, whose "
    "gradient needs no copy of B per sample); a mixed batch is sorted by adapter once, "
    "the base op runs on the whole batch and each adapter's A on its own contiguous rows. PEFT's "
    "`adapter_names` path refuses `nn.MultiheadAttention` (the TypeError in the ViT table). In training each "
    "adapted linear map and ungrouped conv runs `FusedLoRA`: the forward folds W' = W + c·B·A and runs one op with "
    "[W'; A]; the backward takes the input gradient through W' and only A's and B's own gradients, never the "
    "frozen W's; layers whose output has fewer positions than channels (resnet18's last stage at 32 px) run A "
    "apart.",
    "",
    "Where a training target is missed: a resnet18 on 32-pixel images spends its step in the bare convs' forward "
    "and input gradient, the same work on both sides (the floor row); what LoRA adds (A's and B's gradients, the "
    "small A conv) is what is left to win, and the A convs with 8 output channels run far below the base convs' "
    "efficiency on this CPU: on the third stage (2×2 positions) an A conv's forward and gradients cost about what "
    "the 256-channel base conv does, and four 16-row groups of a mixed batch cost about twice one 64-row call. "
    "The mixed batch also steps 4 adapters' optimizer states and runs each adapter's BatchNorm copies on its own "
    "rows.",
    "",
    "Where a target is missed: the resnet18 mixed batch with K=8 stays above 1.25× bare because the A convs "
    "(8 output channels) run far below the base convs' efficiency on this CPU: about 12% of the FLOPs of "
    "layer1's convs but about 25% of their time. Tried: one fused `[W; A_k]` conv per adapter's rows on the "
    "large early feature maps (no gain end to end), one grouped conv over all segments (gains only in the "
    "last stage, loses on the stem), all A's on all rows (doubles layer1). The same A-conv cost keeps the "
    "ratio to PEFT's mixed batch near 1.25× rather than 1.3×.",
    "",
    "The dense combine methods are exact per layer on the dense ΔW (float32 with every choice a float64 "
    "computation makes: the same top-k entries, seeded DARE draws and elected signs; the rank-8 truncation from "
    "each layer's float64 Gram matrix), where PEFT's A/B-wise versions are fast and far off. TIES and magnitude "
    "prune take about 1 s (the exact top-k of 8 × 2.4 M entries in the largest layers, the sign election and the "
    "truncation). DARE-TIES misses 1 s by its float64 draws: 89 M of them from one sequential stream, about 0.6 s "
    "and 0.2 s more to compare them, kept so that a recorded seed gives the masks it always gave. Drawing the next "
    "layer's masks on a second thread while this layer combines gave 1.6 s against 1.3 s inline in one run on "
    "these 2 cores (the thread competes with the two that the combine's own ops use), and 1.1 s with the combine "
    "held to one thread.",
]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "## Composition (benchmarks/compose_bench.py)",
        "",
        f"{env['machine']}; torch {env['torch']}, torchvision {env['torchvision']}, peft {env['peft']}; "
        f"{env['threads']} threads; median of {env['repeats']} interleaved rounds; inference mode. Every number is "
        "CPU: no GPU was available for these runs.",
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
    for method in [m for m in ("svd", "ties", "dare_ties", "magnitude_prune") if m in c]:
        row = c[method]
        target, met = results["targets"]["combine"].get(method, ("", None))
        perr = f"{row['peft_rel_error']:.3g}" if row["peft_rel_error"] is not None else "—"
        lines.append(
            f"| {method} | {fmt(row['ours_s'])} | {row['ours_rel_error']:.3g} | {fmt(row['peft_s'])} | {perr} | "
            f"{ratio(row.get('speedup'))} | {target} | {'' if met is None else ('yes' if met else '**no**')} |"
        )
    lines += ["", "Errors are relative Frobenius norms over all layers (the rank-8 truncation's): svd against the "
              "exact Σ wᵢ·ΔWᵢ; ties, dare_ties and magnitude_prune against the method applied to the dense float64 "
              "ΔWᵢ (density 0.2; dare_ties with combine's seeded masks), which is what PEFT's A/B-wise versions "
              "approximate (PEFT draws DARE's masks from the global generator: no error to compare)."]  # fmt: skip
    if "training" in results:
        lines += training_markdown(results)
    lines += ["", *NOTES]
    lines += ["", "![forward time against K](results/compose_mixed.png)", ""]
    return "\n".join(lines)


def mib(v) -> str:
    return f"{v / 2**20:.0f} MiB" if isinstance(v, int) else "—"


def training_markdown(results: dict) -> list[str]:
    t = results["training"]
    title = "### Training: one optimizer step (forward, cross-entropy, backward, fused AdamW)"
    lines = ["", f"{title}, batch {t['batch']}", "",
             "Train mode; median of {} interleaved rounds, then the peak memory of one more step of each (what "
             "PyTorch allocates above the model and optimizer state, from the profiler's allocation events). "
             "resnet18: LoRA r=8 on every conv, the fc as head and, as the default config does, a copy of every "
             "BatchNorm per adapter (PEFT: the same convs, `modules_to_save` = the fc and every BatchNorm). ViT: "
             "r=8 on attention and MLP, the head trained whole. PEFT holds ours' very tensors (B drawn non-zero). "
             "The mixed batch routes {} adapters per sample, each with its own head and loss; PEFT refuses "
             "`adapter_names` in training, so its side of that row is {} sequential steps, one per adapter on its "
             "own rows.".format(t["repeats"], t["resnet18"]["k"], t["resnet18"]["k"]), ""]  # fmt: skip
    titles = {"resnet18": "torchvision resnet18", "vit": "torchvision VisionTransformer (6 layers, width 192)"}
    for key, title in titles.items():
        table = t[key]
        n = table["trainable"]
        lines += [f"**{title}** — trainable parameters: one adapter {n['ours1']:,}, full fine-tune {n['full']:,}", "",
                  "| case | ours | ours peak | PEFT | PEFT peak | ours ÷ PEFT | peak ours ÷ PEFT | ours ÷ one adapter "
                  "| ours ÷ full fine-tune | target | met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for case, row in table["rows"].items():
            target, met = results["targets"].get(f"training {key}", {}).get(case, ("", None))
            ours = fmt(row["ours"]) + (" (plain PyTorch)" if case == "full fine-tune" else "")
            lines.append(
                f"| {case} | {ours} | {mib(row['ours_peak'])} | {fmt(row.get('peft', '—'))} | "
                f"{mib(row.get('peft_peak'))} | {ratio(row.get('ours_over_peft'))} | "
                f"{ratio(row.get('peak_ours_over_peft'))} | {ratio(row['ours_x_one'])} | {ratio(row['ours_x_full'])} | "
                f"{target} | {'' if met is None else ('yes' if met else '**no**')} |"
            )
        one = table["rows"]["one adapter"]
        if "lora_part_ours_over_peft" in one:
            lines += ["", f"The floor row trains only the head and the norms (no factors): every LoRA step costs at "
                      f"least that much. It is {one['floor_over_peft']:.0%} of PEFT's step; what each side spends "
                      f"above it, the LoRA part itself, costs ours {one['lora_part_ours_over_peft']:.2f}× PEFT's."]
        c = table["checks"]
        if "ours_vs_peft_float64" in c:
            vs_peft = (f"ours vs PEFT in float64 {c['ours_vs_peft_float64']:.1e}; float32 against float64: ours "
                       f"{c['ours_float32_error']:.1e}, PEFT {c['peft_float32_error']:.1e}; ")
        else:
            vs_peft = (f"ours vs PEFT not compared (PEFT's MHA adds out_proj's delta twice); ours in float32 against "
                       f"float64 {c['ours_float32_error']:.1e}; ")  # fmt: skip
        lines += ["", f"Checked before timing (eval mode; gradients of every trained tensor, the largest difference "
                  f"relative to the tensor's largest entry): {vs_peft}mixed batch vs each adapter alone on its rows "
                  f"{c['mixed_grads_vs_alone']:.1e}.", ""]  # fmt: skip
    return lines


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
    for method in ("ties", "dare_ties", "magnitude_prune"):
        if method in results["combine"]:
            targets["combine"][method] = ("≤ 1 s, exact", results["combine"][method]["ours_s"] <= 1.0)
    for key in ("resnet18", "vit"):
        rows = results.get("training", {}).get(key, {}).get("rows")
        if not rows:
            continue
        one = rows["one adapter"]
        mixed = next(row for case, row in rows.items() if case.startswith("mixed"))
        mixed_case = next(case for case in rows if case.startswith("mixed"))
        targets[f"training {key}"] = {
            "one adapter": ("≤ 0.9× PEFT, peak ≤ PEFT's",
                            one["ours_over_peft"] <= 0.9 and one["peak_ours_over_peft"] <= 1.0),
            mixed_case: ("≤ 1.2× one adapter", mixed["ours_x_one"] <= 1.2),
        }  # fmt: skip
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


PARTS = ("inference", "combine", "training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="measure only this part (repeatable); the others are kept from results/compose.json")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from results/compose.json")
    args = parser.parse_args()  # fmt: skip
    if args.rewrite:
        rewrite_from_json()
        return
    parts = args.only or list(PARTS)
    torch.set_num_threads(args.threads)
    import peft

    repeats = 3 if args.quick else 11
    batch = 16 if args.quick else 64
    ks = [2, 4, 8] if args.quick else [2, 4, 8, 16]
    g = torch.Generator().manual_seed(0)
    stored = RESULTS / "compose.json"
    results: dict = json.loads(stored.read_text()) if args.only and stored.exists() else {}
    results["environment"] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "peft": peft.__version__,
        "threads": args.threads,
        "repeats": repeats,
    }  # fmt: skip
    x = torch.randn(batch, 3, 64, 64, generator=g)
    xv = torch.randn(batch, 3, 32, 32, generator=g)
    if "inference" in parts:
        results["resnet18"] = {
            "batch": f"{batch}×3×64×64",
            "rows": forward_table(resnet(), x, RESNET_TARGETS, RESNET_PEFT, ks, repeats, 8),
        }
        results["vit"] = {
            "batch": f"{batch}×3×32×32",
            "rows": forward_table(vit(), xv, VIT_TARGETS, VIT_PEFT, ks, repeats, 8),
        }
    if "combine" in parts:
        results["combine"] = {"k": 8, "rank": 8, **combine_table(resnet(), 8, 8, 8, 1 if args.quick else 3)}
    if "training" in parts:
        labels = torch.randint(0, 10, (batch,), generator=g)
        xt = torch.randn(batch, 3, 32, 32, generator=g)
        train_repeats = 3 if args.quick else 9
        results["training"] = {
            "batch": f"{batch}×3×32×32",
            "repeats": train_repeats,
            "resnet18": training_table(resnet(), TRAIN_SPECS["resnet18"], xt, labels, 4, train_repeats),
            "vit": training_table(vit(), TRAIN_SPECS["vit"], xt, labels, 4, train_repeats),
        }
    results["targets"] = judge(results)
    RESULTS.mkdir(exist_ok=True)
    stored.write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    print(text)
    write_section("compose", text)
    if "inference" in parts:
        plot(results)


if __name__ == "__main__":
    main()
