"""Which store a registry records, and getting out of trouble with it (a real SeaweedFS server where S3 matters):
only a new registry records its client's --store; the `store` commands work whatever state the recorded store is
in; a lookalike store (another endpoint, an unmounted share) or another registry's folder is refused, never bound;
ETags that are not the MD5 (SSE-KMS) do not fail registrations; store options keep strings as strings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, seeded_backbone, trained_model
from s3_helpers import SeaweedS3

from adapter_hub.registry import Hub
from adapter_hub.registry import object_store as object_store_module
from adapter_hub.registry.errors import RegistryError, StoreMismatch
from adapter_hub.registry.object_store import ObjectStore
from adapter_hub.registry.stores import parse_options


def _hub(home: Path, url: str | None, store: str | None = None, **kwargs: Any) -> Hub:
    hub = Hub.open(home, url, store=store, **kwargs)
    if not hub.backbones():
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
    return hub


def test_only_a_new_registry_records_its_clients_store(tmp_path: Path, s3_url: str, s3_env: SeaweedS3) -> None:
    """An existing registry opened with --store is refused and records nothing, whether the store is reachable
    or not: every later client (and `store show`) still opens it."""
    home = tmp_path / "home"
    with Hub.open(home) as hub:  # created without --store: each machine's HOME/artifacts, no artifact yet
        assert hub.store_url is None
    for store in ("s3://no-such-bucket-here/hub", s3_url):
        with pytest.raises(StoreMismatch, match=rf"not in {store} .*store copy {store} --set"):
            Hub.open(home, store=store)
        refused = run_cli(home, "--store", store, "ls")
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    with Hub.open(home) as hub:
        assert hub.store_url is None and hub.backbones() == []
    shown = run_cli(home, "store", "show")
    assert shown.returncode == 0 and "recorded: none" in shown.stdout, shown.stderr
    assert s3_env.filesystem().find(s3_url[5:]) == []  # the refused bucket was not even bound
    # a new registry whose store is refused (unreachable) records nothing: the next open, fixed, creates it
    db = f"sqlite:///{tmp_path / 'new.db'}"
    with pytest.raises(RegistryError, match="no-such-bucket-here"):
        Hub.open(tmp_path / "new", db, store="s3://no-such-bucket-here/hub")
    with Hub.open(tmp_path / "new", db, store=s3_url) as hub:
        assert hub.store_url == s3_url and hub.store.identity() == hub.registry_id()


def test_a_version_registered_while_another_client_opens_with_store_keeps_its_blob(
    tmp_path: Path, pg_url: str, s3_url: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine A (no --store) registers the registry's first version while machine B opens it with --store: B is
    refused and the registry keeps A's store, whatever moment A's version commits at."""
    a = _hub(tmp_path / "a", pg_url)
    registered = []
    real = Hub._holds_artifacts

    def holds(self: Hub, s: Any) -> bool:
        result = real(self, s)
        if not registered:  # A commits its first version right after B's look at the registry
            registered.append(a.register(trained_model(1), "a", task="t", name="x"))
        return result

    monkeypatch.setattr(Hub, "_holds_artifacts", holds)
    with pytest.raises(StoreMismatch, match=rf"store copy {s3_url} --set"):
        Hub.open(tmp_path / "b", pg_url, store=s3_url)
    monkeypatch.setattr(Hub, "_holds_artifacts", real)
    if not registered:
        registered.append(a.register(trained_model(1), "a", task="t", name="x"))
    a.close()
    with Hub.open(tmp_path / "a", pg_url) as hub:
        assert hub.store_url is None and hub.verify() == [] and hub.resolve(registered[0].ref).digest
    assert s3_env.filesystem().find(s3_url[5:]) == []


def test_store_commands_recover_a_registry_whose_store_is_broken(
    tmp_path: Path, s3_url: str, s3_env: SeaweedS3
) -> None:
    home = tmp_path / "home"
    with _hub(home, None, store=s3_url) as hub:
        v = hub.register(trained_model(1), "a", task="t", name="x")
    assert run_cli(home, "store", "copy", "local").returncode == 0  # a copy of every blob on this machine
    fs = s3_env.filesystem()
    fs.rm(s3_url[5:].split("/")[0], recursive=True)  # the bucket is gone
    with pytest.raises(RegistryError, match="does not exist"):
        Hub.open(home)
    shown = run_cli(home, "store", "show")
    assert shown.returncode == 0 and f"recorded: {s3_url}" in shown.stdout and "cannot be read" in shown.stdout
    moved = run_cli(home, "store", "set", "local")  # the target is checked, not the broken store
    assert moved.returncode == 0, moved.stderr
    with Hub.open(home) as hub:
        assert hub.store_url is None and hub.verify() == [] and hub.read_artifact(v.ref)[1]
    # a store that belongs to another registry: `store show` says so, `store copy --set` moves away from it
    with _hub(tmp_path / "other", None, store=f"s3://{s3_env.make_bucket()}/hub") as hub:
        other = hub.store.url
    with Hub.open(home) as hub:
        Path(hub.store.url, "REGISTRY").chmod(0o644)
        Path(hub.store.url, "REGISTRY").write_text("someone-else\n")
    assert run_cli(home, "ls").returncode == 1
    assert "the store records someone-else" in run_cli(home, "store", "show").stdout
    refused = run_cli(home, "store", "copy", other, "--set")
    assert refused.returncode == 1 and "belongs to another registry" in refused.stderr
    fresh = f"s3://{s3_env.make_bucket()}/hub"
    moved = run_cli(home, "store", "copy", fresh, "--set")
    assert moved.returncode == 0 and "copied 1 blob(s)" in moved.stdout, moved.stderr
    with Hub.open(home) as hub:
        assert hub.store_url == fresh and hub.verify() == []


def _kms_etags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ETag the server returns becomes 32 hex digits that are not the MD5, as on an SSE-KMS bucket."""
    import s3fs

    real = s3fs.S3FileSystem._call_s3

    def kms(etag: str) -> str:
        return '"' + hashlib.md5((etag.strip('"') + "kms").encode()).hexdigest() + '"'

    async def call(self: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
        out = await real(self, method, *args, **kwargs)
        if isinstance(out, dict):
            if "ETag" in out:
                out["ETag"] = kms(out["ETag"])
            if "CopyObjectResult" in out:
                out["CopyObjectResult"]["ETag"] = kms(out["CopyObjectResult"]["ETag"])
            for item in out.get("Contents") or []:
                if "ETag" in item:
                    item["ETag"] = kms(item["ETag"])
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call)


def test_etags_that_are_not_the_md5_do_not_fail_registrations(
    tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kms_etags(monkeypatch)
    with _hub(tmp_path, sqlite_url, store=s3_url) as hub:
        model = trained_model(1)
        v = hub.register(model, "a", task="t", name="x")
        again = hub.register(model, "a", task="t", name="y")  # present already: judged by its bytes read back
        assert again.digest == v.digest and hub.read_artifact(v.ref)[1] == model.adapter_to_bytes("a")
        assert hub.verify() == [] and list(hub.store.temp_files()) == []
        # a damaged object of the right size is still caught, and replaced by a registration of those bytes
        key = f"{s3_url[5:]}/sha256/{v.digest[:2]}/{v.digest[2:]}"
        data = model.adapter_to_bytes("a")
        s3_env.filesystem().pipe_file(key, bytes([data[0] ^ 1]) + data[1:])
        assert [p.ref for p in hub.verify()] == [v.ref, again.ref]
        assert hub.store.put(data) == v.digest and hub.verify() == []


def test_a_lookalike_store_is_refused_not_bound(tmp_path: Path, s3_server: SeaweedS3, own_s3_server: SeaweedS3) -> None:
    """The registry records s3://adapters…/hub on the team's server; a client whose endpoint is another server
    with a bucket of the same name is refused, instead of registering into it."""
    bucket = s3_server.make_bucket()
    own_s3_server.make_bucket(bucket)
    url, db = f"s3://{bucket}/hub", f"sqlite:///{tmp_path / 'hub.db'}"
    team, dev = {"endpoint_url": s3_server.endpoint}, {"endpoint_url": own_s3_server.endpoint}
    with _hub(tmp_path / "team", db, store=url, store_options=team) as hub:
        hub.register(trained_model(1), "a", task="t", name="x")
    with pytest.raises(StoreMismatch, match="does not record this registry: a different endpoint, or a share th"):
        Hub.open(tmp_path / "dev", db, store_options=dev)
    assert own_s3_server.filesystem().find(bucket) == []  # not bound, nothing written
    with Hub.open(tmp_path / "team2", db, store_options=team) as hub:
        assert hub.verify() == [] and [v.number for v in hub.versions("t/x")] == [1]


def test_an_unmounted_share_is_refused_and_an_old_store_is_still_bound(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    share = tmp_path / "mnt" / "share"
    with _hub(tmp_path / "a", db, store=str(share)) as hub:
        v = hub.register(trained_model(1), "a", task="t", name="x")
    (tmp_path / "mnt").rename(tmp_path / "mnt.real")  # machine B: the share is not mounted
    (tmp_path / "mnt").mkdir()
    with pytest.raises(StoreMismatch, match="does not record this registry: a different endpoint, or a share"):
        Hub.open(tmp_path / "b", db)
    assert list((tmp_path / "mnt").iterdir()) == []
    (tmp_path / "mnt").rmdir()
    (tmp_path / "mnt.real").rename(tmp_path / "mnt")
    # a store written before stores recorded their registry (no REGISTRY file), holding the blobs the database
    # references: bound again
    (share / "REGISTRY").unlink()
    with Hub.open(tmp_path / "c", db) as hub:
        assert hub.store.identity() == hub.registry_id() and hub.verify() == [] and hub.read_artifact(v.ref)[1]


def test_store_set_and_copy_refuse_another_registrys_folder(tmp_path: Path) -> None:
    """An old registry's folder (blobs, no REGISTRY file) is never taken over: gc would delete its blobs."""
    with _hub(tmp_path / "old", None) as old:
        v = old.register(trained_model(1), "a", task="t", name="x")
    (tmp_path / "old" / "artifacts" / "REGISTRY").unlink()
    blob = tmp_path / "old" / "artifacts" / "sha256" / v.digest[:2] / v.digest[2:]
    home = tmp_path / "new"
    with _hub(home, None) as hub:
        hub.register(trained_model(2), "a", task="t", name="x")
    for command in (["store", "set"], ["store", "copy"], ["store", "copy", "--set"]):
        refused = run_cli(home, *command, str(tmp_path / "old" / "artifacts"))
        assert (
            refused.returncode == 1
            and "holds blobs that database" in refused.stderr
            and "does not reference" in (refused.stderr)
        )
    assert not (tmp_path / "old" / "artifacts" / "REGISTRY").exists()
    with Hub.open(home) as hub:
        assert hub.store_url is None
        hub.gc(grace_s=0)
    assert blob.is_file()


def test_store_local_is_home_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    with Hub.open(home, store="local") as hub:
        assert hub.store_url is None and Path(hub.store.url) == (home / "artifacts").resolve()
    monkeypatch.setenv("ADAPTER_HUB_STORE", "local")
    done = run_cli(home, "store", "show")
    assert done.returncode == 0 and "recorded: none" in done.stdout
    assert run_cli(home, "ls").returncode == 0
    assert not (tmp_path / "local").exists()


def test_store_options_keep_strings_as_strings() -> None:
    assert parse_options(["secret=00123", "ratio=2.5", "n=10", "flag=true", "off=false", "none=null", "x=NaN",
                          "neg=-3", "e=1e3", "zero=0", "word=True", "z=0.50"]) == {  # fmt: skip
        "secret": "00123", "ratio": 2.5, "n": 10, "flag": True, "off": False, "none": None, "x": "NaN",
        "neg": -3, "e": 1000.0, "zero": 0, "word": "True", "z": 0.5}  # fmt: skip
    assert isinstance(parse_options(["n=10"])["n"], int)
    for pairs in (["a.b=1", "a=2"], ["a=2", "a.b=1"], ["a.b.c=1", "a.b=2"], ["a.b=2", "a.b.c=1"]):
        with pytest.raises(RegistryError, match="conflicts with") as caught:
            parse_options(pairs)
        assert "\n" not in str(caught.value)


def test_store_options_conflict_is_one_line_in_the_cli(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--store-option", "a.b=1", "--store-option", "a=2", "ls")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and "conflicts with" in done.stderr


def test_verify_reads_a_bounded_number_of_bytes_at_once(
    s3_url: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ObjectStore(s3_url)
    size = 2**20
    digests = [store.put(os.urandom(size)) for _ in range(5)]
    monkeypatch.setattr(object_store_module, "_BATCH_BYTES", 2 * size)
    batches: list[int] = []
    real_cat = store.fs.cat

    def cat(paths: list[str], **kwargs: Any) -> Any:
        batches.append(len(paths) if isinstance(paths, list) else 1)
        return real_cat(paths, **kwargs)

    monkeypatch.setattr(store.fs, "cat", cat)
    assert store.problems({d: size for d in digests}) == {d: None for d in digests}
    assert batches == [2, 2, 1]
    batches.clear()  # a size the database does not record (a backbone's files): read alone
    assert store.problems({digests[0]: None, digests[1]: size, digests[2]: size}) == dict.fromkeys(digests[:3])
    assert batches == [1, 2]


def test_store_commands_work_where_the_recorded_stores_package_is_missing(tmp_path: Path) -> None:
    """The database records a store this machine cannot even set up (gcsfs is not installed here): every other
    command says why in one line; `store show` shows it and `store set local` moves the registry away from it."""
    from sqlalchemy import update

    from adapter_hub.registry.models import RegistryRow

    home = tmp_path / "home"
    with _hub(home, None) as hub:
        v = hub.register(trained_model(1), "a", task="t", name="x")
        with hub.engine.begin() as conn:  # as another machine's `store set gs://…` would have left it
            conn.execute(update(RegistryRow).where(RegistryRow.id == 1).values(store_url="gs://team/hub"))
    refused = run_cli(home, "ls")
    assert refused.returncode == 1 and "needs the gcsfs package" in refused.stderr
    shown = run_cli(home, "store", "show")
    assert shown.returncode == 0 and "recorded: gs://team/hub" in shown.stdout and "gcsfs" in shown.stdout
    copy = run_cli(home, "store", "copy", str(tmp_path / "elsewhere"))
    assert copy.returncode == 1 and "needs the gcsfs package" in copy.stderr
    moved = run_cli(home, "store", "set", "local")  # this machine's HOME/artifacts holds every blob
    assert moved.returncode == 0, moved.stderr
    with Hub.open(home) as hub:
        assert hub.store_url is None and hub.verify() == [] and hub.read_artifact(v.ref)[1]
