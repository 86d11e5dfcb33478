"""A team on several machines: processes that share only the database and the S3 bucket (a real SeaweedFS
server), never a folder. Two machines hand adapters to each other; eight register at once; the S3 server dies
during registrations and comes back."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TESTS, seeded_backbone, trained_model
from s3_helpers import CREDENTIALS, SeaweedS3

from adapter_hub.registry import Hub
from adapter_hub.registry.object_store import ObjectStore

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapter_hub.model", "adapter_hub.registry", "helpers"])
TIMEOUT_S = 180

# -- two machines ------------------------------------------------------------------------------------------

MACHINE_A = """
import json, sys, torch
from helpers import trained_model
from adapter_hub.pipelines import add_image_backbone
from adapter_hub.registry import Hub

db, store = sys.argv[1], sys.argv[2]
with Hub.open(db=db, store=store) as hub:  # the home is $ADAPTER_HUB_HOME: this machine's own
    add_image_backbone(hub, "tiny", "helpers:tiny_backbone", seed=0)
    hub.add_task("digits", num_classes=10)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for seed in (1, 2):
        model = trained_model(seed)
        model.activate("a")
        with torch.no_grad():
            logits = model(x)
        v = hub.register(model, "a", task="digits", name="lora")
        out[v.ref] = {"digest": v.digest, "logits": logits.tolist()}
print(json.dumps(out))
"""

MACHINE_B = """
import json, sys, torch
from adapter_hub.pipelines import compose_refs, model_for
from adapter_hub.registry import Hub

expected = json.loads(sys.stdin.read())
with Hub.open(db=sys.argv[1]) as hub:  # no store named: the one the database records
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for ref, seen in expected.items():
        model = model_for(hub, hub.resolve(ref))  # the backbone rebuilt from its record
        hub.load_into(model, ref, name="loaded")
        model.activate("loaded")
        with torch.no_grad():
            err = (model(x) - torch.tensor(seen["logits"])).abs().max().item()
        hub.log_metric(ref, "agreement/max_abs_error", err)  # the evaluation, recorded for the team
    child = compose_refs(hub, sorted(expected), "digits/avg", weights=[0.5, 0.5])
    print(json.dumps({"child": child.ref, "digest": child.digest, "store": hub.store.url}))
"""


def _machine(home: Path, server: SeaweedS3, code: str, *args: str, stdin: str = "") -> str:
    """Run CODE in a fresh interpreter as another machine: its own HOME and registry home, the S3 endpoint and
    credentials in its environment, nothing else of this process's registry settings."""
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAPTER_HUB_", "AWS_"))}
    env.update(server.env(), HOME=str(home), ADAPTER_HUB_HOME=str(home / ".adapter_hub"), OMP_NUM_THREADS="1",
               ADAPTER_HUB_TRUSTED_FACTORIES="helpers:tiny_backbone",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, *args], input=stdin, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S, cwd=home)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


@pytest.mark.postgres
def test_two_machines_share_adapters_through_postgres_and_the_bucket(
    tmp_path: Path, pg_url: str, s3_env: SeaweedS3
) -> None:
    store = f"s3://{s3_env.make_bucket()}/team"
    made = json.loads(_machine(tmp_path / "a", s3_env, MACHINE_A, pg_url, store))
    composed = json.loads(_machine(tmp_path / "b", s3_env, MACHINE_B, pg_url, stdin=json.dumps(made)))
    assert composed["store"] == store and composed["child"] == "digits/avg:1"
    for machine in ("a", "b"):  # neither machine wrote an artifact to its own disk
        assert not (tmp_path / machine / ".adapter_hub" / "artifacts" / "sha256").exists()
    with Hub.open(tmp_path / "c", pg_url) as hub:  # a third client sees what both did
        for ref in made:
            assert hub.metrics(ref)[0].value < 1e-5, "machine B's forward matched machine A's"
        lineage = hub.lineage("digits/avg:1")
        assert sorted(e.parent for e in lineage.edges) == sorted(made)
        assert hub.read_artifact("digits/avg:1")[0].digest == composed["digest"]
        assert hub.verify() == []
        digests = {d for d, _ in hub.store.digests()}
        assert digests == {v["digest"] for v in made.values()} | {composed["digest"]}


# -- eight processes ---------------------------------------------------------------------------------------


def _options(server: SeaweedS3) -> dict[str, Any]:
    """Endpoint and credentials as store options: forkserver workers do not see environment set after it started."""
    return {"endpoint_url": server.endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip


def _team_registry(home: Path, url: str, server: SeaweedS3) -> tuple[str, dict[str, Any]]:
    """A new registry at URL recording a fresh bucket of SERVER as its store, with a backbone "tiny" and a task
    "t"; returns the store URL and the options every client passes."""
    store, options = f"s3://{server.make_bucket()}/hub", _options(server)
    with Hub.open(home, url, store=store, store_options=options) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
    return store, options


def _register_many(home: str, url: str, store: str, options: dict[str, Any], worker: int, count: int,
                   barrier: Any, out: Any) -> None:  # fmt: skip
    try:
        torch.set_num_threads(1)
        model = trained_model(0)
        with Hub.open(home, url, store=store, store_options=options) as hub:
            barrier.wait(TIMEOUT_S)
            made = []
            for i in range(count):
                with torch.no_grad():
                    next(model.adapters["a"].parameters()).view(-1)[0] = 1000.0 * worker + i
                made.append(hub.register(model, "a", task="t", name="shared").ref)
        out.put((worker, made, None))
    except BaseException as exc:  # reported to the parent, whatever it was
        out.put((worker, [], f"{type(exc).__name__}: {exc}"))


@pytest.mark.postgres
@pytest.mark.slow
def test_eight_processes_register_two_hundred_versions_on_postgres_and_s3(
    tmp_path: Path, pg_url: str, s3_env: SeaweedS3
) -> None:
    store, options = _team_registry(tmp_path / "setup", pg_url, s3_env)
    workers, count = 8, 25
    barrier, out = CTX.Barrier(workers), CTX.Queue()
    procs = [CTX.Process(target=_register_many, args=(str(tmp_path / f"m{w}"), pg_url, store, options, w, count,
                                                      barrier, out)) for w in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    results = [out.get(timeout=TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(TIMEOUT_S)
    assert [err for _w, _m, err in results if err] == []
    refs = sorted(r for _w, made, _e in results for r in made)
    assert len(refs) == len(set(refs)) == workers * count
    with Hub.open(tmp_path / "check", pg_url) as hub:
        versions = hub.versions("t/shared")
        assert [v.number for v in versions] == list(range(1, workers * count + 1))
        assert sorted(v.ref for v in versions) == refs
        assert len({v.digest for v in versions}) == workers * count
        assert hub.verify() == []  # every object present, read back and hashed
        store_digests = {d for d, _ in hub.store.digests()}
        assert store_digests == {v.digest for v in versions} and list(hub.store.temp_files()) == []


# -- the S3 server killed during registrations ---------------------------------------------------------------


def _register_through_outage(home: str, url: str, store: str, options: dict[str, Any], wanted: int,
                             out: Any) -> None:  # fmt: skip
    torch.set_num_threads(1)
    model = trained_model(0)
    deadline = time.monotonic() + TIMEOUT_S
    done = 0
    with Hub.open(home, url, store=store, store_options=options) as hub:
        i = 0
        while done < wanted and time.monotonic() < deadline:
            i += 1
            with torch.no_grad():
                next(model.adapters["a"].parameters()).view(-1)[0] = float(i)
            try:
                out.put(("ok", hub.register(model, "a", task="t", name="x").ref))
                done += 1
            except Exception as exc:
                out.put(("error", f"{type(exc).__name__}: {exc}"))
                time.sleep(0.2)
    out.put(("done", None))


@pytest.fixture
def team_db(tmp_path: Path, pg_available: str | None, request: pytest.FixtureRequest) -> str:
    """PostgreSQL where it answers, else a SQLite file."""
    if pg_available is None:
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'hub.db'}"


def test_killing_the_s3_server_during_registrations_loses_nothing(
    tmp_path: Path, team_db: str, own_s3_server: SeaweedS3
) -> None:
    server = own_s3_server
    store, options = f"s3://{server.make_bucket()}/hub", _options(server)
    with Hub.open(tmp_path / "setup", team_db, store=store, store_options=options) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
    out = CTX.Queue()
    worker = CTX.Process(target=_register_through_outage,
                         args=(str(tmp_path / "w"), team_db, store, options, 30, out))  # fmt: skip
    worker.start()
    registered: list[str] = []
    errors: list[str] = []

    def take(until: float, stop: Any) -> bool:
        while time.monotonic() < until:
            try:
                kind, value = out.get(timeout=0.5)
            except Exception:
                continue
            if kind == "done":
                return True
            (registered if kind == "ok" else errors).append(value)
            if stop():
                return False
        return False

    t0 = time.monotonic()
    take(time.monotonic() + TIMEOUT_S, lambda: len(registered) >= 8)
    t1 = time.monotonic()
    server.kill()  # SIGKILL in the middle of the loop: uploads in flight die with it
    take(time.monotonic() + 3, lambda: False)
    t2 = time.monotonic()
    server.start()
    t3 = time.monotonic()
    finished = take(time.monotonic() + TIMEOUT_S, lambda: False)
    print(
        f"8 registered in {t1 - t0:.1f} s; down {t2 - t1:.1f} s, restarted in {t3 - t2:.1f} s, "
        f"{len(errors)} failed registrations; the rest in {time.monotonic() - t3:.1f} s"
    )
    worker.join(TIMEOUT_S)
    assert finished and len(registered) == 30, errors[-3:]
    assert errors, "the outage was seen by the registrations"
    for line in errors:  # each failure one line naming the store (no traceback, no credential)
        assert "\n" not in line and line.startswith("ArtifactError: artifact store s3://"), line
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in line
    with Hub.open(tmp_path / "check", team_db, store_options=options) as hub:
        versions = hub.versions("t/x")
        assert sorted(v.ref for v in versions) == sorted(registered), "no version without its report, or the reverse"
        model = trained_model(0)
        for ref in registered:
            hub.load_into(model, ref, name="loaded")
            model.delete_adapter("loaded")
        assert hub.verify() == []
        assert isinstance(hub.store, ObjectStore)


# -- a registering process killed mid-upload ---------------------------------------------------------------


def _register_until_killed(home: str, url: str, store: str, options: dict[str, Any], out: Any) -> None:
    torch.set_num_threads(1)
    model = trained_model(0)
    with Hub.open(home, url, store=store, store_options=options) as hub:
        for i in range(10**6):
            with torch.no_grad():
                next(model.adapters["a"].parameters()).view(-1)[0] = float(i)
            out.put(hub.register(model, "a", task="t", name="x").ref)


def test_a_process_killed_during_registrations_leaves_no_version_without_its_object(
    tmp_path: Path, team_db: str, s3_env: SeaweedS3
) -> None:
    store, options = _team_registry(tmp_path / "setup", team_db, s3_env)
    kills = 0
    for round_ in range(3):  # SIGKILL at three different moments of the loop
        out = CTX.Queue()
        worker = CTX.Process(target=_register_until_killed, args=(str(tmp_path / "w"), team_db, store, options, out))
        worker.start()
        out.get(timeout=TIMEOUT_S)  # registering now
        time.sleep(0.05 + 0.07 * round_)
        worker.kill()
        worker.join(TIMEOUT_S)
        kills += worker.exitcode == -9
    assert kills == 3
    with Hub.open(tmp_path / "check", team_db, store_options=options) as hub:
        versions = hub.versions("t/x")
        assert len(versions) >= 3 and hub.verify() == []  # every row has its object, intact
        report = hub.gc(grace_s=0)  # what the killed uploads left: orphan objects, temporary keys, upload rows
        assert set(report.removed).isdisjoint(v.digest for v in versions)
        assert list(hub.store.temp_files()) == [] and hub.verify() == []
        assert {d for d, _ in hub.store.digests()} == {v.digest for v in versions}
