"""Real concurrent processes against the registry, and processes killed (SIGKILL) in the middle of register."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import seeded_backbone
from sqlalchemy import event
from sqlalchemy.orm import Session

from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub
from adapter_hub.registry.models import VersionRow

# Workers are forked from a server that has already imported torch: fast to start, and no fork of a
# process whose thread pools are running.
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapter_hub.model", "adapter_hub.registry", "helpers"])
TIMEOUT_S = 120


def _model() -> AdapterModel:
    model = AdapterModel(seeded_backbone(0))
    model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
    return model


def _vary(model: AdapterModel, value: float) -> None:
    """Make the adapter's bytes unique to `value`."""
    with torch.no_grad():
        next(model.adapters["a"].parameters()).view(-1)[0] = value


def _setup(home: Path, url: str) -> None:
    with Hub.open(home, url) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")


def _register_many(home: str, url: str, worker: int, count: int, barrier: Any, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        model = _model()
        attempts = 0
        insert = Hub._insert_version

        def counting_insert(*args: Any) -> int:  # counts transactions, including those rolled back
            nonlocal attempts
            attempts += 1
            return insert(*args)

        Hub._insert_version = staticmethod(counting_insert)  # type: ignore[method-assign]
        with Hub.open(home, url) as hub:
            barrier.wait(TIMEOUT_S)
            numbers = []
            for i in range(count):
                _vary(model, 1000.0 * worker + i)
                numbers.append(hub.register(model, "a", task="t", name="shared").number)
        out.put((worker, numbers, None, attempts - count))
    except BaseException as exc:  # report to the parent, whatever it was
        out.put((worker, [], f"{type(exc).__name__}: {exc}", 0))


def _run_registrations(home: Path, url: str, workers: int, count: int) -> None:
    _setup(home, url)
    barrier, out = CTX.Barrier(workers), CTX.Queue()
    procs = [CTX.Process(target=_register_many, args=(str(home), url, w, count, barrier, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(TIMEOUT_S)
    errors = [err for _w, _n, err, _r in results if err]
    assert errors == [], errors
    retries = sum(r for *_, r in results)
    print(f"{workers} x {count} registrations: {retries} retried after a unique-key conflict")
    numbers = sorted(n for _w, nums, _e, _r in results for n in nums)
    assert numbers == list(range(1, workers * count + 1))
    with Hub.open(home, url) as hub:
        versions = hub.versions("t/shared")
        assert [v.number for v in versions] == numbers
        assert len({v.digest for v in versions}) == workers * count  # every registration kept its own bytes
        assert hub.verify() == []
        for v in versions:  # each row points at a blob whose sha256 (computed here) is its digest
            assert hashlib.sha256(hub.store.path(v.digest).read_bytes()).hexdigest() == v.digest


@pytest.mark.postgres
def test_eight_processes_register_two_hundred_versions_on_postgres(tmp_path: Path, pg_url: str) -> None:
    _run_registrations(tmp_path, pg_url, workers=8, count=25)


def test_four_processes_register_forty_versions_on_sqlite(tmp_path: Path, sqlite_url: str) -> None:
    _run_registrations(tmp_path, sqlite_url, workers=4, count=10)


def _put_same(root: str, data: bytes, barrier: Any, out: Any) -> None:
    from adapter_hub.registry.store import ArtifactStore

    store = ArtifactStore(Path(root))
    barrier.wait(TIMEOUT_S)
    out.put([store.put(data) for _ in range(5)])


def test_processes_writing_the_same_blob_at_once_are_safe(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    barrier, out = CTX.Barrier(4), CTX.Queue()
    procs = [CTX.Process(target=_put_same, args=(str(tmp_path), data, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    digests = {d for _ in procs for d in out.get(timeout=TIMEOUT_S)}
    for p in procs:
        p.join(TIMEOUT_S)
    expected = hashlib.sha256(data).hexdigest()
    assert digests == {expected}
    blobs = [p for p in (tmp_path / "sha256").rglob("*") if p.is_file()]
    assert [b.read_bytes() == data for b in blobs] == [True]
    assert list((tmp_path / "tmp").iterdir()) == []


# -- SIGKILL in the middle of register --------------------------------------------------------------


def _register_then_hang(home: str, url: str, phase: str, reached: Any) -> None:
    """Register once normally, then again and stop at `phase` until killed."""
    model = _model()
    hub = Hub.open(home, url)
    hub.register(model, "a", task="t", name="crash")
    _vary(model, 42.0)

    def hang() -> None:
        reached.set()
        time.sleep(TIMEOUT_S)

    if phase == "temp-written":  # the temp file is written and fsynced, not yet renamed
        real_fsync = os.fsync
        os.fsync = lambda fd: (real_fsync(fd), hang())  # type: ignore[assignment]
    elif phase == "blob-renamed":  # the blob has its final name, the row is not written
        real_replace = os.replace
        os.replace = lambda a, b: (real_replace(a, b), hang())  # type: ignore[assignment]
    else:  # "row-flushed": the version row is inserted in the open transaction, not committed
        def hang_on_version(session: Session, _ctx: Any) -> None:
            if any(isinstance(obj, VersionRow) for obj in session.new):  # not the upload row before it
                hang()

        event.listen(Session, "after_flush", hang_on_version)
    hub.register(model, "a", task="t", name="crash")


@pytest.mark.parametrize("phase", ["temp-written", "blob-renamed", "row-flushed"])
def test_sigkill_mid_register_leaves_no_dangling_version(tmp_path: Path, db_url: str, phase: str) -> None:
    _setup(tmp_path, db_url)
    reached = CTX.Event()
    proc = CTX.Process(target=_register_then_hang, args=(str(tmp_path), db_url, phase, reached))
    proc.start()
    assert reached.wait(TIMEOUT_S), "the worker never reached the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(TIMEOUT_S)
    assert proc.exitcode == -signal.SIGKILL

    if db_url.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "hub.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Hub.open(tmp_path, db_url) as hub:
        assert [v.number for v in hub.versions("t/crash")] == [1]  # the killed registration left no row
        assert hub.verify() == []
        temps = list(hub.store.temp_files())
        blobs = [d for d, _ in hub.store.digests()]
        if phase == "temp-written":
            assert len(temps) == 1 and len(blobs) == 1
        else:
            assert temps == [] and len(blobs) == 2  # one orphan: garbage for gc, not a dangling reference
        report = hub.gc(grace_s=0)
        assert len(report.removed) == len(blobs) - 1 and report.temp_files == len(temps)
        assert [d for d, _ in hub.store.digests()] == [hub.resolve("t/crash:1").digest]
        model = _model()
        _vary(model, 42.0)
        assert hub.register(model, "a", task="t", name="crash").number == 2
        assert hub.verify() == []


def _open_fresh(url: str, start: Any, errors: Any) -> None:
    from adapter_hub.registry.db import make_engine

    start.wait()
    try:
        with make_engine(url).connect().execution_options(adapter_hub_write=True) as conn:
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS t{os.getpid()} (x)")  # a write, as a migration's
            time.sleep(0.05)
            conn.commit()
    except Exception as exc:  # reported to the parent, which names it
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_sqlite_file_at_once_wait_for_each_other(tmp_path: Path) -> None:
    """Switching a new file to WAL needs it to itself, and SQLite answers 'database is locked' at once (no busy
    wait) to a process doing it while another writes: the switch is retried, so no process fails."""
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    for round_ in range(10):
        url = f"sqlite:///{tmp_path / f'r{round_}.db'}"
        start = ctx.Event()
        procs = [ctx.Process(target=_open_fresh, args=(url, start, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(60)
        assert errors.empty(), errors.get()
        assert sqlite3.connect(tmp_path / f"r{round_}.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
