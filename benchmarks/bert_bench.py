"""A MiniLM-shaped BERT with LoRA on query and value: inference and training, side by side with PEFT in one run.

    python benchmarks/bert_bench.py            # full run (about a minute on 2 idle cores, 3 on busy ones)
    python benchmarks/bert_bench.py --quick    # fewer rounds, a smaller batch; prints only, writes nothing
    python benchmarks/bert_bench.py --rewrite  # only rewrite RESULTS.md from results/bert.json

The backbone is ``transformers.BertModel`` built from a config (384 wide, 6 layers, 12 heads, random init,
eval mode); every adapter is LoRA r=8, α=16 on each layer's attention query and value, with B drawn
non-zero so that the deltas change the output. PEFT gets the very same A and B tensors (copied key by key).
Before anything is timed the script checks that the numbers mean the same thing on both sides: ours and
PEFT give the same outputs and the same gradients, merged equals unmerged, and a mixed batch equals each
sample run alone with its adapter. If a check fails it prints why and no timing at all.

Prints a table; a full run also writes benchmarks/results/bert.json and the BERT section of
benchmarks/RESULTS.md. The share of the cores that other processes used while it timed is printed with the
table: on a shared machine that is what makes a ratio trustworthy or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from peft_copy import copy_into_peft, peft_name
from results_md import fmt, ratio, write_section
from timing import interleaved
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, Switch

HERE = Path(__file__).parent
RESULTS = HERE / "results"

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
          "vocab_size": 30522}  # fmt: skip
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": 100, "max_position_embeddings": 32}  # fmt: skip
TARGETS = ["*.attention.self.query", "*.attention.self.value"]
PEFT_TARGETS = ["query", "value"]
HEAD = "classifier"
R, ALPHA, CLASSES = 8, 16, 4
# float32 agreement, relative to the largest entry of the reference: the same sums taken in another order
# differ by ~1e-6 of it; a wrong delta, scaling or route moves whole rows by percents
RTOL, TINY_ABS = 1e-4, 1e-12


class Disagreement(AssertionError):
    """Two computations that must agree do not: the timings would compare different things."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def inputs(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        rows = rows if rows is not None else slice(None)
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batch(n: int, tokens: int, vocab: int, seed: int = 0) -> Batch:
    """Random ids; each sample keeps between half and all of its tokens (the rest is padding, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, tokens), generator=g)
    lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=g)
    lengths[0] = tokens  # at least one sample without padding
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    return Batch(ids, mask, torch.randint(0, CLASSES, (n,), generator=g))


class MeanPoolClassifier(nn.Module):
    """BERT, the mean of the unpadded tokens' last hidden states, a linear classifier."""

    def __init__(self, bert: nn.Module, classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


def bert(config: dict) -> transformers.BertModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertModel(transformers.BertConfig(**config)).eval()


def classifier(config: dict) -> MeanPoolClassifier:
    model = MeanPoolClassifier(bert(config), CLASSES)
    torch.manual_seed(1)
    model.classifier.reset_parameters()
    return model.eval()


def randomize(adapter: nn.Module, seed: int) -> None:
    """Every tensor of the adapter drawn from ``seed`` (so two models built alike carry the same adapter):
    A ~ N(0, 1/in), B ~ N(0, 0.05²) — non-zero, unlike its initial zero, so the deltas change the output —
    and each head redrawn ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.startswith("heads."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def ours_model(backbone: nn.Module, k: int, heads: bool = False) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(backbone))
    config = LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS, heads=[HEAD] if heads else [])
    for i in range(k):
        randomize(model.add_adapter(f"t{i}", config), seed=100 + i)
    return model.eval()


def peft_model(backbone: nn.Module, ours: AdapterModel, names: Sequence[str], heads: bool = False):
    """PEFT's LoRA (``target_modules=["query", "value"]``) carrying exactly our adapters' tensors."""
    import peft

    def config() -> peft.LoraConfig:
        return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PEFT_TARGETS,
                               modules_to_save=[HEAD] if heads else None)  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(backbone), config(), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config())
    for name in names:
        copy_into_peft(model, name, ours.export_record(name).tensors, Disagreement)
    model.set_adapter(names[0])
    return model.eval()


# --- checks --------------------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def expect_close(what: str, got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise Disagreement(f"{what}: shapes {tuple(got.shape)} and {tuple(want.shape)}")
    diff = max_diff(got, want)
    bound = RTOL * float(want.abs().max()) + TINY_ABS
    if not diff <= bound:
        raise Disagreement(f"{what}: outputs differ by {diff:.3g} (allowed {bound:.3g})")
    return diff


def expect_effect(what: str, adapted: torch.Tensor, bare: torch.Tensor, at_least: float = 1e-2) -> float:
    """The adapter must change the output materially, or agreement would prove nothing."""
    rel = float((adapted - bare).norm() / bare.norm())
    if not rel >= at_least:
        raise Disagreement(f"{what}: the adapter changes the output by only {rel:.2g} (relative)")
    return rel


def hidden(out) -> torch.Tensor:
    return out.last_hidden_state


def check_inference(bare: nn.Module, ours1: AdapterModel, merged: AdapterModel, peft1, peft_merged,
                    ours_k: AdapterModel, peft_k, batch: Batch, route: list[str]) -> dict:  # fmt: skip
    """Ours vs PEFT (one adapter, unmerged and merged), merged vs unmerged, and the mixed batch against
    each sample run alone with its adapter (and against PEFT's adapter_names). Raises Disagreement."""
    checks: dict = {}
    with torch.inference_mode():
        x = batch.inputs()
        ref = hidden(ours1(**x))
        checks["effect_of_one_adapter"] = expect_effect("one adapter", ref, hidden(bare(**x)))
        checks["ours_vs_peft"] = expect_close("one adapter, ours vs PEFT", hidden(peft1(**x)), ref)
        checks["merged_vs_unmerged"] = expect_close("one adapter, ours merged vs unmerged", hidden(merged(**x)), ref)
        checks["peft_merged_vs_ours"] = expect_close("one adapter, PEFT merged vs ours", hidden(peft_merged(**x)), ref)
        mixed = ours_k(**x, route=route)
        switch = ours_k.active
        alone = []
        try:
            for i, name in enumerate(route):
                ours_k.activate(name)
                alone.append(ours_k(**batch.inputs(slice(i, i + 1))))
        finally:
            ours_k.activate(switch)
        checks["mixed_vs_each_sample_alone"] = expect_close(
            "mixed batch vs each sample alone", hidden(mixed), torch.cat([hidden(o) for o in alone])
        )
        # the pooler output is a second per-sample tensor of the output, put back in input order too
        checks["mixed_pooler_vs_alone"] = expect_close(
            "mixed batch pooler vs each sample alone", mixed.pooler_output, torch.cat([o.pooler_output for o in alone])
        )
        # the adapters differ from each other, so a route ignored (every row through one adapter) would show
        ours_k.activate(route[0])
        try:
            checks["effect_of_routing"] = expect_effect(
                f"mixed batch vs every row through {route[0]}", hidden(mixed), hidden(ours_k(**x))
            )
        finally:
            ours_k.activate(switch)
        try:
            theirs = hidden(peft_k(**x, adapter_names=route))
        except Exception as exc:  # PEFT may refuse a mixed batch; the timing table says so too
            checks["mixed_ours_vs_peft"] = f"PEFT fails: {type(exc).__name__}"
        else:
            checks["mixed_ours_vs_peft"] = expect_close("mixed batch, ours vs PEFT", theirs, hidden(mixed))
    return checks


def mixed_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Each adapter's cross-entropy on its own rows, summed, over the whole batch (the mean over samples)."""
    total = sum(F.cross_entropy(out.by_adapter[n], labels[out.rows[n]], reduction="sum") for n in out.by_adapter)
    return total / len(labels)


def grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [n for n, p in params.items() if p.grad is None]
    if missing:
        raise Disagreement(f"no gradient reached {missing[0]}")
    return {n: p.grad.detach().clone() for n, p in params.items()}


def ours_params(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s trainable tensors under their file keys."""
    adapter = model.adapters[name]
    out = {}
    for path, module in [*adapter.layer_items(), *adapter.head_items()]:
        for pname, p in module.named_parameters():
            out[f"{path}.{pname}"] = p
    return out


def check_training(ours1: AdapterModel, peft1, ours_k: AdapterModel, batch: Batch, route: list[str]) -> dict:
    """Gradients of one step: ours vs PEFT for one adapter (LoRA factors and head); the mixed batch's gradient
    of each adapter vs that adapter run alone on its own rows. Dropout off (eval mode), so both sides see the
    same function. Raises Disagreement."""
    checks: dict = {}
    x = batch.inputs()
    for m in (ours1, peft1, ours_k):
        m.eval()
        m.zero_grad(set_to_none=True)
    ours_loss = F.cross_entropy(ours1(**x), batch.labels)
    ours_loss.backward()
    peft_loss = F.cross_entropy(peft1(**x), batch.labels)
    peft_loss.backward()
    checks["loss_ours_vs_peft"] = expect_close("training loss, ours vs PEFT", peft_loss.detach(), ours_loss.detach())
    ours_g = grads(ours_params(ours1, "t0"))
    peft_p = dict(peft1.named_parameters())
    peft_g = grads({k: peft_p[peft_name(k, "t0")] for k in ours_g})
    # A's gradient is s·Bᵀ·(∂L/∂y)·xᵀ: zero in some layer would mean that layer's B is zero
    checks["min_grad_of_a"] = min(float(g.abs().max()) for k, g in ours_g.items() if "lora_A" in k)
    if not checks["min_grad_of_a"] > 0:
        raise Disagreement("a LoRA A got an all-zero gradient: B is zero, the check would prove nothing")
    checks["grads_ours_vs_peft"] = max(expect_close(f"gradient of {k}, ours vs PEFT", peft_g[k], g)
                                       for k, g in ours_g.items())  # fmt: skip
    loss = mixed_loss(ours_k(**x, route=route), batch.labels)
    loss.backward()
    names = sorted(set(route))
    mixed_g = {n: grads(ours_params(ours_k, n)) for n in names}
    switch = ours_k.active
    worst = 0.0
    try:
        for n in names:
            ours_k.zero_grad(set_to_none=True)
            ours_k.activate(n)
            rows = torch.tensor([i for i, r in enumerate(route) if r == n])
            alone = F.cross_entropy(ours_k(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]),
                                    batch.labels[rows], reduction="sum") / len(batch)  # fmt: skip
            alone.backward()
            for k, g in grads(ours_params(ours_k, n)).items():
                worst = max(worst, expect_close(f"mixed-batch gradient of {n}/{k} vs {n} alone", mixed_g[n][k], g))
    finally:
        ours_k.activate(switch)
        ours_k.zero_grad(set_to_none=True)
    checks["mixed_grads_vs_alone"] = worst
    for m in (ours1, peft1):
        m.zero_grad(set_to_none=True)
    return checks


# --- models for one run --------------------------------------------------------------------------
def inference_models(config: dict, k: int) -> dict:
    """Built outside inference mode, as a user would load them."""
    bb = bert(config)
    names = [f"t{i}" for i in range(k)]
    ours1, merged = ours_model(bb, 1), ours_model(bb, 1)
    ours1.activate("t0")
    merged.activate("t0")
    merged.merge("t0")
    peft1, peft_merged = peft_model(bb, ours1, ["t0"]), peft_model(bb, ours1, ["t0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged.merge_adapter()
    ours_k = ours_model(bb, k)
    ours_k.activate(Switch(*names))
    return {"bare": copy.deepcopy(bb), "ours1": ours1, "merged": merged, "peft1": peft1, "peft_merged": peft_merged,
            "ours_k": ours_k, "peft_k": peft_model(bb, ours_k, names)}  # fmt: skip


def training_models(config: dict, k: int) -> dict:
    bb = classifier(config)
    names = [f"t{i}" for i in range(k)]
    ours1 = ours_model(bb, 1, heads=True)
    ours1.activate("t0")
    ours_k = ours_model(bb, k, heads=True)
    ours_k.activate(Switch(*names))
    return {"ours1": ours1, "peft1": peft_model(bb, ours1, ["t0"], heads=True), "ours_k": ours_k,
            "peft_k": peft_model(bb, ours_k, names, heads=True)}  # fmt: skip


def run_checks(config: dict, n: int, tokens: int, k: int) -> dict:
    """Every agreement check on fresh models of this size (what the smoke test runs)."""
    batch = make_batch(n, tokens, config["vocab_size"])
    route = [f"t{i % k}" for i in range(n)]
    m = inference_models(config, k)
    t = training_models(config, k)
    return {
        "inference": check_inference(**m, batch=batch, route=route),
        "training": check_training(t["ours1"], t["peft1"], t["ours_k"], batch, route),
    }


# --- timing --------------------------------------------------------------------------------------
def machine_seconds() -> tuple[float, float, float] | None:
    """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process); None off Linux.
    Busy is everything but idle and iowait in /proc/stat, so the difference of the last two over a span
    is what other processes (and the host, as steal) took from the cores meanwhile."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def others_share(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """The share of all the machine's cores that other processes kept busy between two ``machine_seconds``."""
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (wall * (os.cpu_count() or 1)))


def forward_rows(m: dict, batch: Batch, route: list[str], repeats: int) -> dict:
    x = batch.inputs()
    key = f"mixed batch, K={len(set(route))}"
    cases = {
        ("bare", "ours"): lambda: m["bare"](**x),
        ("one adapter, unmerged", "ours"): lambda: m["ours1"](**x),
        ("one adapter, unmerged", "peft"): lambda: m["peft1"](**x),
        ("one adapter, merged", "ours"): lambda: m["merged"](**x),
        ("one adapter, merged", "peft"): lambda: m["peft_merged"](**x),
        (key, "ours"): lambda: m["ours_k"](**x, route=route),
    }
    failures = {}
    try:
        with torch.inference_mode():
            m["peft_k"](**batch.inputs(slice(0, 2)), adapter_names=route[:2])
        cases[(key, "peft")] = lambda: m["peft_k"](**x, adapter_names=route)
    except Exception as exc:
        failures[(key, "peft")] = f"fails: {type(exc).__name__}"
    with torch.inference_mode():
        times = interleaved(cases, repeats)
    rows: dict = {}
    for (case, side), t in {**times, **failures}.items():
        rows.setdefault(case, {})[side] = t
    rows["bare"]["peft"] = rows["bare"]["ours"]
    base = rows["bare"]["ours"]
    for row in rows.values():
        for side in ("ours", "peft"):
            if isinstance(row.get(side), float):
                row[f"{side}_x_bare"] = row[side] / base
        if isinstance(row.get("peft"), float):
            row["peft_over_ours"] = row["peft"] / row["ours"]
    return rows


def training_rows(t: dict, batch: Batch, route: list[str], repeats: int) -> dict:
    """One optimizer step each: forward, cross-entropy, backward, AdamW (train mode: BERT's dropout on)."""
    x, labels = batch.inputs(), batch.labels
    opts = {k: torch.optim.AdamW([p for p in t[k].parameters() if p.requires_grad], lr=1e-4)
            for k in ("ours1", "peft1", "ours_k")}  # fmt: skip

    def step(key: str, loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            opts[key].zero_grad(set_to_none=True)
            loss_of().backward()
            opts[key].step()

        return run

    key = f"mixed batch, K={len(set(route))}"
    cases = {
        ("one adapter", "ours"): step("ours1", lambda: F.cross_entropy(t["ours1"](**x), labels)),
        ("one adapter", "peft"): step("peft1", lambda: F.cross_entropy(t["peft1"](**x), labels)),
        (key, "ours"): step("ours_k", lambda: mixed_loss(t["ours_k"](**x, route=route), labels)),
    }
    failures = {}
    peft_k = t["peft_k"].train()
    try:
        logits = peft_k(**batch.inputs(slice(0, 2)), adapter_names=route[:2])
        F.cross_entropy(logits, labels[:2]).backward()
        opt = torch.optim.AdamW([p for p in peft_k.parameters() if p.requires_grad], lr=1e-4)
        cases[(key, "peft")] = step("peft_k", lambda: F.cross_entropy(peft_k(**x, adapter_names=route), labels))
        opts["peft_k"] = opt
    except Exception as exc:  # PEFT refuses adapter_names in training mode
        failures[(key, "peft")] = f"fails: {type(exc).__name__}"
    for k in ("ours1", "peft1", "ours_k"):
        t[k].train()
    times = interleaved(cases, repeats, warmup=1)
    rows: dict = {}
    for (case, side), v in {**times, **failures}.items():
        rows.setdefault(case, {})[side] = v
    one = rows["one adapter"]["ours"]
    for row in rows.values():
        if isinstance(row.get("ours"), float):
            row["ours_x_one"] = row["ours"] / one
        if isinstance(row.get("peft"), float):
            row["peft_over_ours"] = row["peft"] / row["ours"]
    return rows


# --- report --------------------------------------------------------------------------------------
def judge(results: dict) -> dict:
    rows = results["inference"]["rows"]
    key = f"mixed batch, K={results['k']}"

    def within(case: str, bound: float) -> bool:
        v = rows.get(case, {}).get("ours_x_bare")
        return isinstance(v, float) and v <= bound

    return {
        "one adapter, unmerged": ("≤ 1.15× bare", within("one adapter, unmerged", 1.15)),
        key: ("≤ 1.3× bare", within(key, 1.3)),
    }


def contention(env: dict) -> str:
    share = env.get("others_share")
    if share is None:
        return ""
    text = f" Other processes kept {share:.0%} of the machine's cores busy while this timed"
    if share > 0.05:
        return text + " — the times are inflated and noisy; rerun on a quiet machine before trusting a ratio."
    return text + "."


def markdown(results: dict) -> str:
    env, k = results["environment"], results["k"]
    inf, tr = results["inference"], results["training"]
    checks = results["checks"]
    lines = [
        "## BERT (benchmarks/bert_bench.py)",
        "",
        f"{env['machine']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
        f"{env['threads']} threads; median of {env['repeats']} interleaved rounds (training: "
        f"{env['train_repeats']}).{contention(env)}",
        "",
        f"A MiniLM-shaped `BertModel` built from a config ({results['model']}, random init), batch {inf['batch']} "
        f"tokens with padding; LoRA r={R}, α={ALPHA} on every `attention.self.query` and `attention.self.value` "
        '(PEFT: `target_modules=["query", "value"]`), B drawn non-zero, PEFT given the same tensors.',
        "",
        f"### Inference (`torch.inference_mode`, eval), batch {inf['batch']}",
        "",
        "| case | ours | ours ÷ bare | PEFT | PEFT ÷ bare | PEFT ÷ ours | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in inf["rows"].items():
        target, met = results["targets"].get(case, ("", None))
        lines.append(
            f"| {case} | {fmt(row['ours'])} | {ratio(row.get('ours_x_bare'))} | {fmt(row.get('peft', '—'))} | "
            f"{ratio(row.get('peft_x_bare'))} | {ratio(row.get('peft_over_ours'))} | {target} | "
            f"{'' if met is None else ('yes' if met else '**no**')} |"
        )
    lines += [
        "",
        f"### Training: one step (forward, cross-entropy, backward, AdamW), batch {tr['batch']}",
        "",
        f"Each adapter has its own {CLASSES}-class linear head on the mean of the unpadded tokens' hidden states "
        '(ours: `heads=["classifier"]`; PEFT: `modules_to_save=["classifier"]`); train mode, so BERT\'s '
        f"dropout runs. The mixed batch routes {k} adapters per sample and takes each adapter's loss on its "
        "own rows through its own head.",
        "",
        "| case | ours | ours ÷ one adapter | PEFT | PEFT ÷ ours |",
        "|---|---|---|---|---|",
    ]
    for case, row in tr["rows"].items():
        lines.append(
            f"| {case} | {fmt(row['ours'])} | {ratio(row.get('ours_x_one'))} | {fmt(row.get('peft', '—'))} | "
            f"{ratio(row.get('peft_over_ours'))} |"
        )
    ci, ct = checks["inference"], checks["training"]
    peft_mixed = ci["mixed_ours_vs_peft"]
    peft_mixed = f"{peft_mixed:.1e}" if isinstance(peft_mixed, float) else peft_mixed
    lines += [
        "",
        "Checked before timing (the script prints no number if any fails; largest absolute differences, "
        "float32): "
        f"ours vs PEFT, one adapter {ci['ours_vs_peft']:.1e}, merged vs unmerged {ci['merged_vs_unmerged']:.1e}, "
        f"PEFT merged vs ours {ci['peft_merged_vs_ours']:.1e}; mixed batch vs each sample alone "
        f"{ci['mixed_vs_each_sample_alone']:.1e} (pooler {ci['mixed_pooler_vs_alone']:.1e}), ours vs PEFT's "
        f"`adapter_names` {peft_mixed}; training gradients (LoRA factors and head) ours vs PEFT "
        f"{ct['grads_ours_vs_peft']:.1e}, mixed batch vs each adapter alone on its rows "
        f"{ct['mixed_grads_vs_alone']:.1e}. One adapter moves the hidden states by "
        f"{ci['effect_of_one_adapter']:.1%} (relative norm), and the routed batch differs from every row through "
        f"one adapter by {ci['effect_of_routing']:.1%}, so the deltas and the routing do real work.",
    ]
    if results.get("notes"):
        lines += ["", *results["notes"]]
    lines.append("")
    return "\n".join(lines)


NOTES = [
    "How it runs: in inference, on each adapted Linear one adapter computes `F.linear(x, [W; A], [b; 0])` in one call"
    " and adds s·B·(A·x) with one `addmm`; in training it runs `FusedLoRA`: one `F.linear` with [W + s·B·A; A], and a"
    " backward that takes the input gradient through W + s·B·A and only A's and B's own gradients (left to autograd, "
    "a stacked [W; A] would get the full (384+8)×384 weight gradient to keep A's 8 rows). A mixed batch is sorted by "
    "adapter once before BERT runs (ids and attention mask travel with their rows, the outputs come back in input "
    "order); in inference the base linear runs on the whole batch and each adapter's A and B on its own contiguous "
    "rows, in training each adapter's rows run through their own folded weight. PEFT runs lora_A, lora_B, the "
    "scaling and "
    "the sum as separate ops, and for `adapter_names` gathers each adapter's rows in every layer. PEFT refuses "
    "`adapter_names` in training mode (the ValueError: \"Cannot pass `adapter_names` when the model is in training "
    "mode\"), so the mixed training step has no PEFT counterpart; ours trains the 4 adapters in one step, each from "
    "its own rows, for about the cost of one adapter's step.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller batch; writes nothing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from results/bert.json")
    args = parser.parse_args()
    if args.rewrite:
        results = json.loads((RESULTS / "bert.json").read_text())
        results["notes"] = NOTES
        write_section("bert", markdown(results))
        return
    torch.set_num_threads(args.threads)
    import peft

    repeats, train_repeats = (3, 2) if args.quick else (11, 7)
    n, tokens, k = (16, 64, 4) if args.quick else (32, 64, 4)
    batch = make_batch(n, tokens, MINILM["vocab_size"])
    route = [f"t{i % k}" for i in range(n)]  # interleaved: every adapter's rows are scattered over the batch
    inf_models, train_models = inference_models(MINILM, k), training_models(MINILM, k)
    try:
        checks = {
            "inference": check_inference(**inf_models, batch=batch, route=route),
            "training": check_training(
                train_models["ours1"], train_models["peft1"], train_models["ours_k"], batch, route
            ),  # fmt: skip
        }
    except Disagreement as exc:
        sys.exit(f"bert_bench: refusing to time: {exc}")
    shape = f"{n}×{tokens}"
    results: dict = {
        "environment": {
            "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "threads": args.threads,
            "repeats": repeats,
            "train_repeats": train_repeats,
            "quick": args.quick,
            "load_before": os.getloadavg()[0],
        },
        "model": "hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522",
        "k": k,
        "checks": checks,
    }
    start = machine_seconds()
    results["inference"] = {"batch": shape, "rows": forward_rows(inf_models, batch, route, repeats)}
    results["training"] = {"batch": shape, "rows": training_rows(train_models, batch, route, train_repeats)}
    results["environment"]["others_share"] = others_share(start, machine_seconds())
    results["environment"]["load_after"] = os.getloadavg()[0]
    results["targets"] = judge(results)
    results["notes"] = NOTES
    text = markdown(results)
    print(text)
    if args.quick:  # a smoke run never replaces the recorded full run
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bert.json").write_text(json.dumps(results, indent=2, default=str))
    write_section("bert", text)


if __name__ == "__main__":
    main()
