"""Registry benchmark: query latency at 10,000 versions, load overhead, register throughput.

    python benchmarks/registry_bench.py [--pg postgresql+psycopg://…] [--adapters 1000] [--per-adapter 10]

Targets (at the API level): `ls`, `versions`, `lineage` and a metric comparison each ≤ 50 ms with 10,000
versions over 1,000 adapters; resolve + verify + attach ≤ 1.5× a raw safetensors load and attach of the
same file. Writes benchmarks/results/registry.json and the registry section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision
from sqlalchemy import insert

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub
from adapter_hub.registry.models import AdapterRow, AliasRow, EdgeRow, MetricRow, TaskRow, VersionRow

HERE = Path(__file__).resolve().parent
QUERY_TARGET_MS = 50.0
LOAD_TARGET = 1.5
METRICS = ("val/accuracy", "test/accuracy", "train/loss")


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time in ms, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def populate(hub: Hub, model: AdapterModel, adapters: int, per_adapter: int, tasks: int = 10) -> list[str]:
    """adapters × per_adapter versions in bulk: a fine-tuning chain per adapter, adapters of a task chained by
    transfer in families of 10, three metrics per version, a `production` alias per adapter. Every row points
    at one real blob (the query benchmarks never read artifacts)."""
    v = hub.register(model, "lora", task="task-0", name="seed")
    seed_row = hub.resolve(v.ref)
    rng = random.Random(0)
    now = datetime.now(timezone.utc)
    with hub._session(write=True) as s:
        task_ids = {t.name: t.id for t in s.query(TaskRow)}
        for t in range(tasks):
            if f"task-{t}" not in task_ids:
                row = TaskRow(name=f"task-{t}", metric="val/accuracy", direction="max")
                s.add(row)
                s.flush()
                task_ids[row.name] = row.id
        backbone_id = s.query(VersionRow).one().backbone_id
        adapter_rows = [
            {"task_id": task_ids[f"task-{a % tasks}"], "name": f"adapter-{a:04d}", "created_at": now}
            for a in range(adapters)
        ]
        s.execute(insert(AdapterRow), adapter_rows)
        ids = {name: i for i, name in s.query(AdapterRow.id, AdapterRow.name)}
        versions = []
        for a in range(adapters):
            for n in range(1, per_adapter + 1):
                versions.append(
                    {
                        "adapter_id": ids[f"adapter-{a:04d}"],
                        "number": n,
                        "backbone_id": backbone_id,
                        "digest": seed_row.digest,
                        "size": seed_row.size,
                        "config": seed_row.config,
                        "trainable_params": seed_row.trainable_params,
                        "status": "ready",
                        "created_at": now + timedelta(seconds=a * per_adapter + n),
                    }
                )
        s.execute(insert(VersionRow), versions)
        vid = {(aid, n): i for i, aid, n in s.query(VersionRow.id, VersionRow.adapter_id, VersionRow.number)}
        edges, metrics, aliases = [], [], []
        for a in range(adapters):
            aid = ids[f"adapter-{a:04d}"]
            for n in range(2, per_adapter + 1):
                edges.append({"child_id": vid[aid, n], "parent_id": vid[aid, n - 1], "relation": "finetuned_from"})
            if a % 10:  # transferred from the previous adapter of the family's middle version
                prev = ids[f"adapter-{a - 1:04d}"]
                edges.append(
                    {"child_id": vid[aid, 1], "parent_id": vid[prev, per_adapter // 2], "relation": "transferred_from"}
                )
            for n in range(1, per_adapter + 1):
                for m in METRICS:
                    metrics.append(
                        {
                            "version_id": vid[aid, n],
                            "name": m,
                            "value": rng.random(),
                            "split": m.split("/")[0],
                            "logged_at": now,
                        }  # fmt: skip
                    )
            aliases.append({"adapter_id": aid, "name": "production", "version_id": vid[aid, per_adapter]})
        s.execute(insert(EdgeRow), edges)
        s.execute(insert(MetricRow), metrics)
        s.execute(insert(AliasRow), aliases)
    with hub.engine.connect() as conn:  # fresh statistics, as autovacuum/`ANALYZE` would give
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    refs = [f"task-{a % tasks}/adapter-{a:04d}" for a in range(adapters)]
    return refs


def query_bench(hub: Hub, refs: list[str], per_adapter: int, repeat: int) -> dict[str, float]:
    mid = refs[len(refs) // 2 + 5]
    compare = [f"{r}:{per_adapter}" for r in refs[:10]]
    return {
        "ls (all adapters)": timed(lambda: hub.ls(), repeat),
        "ls TASK": timed(lambda: hub.ls("task-3"), repeat),
        "versions TASK/ADAPTER": timed(lambda: hub.versions(mid), repeat),
        "lineage (family of 10 adapters)": timed(lambda: hub.lineage(f"{mid}:1"), repeat),
        "metric comparison of 10 versions": timed(lambda: hub.compare_metrics(compare), repeat),
        "resolve @alias": timed(lambda: hub.resolve(f"{mid}@production"), repeat),
    }


def load_bench(hub: Hub, model: AdapterModel, repeat: int) -> dict[str, float]:
    """hub.load_into (resolve + read + sha256 + attach) vs model.load_adapter of the same file."""
    version = hub.register(model, "lora", task="task-0", name="load-bench")
    path = hub.store.path(version.digest)

    def raw() -> None:
        model.load_adapter("x", path)
        model.delete_adapter("x")

    def via_hub() -> None:
        hub.load_into(model, version.ref, name="x")
        model.delete_adapter("x")

    raw_ms, hub_ms = timed(raw, repeat), timed(via_hub, repeat)
    return {"artifact bytes": version.size, "raw load+attach ms": raw_ms, "hub load_into ms": hub_ms,
            "ratio": hub_ms / raw_ms}  # fmt: skip


def register_bench(hub: Hub, model: AdapterModel, count: int) -> dict[str, float]:
    params = list(model.adapters["lora"].parameters())
    t0 = time.perf_counter()
    for i in range(count):
        with torch.no_grad():
            params[0].view(-1)[0] = float(i)
        hub.register(model, "lora", task="task-0", name="throughput")
    seconds = time.perf_counter() - t0
    return {"versions": count, "seconds": seconds, "versions/s": count / seconds}


def run(url: str | None, home: Path, args: argparse.Namespace, model: AdapterModel) -> dict[str, Any]:
    with Hub.open(home, url) as hub:
        hub.add_backbone("resnet18", model)
        hub.add_task("task-0", metric="val/accuracy")
        t0 = time.perf_counter()
        refs = populate(hub, model, args.adapters, args.per_adapter)
        fill_s = time.perf_counter() - t0
        out: dict[str, Any] = {"database": hub.engine.dialect.name, "populate s": fill_s}
        out["queries ms"] = query_bench(hub, refs, args.per_adapter, args.repeat)
        out["load"] = load_bench(hub, model, args.repeat)
        out["register"] = register_bench(hub, model, args.register)
        return out


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "<!-- registry:start -->",
        "## Registry (benchmarks/registry_bench.py)",
        "",
        f"{platform.machine()} ({os.cpu_count()} cpus); torch {torch.__version__}; "
        f"{args.adapters * args.per_adapter:,} versions over {args.adapters:,} adapters, "
        f"{len(METRICS)} metrics each; median of {args.repeat} runs.",
        "",
        "| query (API) | " + " | ".join(r["database"] for r in results) + " | target | met |",
        "|---|" + "---|" * len(results) + "---|---|",
    ]
    for name in results[0]["queries ms"]:
        values = [r["queries ms"][name] for r in results]
        met = "yes" if max(values) <= QUERY_TARGET_MS else "**no**"
        cells = " | ".join(f"{v:.1f} ms" for v in values)
        lines.append(f"| {name} | {cells} | ≤ {QUERY_TARGET_MS:.0f} ms | {met} |")
    lines += ["", "| load one resnet18 adapter (r=8, all convs + fc) | "
              + " | ".join(r["database"] for r in results) + " |", "|---|" + "---|" * len(results)]  # fmt: skip
    for key, fmt in (("raw load+attach ms", "{:.1f} ms"), ("hub load_into ms", "{:.1f} ms"), ("ratio", "{:.2f}×")):
        lines.append(f"| {key} | " + " | ".join(fmt.format(r["load"][key]) for r in results) + " |")
    ratio = max(r["load"]["ratio"] for r in results)
    lines.append(f"| target ≤ {LOAD_TARGET}× | " + ("yes" if ratio <= LOAD_TARGET else "**no**") + " |" * len(results))
    lines += ["", "| register (blob write + fsync + commit) | " + " | ".join(r["database"] for r in results) + " |",
              "|---|" + "---|" * len(results)]  # fmt: skip
    lines.append("| versions/s | " + " | ".join(f"{r['register']['versions/s']:.1f}" for r in results) + " |")
    lines.append(
        f"| artifact size | {results[0]['load']['artifact bytes'] / 1024:.0f} KiB |" + " |" * (len(results) - 1)
    )
    lines.append("<!-- registry:end -->")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = HERE / "RESULTS.md"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = "<!-- registry:start -->", "<!-- registry:end -->"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = before + text + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default=os.environ.get("ADAPTER_HUB_TEST_PG"), help="Also run on this PostgreSQL.")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--per-adapter", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--register", type=int, default=100, help="Versions registered for the throughput.")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md alone.")
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = AdapterModel(resnet18())
    model.add_adapter("lora", LoRAConfig(r=8, alpha=16, targets=["conv1", "layer*.*.conv*", "fc"]))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(run(None, Path(tmp) / "sqlite", args, model))
        if args.pg:
            from sqlalchemy import create_engine, text

            schema = f"bench_{os.getpid()}"
            admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            try:
                sep = "&" if "?" in args.pg else "?"
                results.append(run(f"{args.pg}{sep}options=-csearch_path%3D{schema}", Path(tmp) / "pg", args, model))
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    text_ = report(results, args)
    print(text_)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "registry.json").write_text(json.dumps(results, indent=2) + "\n")
        write_section(text_)


if __name__ == "__main__":
    main()
