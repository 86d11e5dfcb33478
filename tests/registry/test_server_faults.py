"""Server faults against a throwaway PostgreSQL cluster that this test starts itself (never the shared
server): writers register in a loop while the postmaster is killed and restarted and while single
backends are terminated. Every failure is one line, every registration reported is there exactly once."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import seeded_backbone
from sqlalchemy import create_engine, func, select, text

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub, RegistryError
from adapter_hub.registry.models import VersionRow

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapter_hub.model", "adapter_hub.registry", "helpers"])
TIMEOUT_S = 180
WRITERS, AT_LEAST = 4, 5


class Cluster:
    """A PostgreSQL cluster in a temporary folder, run as the `postgres` user when this process is root."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.data, self.port = bindir, root / "data", _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.sockets = root / "run"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.data / "log"), "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def kill_postmaster(self) -> None:
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30  # its backends notice the postmaster's death and exit
        while time.time() < deadline and _backends(pid):
            time.sleep(0.1)

    def terminate_backends(self) -> int:
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            killed = conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE datname = 'postgres' AND pid <> pg_backend_pid()")  # fmt: skip
            ).scalar_one()
        engine.dispose()
        return int(killed)


def _backends(postmaster: int) -> bool:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if shutil.which(
        "initdb") else [])  # fmt: skip
    if not found:
        pytest.skip("PostgreSQL's initdb is not installed: the server-fault tests start their own cluster")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("as root the cluster runs as `postgres`, which needs runuser")
    root = Path(tempfile.mkdtemp(prefix="adapter-hub-pg-"))
    (root / "run").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "run", "postgres")
    c = Cluster(Path(found[-1]).parent, root)
    try:
        c.init()
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _writer(home: str, url: str, worker: int, deadline: float, stop: Any, out: Any) -> None:
    """Register adapters, each with its own key, until told to stop (and at least AT_LEAST); on a failure
    retry the same key until it works."""
    torch.set_num_threads(1)
    model = AdapterModel(seeded_backbone(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(worker)
        model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
    reported: list[tuple[str, str]] = []
    failures: list[str] = []
    hub = None
    i = 0
    while (i < AT_LEAST or not stop.is_set()) and time.time() < deadline:
        i += 1
        with torch.no_grad():
            next(model.adapters["a"].parameters()).view(-1)[0] = 1000.0 * worker + i
        key = f"w{worker}-{i}"
        while time.time() < deadline:
            try:
                hub = hub or Hub.open(home, url)
                reported.append((key, hub.register(model, "a", task="t", name=f"w{worker % 2}", key=key).ref))
                break
            except RegistryError as exc:
                failures.append(str(exc))
                time.sleep(0.3)
            except BaseException as exc:  # a defect: anything but the package's own one-line errors
                failures.append(f"UNEXPECTED {type(exc).__name__}: {exc}")
                time.sleep(0.3)
        time.sleep(0.05)
    if hub is not None:
        hub.close()
    out.put((worker, reported, failures))


@pytest.mark.slow
def test_writers_survive_a_killed_server_and_terminated_backends(cluster: Cluster, tmp_path: Path) -> None:
    with Hub.open(tmp_path, cluster.url) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
    out, stop = CTX.Queue(), CTX.Event()
    deadline = time.time() + TIMEOUT_S - 30
    procs = [CTX.Process(target=_writer, args=(str(tmp_path), cluster.url, w, deadline, stop, out))
             for w in range(WRITERS)]  # fmt: skip
    for p in procs:
        p.start()
    engine = create_engine(cluster.url)
    with engine.connect() as conn:  # the writers are registering before any fault
        while conn.execute(select(func.count()).select_from(VersionRow)).scalar_one() < WRITERS:
            assert time.time() < deadline, "the writers never started registering"
            time.sleep(0.1)
            conn.rollback()
    engine.dispose()
    cluster.kill_postmaster()  # kill -9 of the postmaster, mid-registration
    down = subprocess.run([sys.executable, "-m", "adapter_hub.cli", "--home", str(tmp_path), "--db", cluster.url, "ls"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    time.sleep(0.5)
    cluster.start()
    terminated = 0
    for _ in range(3):
        time.sleep(0.7)
        terminated += cluster.terminate_backends()
    time.sleep(0.5)
    stop.set()
    results = [out.get(timeout=TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(TIMEOUT_S)

    # a command run while the server was down: one line, after one retry
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and "cannot open database" in down.stderr

    failures = [f for _, _, fs in results for f in fs]
    assert failures, "no registration met a fault: the test proved nothing"
    assert terminated > 0
    assert not [f for f in failures if f.startswith("UNEXPECTED") or "\n" in f]
    assert all("lost the connection" in f or "cannot open database" in f for f in failures), failures
    assert any("lost the connection" in f for f in failures), failures  # faults hit registrations in flight
    reported = {key: ref for _, pairs, _ in results for key, ref in pairs}
    counts = [len(pairs) for _, pairs, _ in results]
    assert min(counts) >= AT_LEAST and len(reported) == sum(counts)  # every writer got through in the end
    with Hub.open(tmp_path, cluster.url) as hub:
        with hub._session() as s:
            tokens = dict(s.execute(select(VersionRow.token, func.count()).group_by(VersionRow.token)).all())
        assert tokens == {key: 1 for key in reported}  # each registration exactly once: no duplicate
        for ref in reported.values():
            assert hub.resolve(ref).ref == ref
        numbers = sorted(v.number for name in ("t/w0", "t/w1") for v in hub.versions(name))
        assert len(numbers) == len(reported)
        assert hub.verify() == []  # no row without its blob
