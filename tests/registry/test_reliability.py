"""What an unlucky team does to a registry: gc while others register, a mistyped database, a lost COMMIT,
two users on one store, a read-only share, an interrupted first open, a held write lock, a full disk."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import TESTS, seeded_backbone
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from adapter_hub.cli import main
from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub, RegistryError
from adapter_hub.registry import schema as schema_mod
from adapter_hub.registry.db import make_engine
from adapter_hub.registry.errors import ConnectionLost, ReadOnlyRegistry, RegistryBusy, StorageFull, StoreMismatch
from adapter_hub.registry.models import UploadRow

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapter_hub.model", "adapter_hub.registry", "helpers"])
TIMEOUT_S = 120
SAME = 7.0  # registrations with this value all store the same bytes


def _model() -> AdapterModel:
    """The same adapter bytes in every process (until `_vary`)."""
    model = AdapterModel(seeded_backbone(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
    return model


def _vary(model: AdapterModel, value: float) -> None:
    with torch.no_grad():
        next(model.adapters["a"].parameters()).view(-1)[0] = value


def _setup(home: Path, url: str | None = None) -> Hub:
    hub = Hub.open(home, url)
    hub.add_backbone("tiny", seeded_backbone(0))
    hub.add_task("t")
    return hub


def _blobs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts" / "sha256").rglob("*") if p.is_file())


# -- 1. gc racing registrations ------------------------------------------------------------------------


def _writer(home: str, url: str, worker: int, count: int, started: Any, out: Any) -> None:
    """Register new content into t/wN and identical content into t/same, alternately; report each outcome.
    The writers start once gc has run, so that every registration races a looping gc."""
    torch.set_num_threads(1)
    model, done, errors = _model(), [], []
    with Hub.open(home, url) as hub:
        started.wait(TIMEOUT_S)
        for i in range(count):
            same = i % 2 == 1
            _vary(model, SAME if same else 1000.0 * worker + i)
            try:
                done.append(hub.register(model, "a", task="t", name="same" if same else f"w{worker}").ref)
            except RegistryError as exc:
                errors.append(str(exc))
            except BaseException as exc:  # anything else is a defect: report it with its type
                errors.append(f"{type(exc).__name__}: {exc}")
    out.put((done, errors))


def _deleter(home: str, url: str, stop: Any, out: Any, _started: Any) -> None:
    """Delete live versions of t/same while the writers add more: their blob is the one being re-used."""
    deleted = []
    with Hub.open(home, url) as hub:
        while not stop.is_set():
            live = [v.ref for v in hub.versions("t/same")] if hub.ls("t", name="same") else []
            if len(live) > 1:
                deleted.append(hub.delete(random.choice(live[:-1])).ref)
            time.sleep(0.01)
    out.put(deleted)


def _gc_loop(home: str, url: str, stop: Any, out: Any, started: Any) -> None:
    runs = 0
    with Hub.open(home, url) as hub:
        while not stop.is_set():
            hub.gc(grace_s=random.choice([0.0, 0.0, 0.05, 1.0]), purge_deleted=runs % 2 == 0)
            runs += 1
            started.set()
    out.put(runs)


@pytest.mark.slow
def test_gc_never_takes_a_blob_a_live_version_or_a_registration_uses(tmp_path: Path, db_url: str) -> None:
    _setup(tmp_path, db_url).close()
    with Hub.open(tmp_path, db_url) as hub:  # t/same exists before the deleter starts
        model = _model()
        _vary(model, SAME)
        hub.register(model, "a", task="t", name="same")
    out, stop, started = CTX.Queue(), CTX.Event(), CTX.Event()
    writers = [CTX.Process(target=_writer, args=(str(tmp_path), db_url, w, 12, started, out)) for w in range(3)]
    helpers = [CTX.Process(target=f, args=(str(tmp_path), db_url, stop, out, started)) for f in (_deleter, _gc_loop)]
    for p in writers + helpers:
        p.start()
    results = [out.get(timeout=TIMEOUT_S) for _ in writers]
    stop.set()
    extra = [out.get(timeout=TIMEOUT_S) for _ in helpers]
    for p in writers + helpers:
        p.join(TIMEOUT_S)
    errors = [e for _, errs in results for e in errs]
    assert errors == []  # every registration succeeded
    gc_runs = next(x for x in extra if isinstance(x, int))
    assert gc_runs >= 3, "gc did not run while the writers registered"
    with Hub.open(tmp_path, db_url) as hub:
        registered = [ref for done, _ in results for ref in done]
        assert len(registered) == 36 and len(set(registered)) == 36
        deleted = set(next(x for x in extra if isinstance(x, list)))
        assert deleted, "the deleter never deleted a version while gc ran"
        for ref in registered:
            version = hub.resolve(ref, include_deleted=True)
            assert version.status == "ready" if ref not in deleted else version.status in ("deleted", "purged")
        assert hub.verify() == []  # never a live (or deleted, not purged) version without its blob
        final = hub.gc(grace_s=0, purge_deleted=True)
        assert hub.verify() == [] and final.expired_uploads == 0
        with hub._session() as s:
            assert s.scalars(select(UploadRow)).all() == []  # every registration closed its upload
        live = {v.digest for ref in registered if (v := hub.resolve(ref, include_deleted=True)).status == "ready"}
        assert {p.parent.name + p.name for p in _blobs(tmp_path)} == live


def test_gc_waits_for_a_registration_that_reuses_the_blob_it_is_deleting(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race, step by step: gc has listed an orphan blob as garbage; then a registration of the same
    bytes finds the blob present and is committing its version while gc re-checks. gc's re-check waits for
    that transaction (SQLite's write lock, PostgreSQL's per-digest lock), sees the version, keeps the blob."""
    import threading

    from adapter_hub.registry.store import ArtifactStore

    hub = _setup(tmp_path, db_url)
    model = _model()
    orphan = hub.store.put(model.adapter_to_bytes("a"))  # an old blob that no version uses
    writer = Hub.open(tmp_path, db_url)
    in_commit, release, errors = threading.Event(), threading.Event(), []
    real_insert, real_age = Hub._insert_version, ArtifactStore.age_s

    def insert(*args: Any) -> int:
        vid = real_insert(*args)
        in_commit.set()  # inside the registration's final transaction, holding its lock
        release.wait(10)
        return vid

    def register() -> None:
        try:
            writer.register(model, "a", task="t", name="reuse")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=register)

    def age_s(path: Path) -> float:
        if path.name == orphan[2:] and not thread.is_alive() and not in_commit.is_set():
            thread.start()  # gc decided from its snapshot; now the registration races its re-check
            assert in_commit.wait(10)
            threading.Timer(0.5, release.set).start()
        return real_age(path)

    monkeypatch.setattr(Hub, "_insert_version", staticmethod(insert))
    monkeypatch.setattr(ArtifactStore, "age_s", staticmethod(age_s))
    t0 = time.perf_counter()
    report = hub.gc(grace_s=0)
    waited = time.perf_counter() - t0
    thread.join(10)
    assert errors == [] and in_commit.is_set()
    assert report.removed == [] and waited >= 0.4  # gc waited for the commit, then kept the blob
    assert hub.resolve("t/reuse:1").digest == orphan and hub.verify() == []
    writer.close()
    hub.close()


# -- 2. a store belongs to one registry ------------------------------------------------------------------


def test_a_mistyped_or_empty_database_never_collects_the_real_registry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    hub = _setup(home)
    model = _model()
    for value in (1.0, 2.0, 3.0):
        _vary(model, value)
        hub.register(model, "a", task="t", name="lora")
    hub.close()
    blobs = _blobs(home)
    assert len(blobs) == 3 and (home / "artifacts" / "REGISTRY").read_text().strip()
    old = time.time() - 10 * 86400  # older than any grace period
    for blob in blobs:
        os.utime(blob, (old, old))

    typo = tmp_path / "typo.db"
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), "--db", f"sqlite:///{typo}", "gc", "--grace", "0"])
    assert result.exit_code == 1 and "not creating a new registry" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not typo.exists() and _blobs(home) == blobs  # nothing created, nothing removed

    # another registry's database, not empty: its id is not the store's
    other = _setup(tmp_path / "other")
    other.close()
    result = runner.invoke(main, ["--home", str(home), "--db", f"sqlite:///{tmp_path / 'other' / 'hub.db'}", "gc"])
    assert result.exit_code == 1 and "belongs to another registry" in result.output
    assert _blobs(home) == blobs

    # hub.db emptied (a zero-length file): refused, not silently re-created as an empty registry
    saved = (home / "hub.db").read_bytes()
    (home / "hub.db").write_bytes(b"")
    with pytest.raises(StoreMismatch, match="missing or empty"):
        Hub.open(home)
    assert (home / "hub.db").stat().st_size == 0 and _blobs(home) == blobs
    (home / "hub.db").write_bytes(saved)

    # gc checks the binding itself, also on a Hub made without open()
    engine = make_engine(f"sqlite:///{tmp_path / 'other' / 'hub.db'}")
    stray = Hub(engine, home)
    with pytest.raises(StoreMismatch, match="gc removes nothing"):
        stray.gc(grace_s=0, purge_deleted=True)
    stray.close()
    with Hub.open(home) as hub:
        assert [v.number for v in hub.versions("t/lora")] == [1, 2, 3] and hub.verify() == []


def test_a_store_written_before_stores_recorded_their_registry_is_adopted(tmp_path: Path) -> None:
    hub = _setup(tmp_path)
    model = _model()
    hub.register(model, "a", task="t", name="lora")
    hub.close()
    (tmp_path / "artifacts" / "REGISTRY").unlink()
    with Hub.open(tmp_path) as hub:  # its blobs are this database's: bound again
        assert hub.store.identity() == hub.registry_id()
        assert hub.gc(grace_s=0).removed == []
    # an unbound store whose blobs the database does not know is another registry's
    (tmp_path / "artifacts" / "REGISTRY").unlink()
    with Hub.open(tmp_path) as hub:
        hub.delete("t/lora:1")
        hub.gc(grace_s=0, purge_deleted=True)
    (tmp_path / "artifacts" / "REGISTRY").unlink()
    orphan = tmp_path / "artifacts" / "sha256" / "ab" / ("c" * 62)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"someone else's")
    with pytest.raises(StoreMismatch, match="does not reference"):
        Hub.open(tmp_path)


def test_of_two_registries_binding_one_new_store_only_one_wins(tmp_path: Path) -> None:
    from adapter_hub.registry.store import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts")
    assert store.bind("registry-a") == "registry-a"
    assert store.bind("registry-b") == "registry-a"  # never replaced: the second binder learns the owner
    assert store.identity() == "registry-a" and [p.name for p in store.root.iterdir()] == ["REGISTRY"]


def test_stored_text_in_an_error_line_is_escaped(tmp_path: Path) -> None:
    _setup(tmp_path).close()
    (tmp_path / "artifacts" / "REGISTRY").chmod(0o644)
    (tmp_path / "artifacts" / "REGISTRY").write_text("evil\x1b]8;;http://x\x1b\\\x1b[31mred\n")
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "ls"])
    assert result.exit_code == 1 and "belongs to another registry" in result.stderr
    assert "\x1b" not in result.stderr and "evil\\x1b]8;;http://x" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_database_errors_are_classified_by_code_not_by_user_text() -> None:
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import OperationalError as Op

    from adapter_hub.registry.db import translate

    class PgError(Exception):
        def __init__(self, text: str, sqlstate: str) -> None:
            super().__init__(text)
            self.sqlstate = sqlstate

    dup = IntegrityError("INSERT", {}, PgError("Key (task_id, name)=(1, read-only) already exists", "23505"))
    assert translate(dup, "db", writing=True, committing=False) is None  # the caller retries or says "exists"
    busy = translate(Op("UPDATE", {}, PgError("deadlock detected", "40P01")), "db", writing=True, committing=False)
    assert isinstance(busy, RegistryBusy) and "nothing was written" in str(busy)
    full = translate(Op("COMMIT", {}, PgError("could not extend file", "53100")), "db", writing=True, committing=True)
    assert isinstance(full, StorageFull)
    gone = translate(Op("COMMIT", {}, PgError("terminating connection due to administrator command", "57P01")),
                     "db", writing=True, committing=True)  # fmt: skip
    assert isinstance(gone, ConnectionLost) and gone.outcome_unknown and "may or may not" in str(gone)
    other = translate(Op("SELECT", {}, PgError("sorry, too many clients already", "53300")), "db", writing=False,
                      committing=False)  # fmt: skip
    assert type(other) is RegistryError and "nothing was changed" in str(other)


# -- 3. register and a COMMIT whose outcome is unknown ----------------------------------------------------


def _lose_commit(monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> dict[str, int]:
    """Make the COMMIT of the next version row fail as a dropped connection: after the server committed
    (the reply is lost) or before."""
    real_commit, real_insert = Session.commit, Hub._insert_version
    state = {"armed": 0, "fired": 0}

    def insert(*args: Any) -> int:
        state["armed"] = 1
        return real_insert(*args)

    def commit(self: Session) -> None:
        if not state["armed"]:
            return real_commit(self)
        state["armed"], state["fired"] = 0, state["fired"] + 1
        if after_commit:
            real_commit(self)
        else:
            self.rollback()
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"),
                               connection_invalidated=True)

    monkeypatch.setattr(Hub, "_insert_version", staticmethod(insert))
    monkeypatch.setattr(Session, "commit", commit)
    return state


def test_a_lost_commit_never_makes_a_duplicate(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _setup(tmp_path, db_url)
    model = _model()
    first = hub.register(model, "a", task="t", name="lora", key="run-17")
    assert hub.register(model, "a", task="t", name="lora", key="run-17") == first  # a retry finds it
    with pytest.raises(RegistryError, match="was used for t/lora:1"):
        hub.register(model, "a", task="t", name="other", key="run-17")

    state = _lose_commit(monkeypatch, after_commit=True)
    _vary(model, 2.0)
    second = hub.register(model, "a", task="t", name="lora")  # committed, reply lost: found by its key
    assert state["fired"] == 1 and second.number == 2

    state = _lose_commit(monkeypatch, after_commit=False)
    _vary(model, 3.0)
    with pytest.raises(ConnectionLost, match="lost the connection .* not registered so far.* key 'run-19'") as info:
        hub.register(model, "a", task="t", name="lora", key="run-19")
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert [v.number for v in hub.versions("t/lora")] == [1, 2]
    assert hub.register(model, "a", task="t", name="lora", key="run-19").number == 3  # the retry
    assert hub.verify() == []
    hub.close()


# -- 4. two users, one store -----------------------------------------------------------------------------

_AS_ANOTHER_USER = ["setpriv", "--inh-caps=-dac_override,-fowner,-dac_read_search",
                    "--bounding-set=-dac_override,-fowner,-dac_read_search"]  # fmt: skip


def _other_user_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return "needs root and setpriv to act as a user without the rights of the blobs' owner"
    probe = subprocess.run([*_AS_ANOTHER_USER, "true"], capture_output=True)
    return None if probe.returncode == 0 else f"setpriv cannot drop capabilities here: {probe.stderr!r}"


def _run_as_other_user(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [*_AS_ANOTHER_USER, sys.executable, "-c", script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


_REGISTER_SAME = """
import sys, torch
from helpers import seeded_backbone
from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub
model = AdapterModel(seeded_backbone(0))
torch.manual_seed(0)
model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
with torch.no_grad():
    next(model.adapters["a"].parameters()).view(-1)[0] = 5.0
with Hub.open(sys.argv[1]) as hub:
    print(hub.register(model, "a", task="t", name="theirs").ref)
    print(len(hub.gc(grace_s=0).removed))  # the other user's orphan cannot be deleted here: gc goes on
"""


def test_a_second_user_registers_bytes_the_first_user_stored(tmp_path: Path) -> None:
    if (why := _other_user_available()) is not None:
        pytest.skip(why)
    hub = _setup(tmp_path)
    model = _model()
    _vary(model, 5.0)
    mine = hub.register(model, "a", task="t", name="mine")
    hub.close()
    blob = hub.store.path(mine.digest)
    before = blob.stat()
    orphan = hub.store.path(hub.store.put(b"user A's orphan"))
    for folder in [tmp_path, *(p for p in (tmp_path / "artifacts").rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o1777)  # a shared folder: everyone may add files, only owners remove theirs
        if folder != tmp_path:
            os.chown(folder, 65534, 65534)
    for path in (blob, orphan):
        os.chown(path, 65534, 65534)  # user A's files, read-only
        os.chmod(path, 0o444)
    proc = _run_as_other_user(_REGISTER_SAME, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["t/theirs:1", "0"] and orphan.exists()
    after = blob.stat()
    assert (after.st_mtime_ns, after.st_uid) == (before.st_mtime_ns, 65534)  # A's blob untouched
    with Hub.open(tmp_path) as hub:
        assert hub.resolve("t/theirs:1").digest == mine.digest and hub.verify() == []


# -- 5. a read-only registry ---------------------------------------------------------------------------

_READ_EVERYTHING = """
import json, sys
from click.testing import CliRunner
from adapter_hub.cli import main
home, ref, out = sys.argv[1:4]
commands = [["ls"], ["show", ref], ["versions", "t/lora"], ["lineage", ref], ["metrics", ref], ["task", "ls"],
            ["export", ref, out], ["verify", "--all"], ["tag", "set", ref, "k=v"], ["gc"], ["rm", ref]]
results = []
for args in commands:
    r = CliRunner().invoke(main, ["--home", home, *args])
    results.append({"args": args, "code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                    "exc": None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)})
print(json.dumps(results))
"""


def _filled_registry(home: Path) -> str:
    hub = _setup(home)
    version = hub.register(_model(), "a", task="t", name="lora", metrics={"val/accuracy": 0.9})
    hub.close()
    return version.ref


def _check_read_only_results(results: list[dict[str, Any]]) -> None:
    for r in results[:8]:  # every read works
        assert r["code"] == 0 and r["exc"] is None, r
        assert r["stderr"].count("read-only") == 1 and r["stderr"].strip().startswith("note:"), r
    for r in results[8:]:  # every write is one line that says why
        assert r["code"] == 1 and r["exc"] is None, r
        lines = r["stderr"].strip().splitlines()
        assert len(lines) == 2 and "read-only" in lines[1], r


def test_a_read_only_sqlite_file_and_folder_can_be_read(tmp_path: Path) -> None:
    if (why := _other_user_available()) is not None:
        pytest.skip(why)
    home = tmp_path / "share"
    ref = _filled_registry(home)
    assert not (home / "hub.db-wal").exists()  # the last connection checkpointed and removed it
    out = tmp_path / "exported"
    out.mkdir()
    os.chmod(out, 0o777)
    for path in [home / "hub.db", *home.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    os.chmod(home, 0o555)
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    proc = _run_as_other_user(_READ_EVERYTHING, str(home), ref, str(out))
    assert proc.returncode == 0, proc.stderr
    _check_read_only_results(json.loads(proc.stdout))
    assert list(out.iterdir())  # the export was written
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before  # nothing in the share changed


def test_a_registry_on_a_read_only_mount(tmp_path: Path) -> None:
    home, mount = tmp_path / "home", tmp_path / "ro"
    ref = _filled_registry(home)
    mount.mkdir()
    bind = subprocess.run(["mount", "--bind", str(home), str(mount)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True)
        assert ro.returncode == 0, ro.stderr
        with Hub.open(mount) as hub:
            assert hub.read_only
            assert hub.resolve(ref).ref == ref and hub.verify() == [] and hub.metrics(ref)
            assert hub.store.read(hub.resolve(ref).digest, ref)
            with pytest.raises(ReadOnlyRegistry, match="read-only"):
                hub.set_tag(ref, "k", "v")
            with pytest.raises(ReadOnlyRegistry, match="read-only"):
                hub.register(_model(), "a", task="t", name="lora")
            with pytest.raises(ReadOnlyRegistry, match="read-only"):
                hub.gc(grace_s=0)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- 6. an interrupted first open --------------------------------------------------------------------------


def test_an_interrupted_first_open_is_finished_by_the_next(tmp_path: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    schema_mod.upgrade(engine, "0001")  # the first open was killed after its first migration
    engine.dispose()
    with Hub.open(tmp_path, db_url) as hub:
        hub.add_task("t")
        assert hub.tasks()[0].name == "t"
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert schema_mod.schema_state(conn).up_to_date
    engine.dispose()


# -- 7. a write lock held past the busy timeout ------------------------------------------------------------


def test_a_held_write_lock_is_a_clear_busy_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _filled_registry(tmp_path)
    monkeypatch.setenv("ADAPTER_HUB_BUSY_TIMEOUT", "0.3")
    holder = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        result = CliRunner().invoke(main, ["--home", str(tmp_path), "tag", "set", ref, "k=v"])
        assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
        assert "is busy" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        with Hub.open(tmp_path) as hub:
            assert hub.resolve(ref).ref == ref  # reads still work in WAL mode
            with pytest.raises(RegistryBusy, match="nothing was written"):
                hub.register(_model(), "a", task="t", name="lora")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Hub.open(tmp_path) as hub:
        assert [v.number for v in hub.versions("t/lora")] == [1] and hub.resolve(ref).tags == {}
        with hub._session() as s:
            assert s.scalars(select(UploadRow)).all() == []


# -- 8. a full disk ----------------------------------------------------------------------------------------


def _big_model() -> AdapterModel:
    model = AdapterModel(torch.nn.Sequential(torch.nn.Linear(256, 256)))
    model.add_adapter("a", LoRAConfig(r=64, alpha=64, targets=["0"], init="gaussian"))
    return model


def test_a_full_filesystem_is_one_line_and_the_registry_stays_consistent(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        model = _big_model()  # about 130 KB an artifact: the 1 MiB filesystem fills after a few
        hub = Hub.open(small)
        hub.add_backbone("lin", model.backbone)
        hub.add_task("t")
        registered, error = [], None
        for i in range(20):
            _vary(model, float(i))
            try:
                registered.append(hub.register(model, "a", task="t", name="big").number)
            except RegistryError as exc:
                error = exc
                break
        assert isinstance(error, StorageFull), error
        assert "is full" in str(error) and "\n" not in str(error)
        assert registered == list(range(1, len(registered) + 1)) and len(registered) >= 2
        assert [v.number for v in hub.versions("t/big")] == registered  # no half-registered version
        assert hub.verify() == []
        hub.gc(grace_s=0)  # an orphan blob or upload, if any, goes
        assert hub.verify() == [] and len(_blobs(small)) == len(registered)
        hub.close()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
