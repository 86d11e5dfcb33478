"""Registry benchmark: query latency at 10,000 versions, load overhead, register throughput.

    python benchmarks/registry_bench.py [--pg postgresql+psycopg://…] [--adapters 1000] [--per-adapter 10]

Targets (at the API level): `ls`, `versions`, `lineage` and a metric comparison each ≤ 50 ms with 10,000
versions over 1,000 adapters; resolve + verify + attach ≤ 1.5× a raw safetensors load and attach of the
same file. Writes benchmarks/results/registry.json and the registry section of benchmarks/RESULTS.md.

The web view (`adapter-hub ui`): each page ≤ 200 ms of server time on the same registry, timed through Flask's
test client (the request handled and the page rendered; no network). `--ui-only` runs just that part (and
writes only its section of RESULTS.md and benchmarks/results/registry_ui.json).
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

import results_md
import torch
import torchvision
from sqlalchemy import insert

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub
from adapter_hub.registry.models import AdapterRow, AliasRow, EdgeRow, MetricRow, TaskRow, VersionRow

HERE = Path(__file__).resolve().parent
QUERY_TARGET_MS = 50.0
PAGE_TARGET_MS = 200.0
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


LONG_ADAPTER = 1000  # versions of the one adapter whose page the web view's benchmark times besides


def long_adapter(hub: Hub, ref: str, versions: int) -> str:
    """An adapter of REF's task with VERSIONS versions (REF's blob each, the benchmark's metrics), in bulk."""
    task = ref.split("/")[0]
    seed = hub.resolve(f"{ref}:1")
    rng = random.Random(1)
    now = datetime.now(timezone.utc)
    with hub._session(write=True) as s:
        task_id = s.query(TaskRow.id).filter(TaskRow.name == task).scalar()
        s.execute(insert(AdapterRow), [{"task_id": task_id, "name": "long", "created_at": now}])
        adapter_id = s.query(AdapterRow.id).filter(AdapterRow.task_id == task_id, AdapterRow.name == "long").scalar()
        backbone_id = s.query(VersionRow.backbone_id).filter(VersionRow.digest == seed.digest).limit(1).scalar()
        rows = [{"adapter_id": adapter_id, "number": n, "backbone_id": backbone_id, "digest": seed.digest,
                 "size": seed.size, "config": seed.config, "trainable_params": seed.trainable_params,
                 "status": "ready", "created_at": now + timedelta(seconds=n)}
                for n in range(1, versions + 1)]  # fmt: skip
        s.execute(insert(VersionRow), rows)
        ids = s.query(VersionRow.id).filter(VersionRow.adapter_id == adapter_id).all()
        metrics = [{"version_id": vid, "name": m, "value": rng.random(), "split": m.split("/")[0], "logged_at": now}
                   for (vid,) in ids for m in METRICS]  # fmt: skip
        s.execute(insert(MetricRow), metrics)
    return f"{task}/long"


def ui_bench(hub: Hub, refs: list[str], per_adapter: int, repeat: int) -> dict[str, float]:
    """Server time of each page of the web view, median of REPEAT requests after a warm-up one. The compared
    versions get a metric logged over 20 steps first, so that the compare page draws its curves too; an
    adapter of 1,000 versions is added to time its page (a page of 100 of them, the best over all marked)."""
    from adapter_hub.ui import create_app

    mid = refs[len(refs) // 2 + 5]
    task = mid.split("/")[0]
    compare = [f"{r}:{per_adapter}" for r in refs if r.startswith(f"{task}/")][:10]  # "any adapters of one task"
    for ref in compare:
        for step in range(20):
            hub.log_metric(ref, "val/loss", 1.0 / (step + 1), split="val", step=step * 10)
    long = long_adapter(hub, mid, LONG_ADAPTER)
    client = create_app(hub=hub).test_client()

    def page(url: str, method: str = "get") -> Callable[[], None]:
        def get() -> None:
            response = getattr(client, method)(url)
            assert response.status_code == 200, (url, response.status_code, response.get_data(as_text=True)[-300:])
            response.get_data()

        return get

    picked = "&".join(f"ref={r}" for r in compare)
    pages = {
        "tasks and adapters (10 tasks, 25 of each one's 100 adapters)": "/",
        "tasks filtered by name": "/?q=adapter-05",
        "one task (100 adapters)": f"/tasks/{task}",
        "an adapter's versions": f"/adapters/{mid}",
        f"an adapter of {LONG_ADAPTER:,} versions (a page of 100)": f"/adapters/{long}",
        "a version's detail": f"/versions/{mid}:{per_adapter}",
        "lineage graph (family of 10 adapters)": f"/lineage/{mid}:1",
        "compare 10 versions of a task (+ picker of its 1,000 versions)": f"/compare?{picked}",
    }
    out = {name: timed(page(url), repeat) for name, url in pages.items()}
    out["verify button (reads and hashes the blob)"] = timed(page(f"/verify/{mid}:{per_adapter}", "post"), repeat)
    return out


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
        if args.ui_only:
            out["pages ms"] = ui_bench(hub, refs, args.per_adapter, args.repeat)
            return out
        out["queries ms"] = query_bench(hub, refs, args.per_adapter, args.repeat)
        out["load"] = load_bench(hub, model, args.repeat)
        out["register"] = register_bench(hub, model, args.register)
        out["pages ms"] = ui_bench(hub, refs, args.per_adapter, args.repeat)  # last: it logs metrics
        return out


def _timing_rows(results: list[dict[str, Any]], key: str, target_ms: float) -> list[str]:
    """One table row per timing under KEY: each database's milliseconds, the target and whether all meet it."""
    rows = []
    for name in results[0][key]:
        values = [r[key][name] for r in results]
        cells = " | ".join(f"{v:.1f} ms" for v in values)
        met = "yes" if max(values) <= target_ms else "**no**"
        rows.append(f"| {name} | {cells} | ≤ {target_ms:.0f} ms | {met} |")
    return rows


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
    lines += _timing_rows(results, "queries ms", QUERY_TARGET_MS)
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


def ui_report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import importlib.metadata
    import shutil

    dot = "Graphviz `dot` on PATH" if shutil.which("dot") else "**no Graphviz `dot`: the lineage page lists edges**"
    lines = [
        "## Registry web view (benchmarks/registry_bench.py --ui-only)",
        "",
        f"{platform.machine()} ({os.cpu_count()} cpus); Flask {importlib.metadata.version('flask')}; {dot}; "
        f"{args.adapters * args.per_adapter:,} versions over {args.adapters:,} adapters; server time per page "
        f"through Flask's test client (request handled, page rendered), median of {args.repeat} requests; "
        f"load average {os.getloadavg()[0]:.1f} at the end (other processes share the cpus).",
        "",
        "| page | " + " | ".join(r["database"] for r in results) + " | target | met |",
        "|---|" + "---|" * len(results) + "---|---|",
    ]
    lines += _timing_rows(results, "pages ms", PAGE_TARGET_MS)
    return "\n".join(lines)


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
    parser.add_argument("--ui-only", action="store_true", help="Only the web view's page timings.")
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
    ui_text = ui_report(results, args)
    text_ = None if args.ui_only else report(results, args)
    print(ui_text if text_ is None else f"{text_}\n{ui_text}")
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        name = "registry_ui.json" if args.ui_only else "registry.json"
        (HERE / "results" / name).write_text(json.dumps(results, indent=2) + "\n")
        if text_ is not None:
            write_section(text_)
        results_md.write_section("registry-ui", ui_text)


if __name__ == "__main__":
    main()
