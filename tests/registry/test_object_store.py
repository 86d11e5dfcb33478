"""The artifact store in S3 (a real SeaweedFS server, see tests/s3_helpers.py): the local store's guarantees —
content addressing, write-then-publish, verified reads, verify, gc by age, one store per registry — and the
store URL the database records."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from helpers import run_cli, seeded_backbone, trained_model
from s3_helpers import SeaweedS3

from adapter_hub.registry import Hub
from adapter_hub.registry.errors import ArtifactError, RegistryError, StoreMismatch
from adapter_hub.registry.models import UploadRow
from adapter_hub.registry.object_store import ObjectStore
from adapter_hub.registry.stores import normalise, parse_options


def _hub(home: Path, url: str, store: str | None = None) -> Hub:
    hub = Hub.open(home, url, store=store)
    if not hub.backbones():
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
    return hub


def _key(store_url: str, digest: str) -> str:
    return f"{store_url.removeprefix('s3://')}/sha256/{digest[:2]}/{digest[2:]}"


def test_register_and_load_through_the_bucket(tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3) -> None:
    hub = _hub(tmp_path, sqlite_url, store=s3_url)
    assert isinstance(hub.store, ObjectStore) and hub.store_url == s3_url
    model = trained_model(1)
    data = model.adapter_to_bytes("a")
    v = hub.register(model, "a", task="t", name="x")
    fs = s3_env.filesystem()
    # published under its sha256, bytes intact, no temporary object left, the bucket bound to this registry
    assert fs.cat_file(_key(s3_url, v.digest)) == data and hashlib.sha256(data).hexdigest() == v.digest
    assert list(hub.store.temp_files()) == []
    assert fs.cat_file(f"{s3_url[5:]}/REGISTRY").decode().strip() == hub.registry_id()
    again = hub.register(model, "a", task="t", name="y")  # the same bytes: the object is left as it is
    assert again.digest == v.digest and [d for d, _ in hub.store.digests()] == [v.digest]
    fresh = trained_model(2)
    hub.load_into(fresh, v.ref, name="loaded")
    assert fresh.adapter_to_bytes("loaded") == data
    assert hub.verify() == []
    hub.close()


def test_the_database_records_the_store_and_every_client_uses_it(
    tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _hub(tmp_path / "a", sqlite_url, store=s3_url)
    v = hub.register(trained_model(1), "a", task="t", name="x")
    hub.close()
    # another home, no --store: the recorded store; the home's own artifacts/ is never written
    with Hub.open(tmp_path / "b", sqlite_url) as other:
        assert other.store.url == s3_url and other.read_artifact(v.ref)[1]
    assert not (tmp_path / "b" / "artifacts").exists()
    # a client configured for another store gets one line, whether by argument or environment
    other_bucket = f"s3://{s3_env.make_bucket()}/hub"
    with pytest.raises(StoreMismatch, match=rf"keeps its artifacts in {s3_url}, not in {other_bucket}"):
        Hub.open(tmp_path / "b", sqlite_url, store=other_bucket)
    with pytest.raises(StoreMismatch, match=rf"keeps its artifacts in {s3_url}, not in .*artifacts"):
        Hub.open(tmp_path / "b", sqlite_url, store=str(tmp_path / "b" / "artifacts"))  # the folder, named
    monkeypatch.setenv("ADAPTER_HUB_STORE", other_bucket + "/")
    with pytest.raises(StoreMismatch, match="ADAPTER_HUB_STORE"):
        Hub.open(tmp_path / "b", sqlite_url)
    monkeypatch.setenv("ADAPTER_HUB_STORE", s3_url + "/")  # the same store, spelt with a slash: fine
    Hub.open(tmp_path / "b", sqlite_url).close()
    # a registry that keeps artifacts locally refuses a client that expects a bucket, naming the way to move
    local = f"sqlite:///{tmp_path / 'local.db'}"
    with Hub.open(tmp_path / "c", local, store=str(tmp_path / "c" / "artifacts")) as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
        hub.register(trained_model(1), "a", task="t", name="x")
    with pytest.raises(StoreMismatch, match=r"store copy .* --set"):
        Hub.open(tmp_path / "c", local, store=other_bucket)


def test_a_corrupt_or_missing_object_is_caught_on_read_and_by_verify(
    tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3
) -> None:
    hub = _hub(tmp_path, sqlite_url, store=s3_url)
    model = trained_model(1)
    v = hub.register(model, "a", task="t", name="x")
    w = hub.register(trained_model(2), "a", task="t", name="x")
    fs = s3_env.filesystem()
    data = fs.cat_file(_key(s3_url, v.digest))
    fs.pipe_file(_key(s3_url, v.digest), data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size
    with pytest.raises(ArtifactError, match=rf"artifact of t/x:1 is corrupt: expected sha256:{v.digest}"):
        hub.load_into(model, v.ref, name="b")
    fs.rm_file(_key(s3_url, w.digest))
    with pytest.raises(ArtifactError, match=rf"artifact of t/x:2 is missing: sha256:{w.digest} \(s3://"):
        hub.read_artifact(w.ref)
    problems = {p.ref: p.problem for p in hub.verify()}
    assert problems == {"t/x:1": f"corrupt blob: expected sha256:{v.digest}, found sha256:"
                        f"{hashlib.sha256(data[:-1] + bytes([data[-1] ^ 1])).hexdigest()}",
                        "t/x:2": f"missing blob sha256:{w.digest}"}  # fmt: skip
    # registering the same bytes again republishes the damaged object instead of trusting it
    assert hub.register(model, "a", task="t", name="again").digest == v.digest
    assert fs.cat_file(_key(s3_url, v.digest)) == data
    assert [p.ref for p in hub.verify()] == ["t/x:2"]
    hub.close()


def test_gc_collects_by_the_objects_last_modified_time(
    tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3
) -> None:
    hub = _hub(tmp_path, sqlite_url, store=s3_url)
    kept = hub.register(trained_model(1), "a", task="t", name="x")
    deleted = hub.register(trained_model(2), "a", task="t", name="x")
    hub.delete(deleted.ref)
    orphan = hub.store.put(b"left by a crashed registration")
    fs = s3_env.filesystem()
    fs.pipe_file(f"{s3_url[5:]}/tmp/{'ab' * 16}.part", b"a temporary object of a crashed upload")
    fs.pipe_file(f"{s3_url[5:]}/tmp/{'cd' * 16}.part", b"an upload in flight")
    young = hub.gc(grace_s=3600)
    assert young.removed == [] and young.temp_files == 0, "younger than the grace period: kept"
    time.sleep(1.1)  # S3's last-modified has one-second resolution
    # the object's upload is in flight (its row younger than the grace period): kept, however old the object
    with hub._session(write=True) as s:
        s.add(UploadRow(token="cd" * 16, digest="ef" * 32))
    dry = hub.gc(grace_s=1, dry_run=True)
    assert dry.removed == [orphan] and dry.temp_files == 1 and fs.exists(_key(s3_url, orphan))
    report = hub.gc(grace_s=1)
    assert report.removed == [orphan] and report.temp_files == 1
    assert report.freed_bytes == len(b"left by a crashed registration") + len(b"a temporary object of a crashed upload")
    assert not fs.exists(_key(s3_url, orphan)) and [t for t, _ in hub.store.temp_files()] == ["cd" * 16]
    assert fs.exists(_key(s3_url, kept.digest)) and fs.exists(_key(s3_url, deleted.digest))
    purge = hub.gc(grace_s=0, purge_deleted=True)
    assert purge.purged_versions == [deleted.ref] and purge.removed == [deleted.digest]
    assert hub.verify() == [] and hub.read_artifact(kept.ref)[1]
    hub.close()


def test_a_bucket_belongs_to_one_registry(tmp_path: Path, s3_url: str, s3_env: SeaweedS3) -> None:
    first = f"sqlite:///{tmp_path / 'first.db'}"
    with _hub(tmp_path / "a", first, store=s3_url) as hub:
        hub.register(trained_model(1), "a", task="t", name="x")
        registry_id = hub.registry_id()
    # a new database pointed at the used bucket (a mistyped --db): refused, nothing created beside it
    second = tmp_path / "second.db"
    with pytest.raises(StoreMismatch, match=r"missing or empty, but the artifact store s3://.* holds blobs"):
        Hub.open(tmp_path / "b", f"sqlite:///{second}", store=s3_url)
    assert not second.exists()
    # the identity object is created only if absent (a conditional put): a second registry never replaces it
    fresh = ObjectStore(f"s3://{s3_env.make_bucket()}/hub")
    assert fresh.identity() is None and fresh.bind("registry-a") == "registry-a"
    assert fresh.bind("registry-b") == "registry-a" and fresh.identity() == "registry-a"
    # a bucket prefix bound to another registry, without blobs: refused as well
    fs = s3_env.filesystem()
    bound = f"s3://{s3_env.make_bucket()}/hub"
    fs.pipe_file(f"{bound[5:]}/REGISTRY", b"another-registry\n")
    with pytest.raises(StoreMismatch, match=r"belongs to another registry \(another-registry\)"):
        Hub.open(tmp_path / "c", f"sqlite:///{tmp_path / 'third.db'}", store=bound)
    assert fs.cat_file(f"{s3_url[5:]}/REGISTRY").decode().strip() == registry_id


def test_store_errors_are_one_line_naming_the_url(tmp_path: Path, sqlite_url: str, s3_env: SeaweedS3) -> None:
    missing = r"^artifact store s3://no-such-bucket-here/hub: bucket 'no-such-bucket-here' does not exist$"
    with pytest.raises(ArtifactError, match=missing):
        Hub.open(tmp_path, sqlite_url, store="s3://no-such-bucket-here/hub")
    t0 = time.monotonic()
    retry_once = {"connect_timeout": 1, "retries": {"max_attempts": 1}}
    dead = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": retry_once}
    with pytest.raises(ArtifactError, match=r"^artifact store s3://b/hub: cannot reach the bucket: ") as caught:
        Hub.open(tmp_path, f"sqlite:///{tmp_path / 'other.db'}", store="s3://b/hub", store_options=dead)
    assert time.monotonic() - t0 < 30 and "\n" not in str(caught.value)
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)
    with pytest.raises(ArtifactError, match=r"^artifact store gs://b/hub needs the gcsfs package, which is not "):
        Hub.open(tmp_path, sqlite_url, store="gs://b/hub")  # gcsfs is not a dependency: said in one line
    for bad in ("s3://", "s3://key:secret@bucket/x", "s3://b/x?versionId=1", "s3://b/../x"):
        with pytest.raises(RegistryError) as caught:
            normalise(bad)
        assert "secret" not in str(caught.value)
    with pytest.raises(RegistryError, match="KEY=VALUE"):
        parse_options(["endpoint_url"])
    assert parse_options(["anon=false", "client_kwargs.region_name=eu-west-1", "max_concurrency=4"]) == {
        "anon": False, "client_kwargs": {"region_name": "eu-west-1"}, "max_concurrency": 4}  # fmt: skip


def test_store_copy_to_the_bucket_and_back(tmp_path: Path, s3_url: str, s3_env: SeaweedS3) -> None:
    """A registry that outgrows one machine moves its artifacts to a bucket (verified), and can move back."""
    home = tmp_path / "home"
    with _hub(home, None) as hub:
        refs = [hub.register(trained_model(i), "a", task="t", name="x").ref for i in range(3)]
        hub.add_backbone("tb", seeded_backbone(0), files=b"tokenizer files")
        digests = {hub.resolve(r).digest for r in refs}
    refused = run_cli(home, "store", "set", s3_url)  # the bucket lacks the blobs: refused, nothing changed
    assert refused.returncode == 1 and f"{s3_url} lacks 4 of the registry's 4 blob(s)" in refused.stderr
    copied = run_cli(home, "store", "copy", s3_url)  # copied and read back; the registry still uses its folder
    assert copied.returncode == 0 and "copied 4 blob(s)" in copied.stdout and "now" not in copied.stdout
    with Hub.open(home) as hub:
        assert hub.store_url is None
    again = run_cli(home, "store", "copy", s3_url, "--set")  # nothing left to copy; then the switch
    assert again.returncode == 0, again.stderr
    assert "copied 0 blob(s)" in again.stdout and "4 already there" in again.stdout and f"now {s3_url}" in again.stdout
    assert {d for d, _ in ObjectStore(s3_url).digests()} == digests | {hashlib.sha256(b"tokenizer files").hexdigest()}
    shown = run_cli(home, "--json", "store", "show")
    assert f'"recorded": "{s3_url}"' in shown.stdout
    # every client now reads the bucket: the local copy can go
    for path in sorted((home / "artifacts" / "sha256").rglob("*"), reverse=True):
        path.chmod(0o700) if path.is_dir() else path.unlink()
    with Hub.open(home) as hub:
        assert [hub.read_artifact(r)[0].ref for r in refs] == refs and hub.verify() == []
        assert hub.backbone_files("tb") == b"tokenizer files"
    assert run_cli(home, "--store", "s3://elsewhere/x", "ls").returncode == 1
    back = run_cli(home, "store", "copy", "local", "--set")
    assert back.returncode == 0 and "copied 4 blob(s)" in back.stdout, back.stderr
    with Hub.open(home) as hub:
        assert hub.store_url is None and hub.verify() == [] and hub.read_artifact(refs[0])[1]


def test_a_registration_never_commits_against_a_store_the_registry_left(
    tmp_path: Path, sqlite_url: str, s3_url: str
) -> None:
    early = _hub(tmp_path, sqlite_url)  # opened while the registry keeps its artifacts locally
    early.register(trained_model(1), "a", task="t", name="x")
    with Hub.open(tmp_path, sqlite_url) as admin:
        from adapter_hub.registry import store_admin

        store_admin.copy(admin, s3_url, set_as_store=True)
    with pytest.raises(StoreMismatch, match=rf"changed to {s3_url} since this client opened it; nothing was written"):
        early.register(trained_model(2), "a", task="t", name="x")
    with pytest.raises(StoreMismatch):
        early.gc(grace_s=0)
    early.close()
    with Hub.open(tmp_path, sqlite_url) as hub:
        assert [v.number for v in hub.versions("t/x")] == [1] and hub.verify() == []


def test_store_set_points_a_new_registry_at_a_bucket(
    tmp_path: Path, s3_url: str, s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The team's first command: `store set` on a new registry; every later client follows the database."""
    done = run_cli(tmp_path / "admin", "store", "set", s3_url)
    assert done.returncode == 0 and done.stdout.strip() == f"the registry's artifact store is now {s3_url}"
    shown = run_cli(tmp_path / "admin", "store", "show").stdout
    assert f"recorded: {s3_url}" in shown and "(the store records " in shown
    with Hub.open(tmp_path / "admin") as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
        v = hub.register(trained_model(1), "a", task="t", name="x")
        assert hub.store_url == s3_url
    # a bad option is one line; an option given to a client is used (here the endpoint), never recorded
    bad = run_cli(tmp_path / "admin", "--store-option", "endpoint_url", "ls")
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stderr
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    checked = run_cli(tmp_path / "admin", "--store-option", f"endpoint_url={s3_env.endpoint}", "verify", "--all")
    assert checked.returncode == 0 and checked.stdout.strip() == "all artifacts: ok", checked.stderr
    with Hub.open(tmp_path / "admin", store_options={"endpoint_url": s3_env.endpoint}) as hub:
        assert hub.resolve(v.ref).digest == v.digest and hub.store_url == s3_url


def test_a_client_never_trusts_an_old_listing_of_the_bucket(
    tmp_path: Path, sqlite_url: str, s3_url: str, s3_env: SeaweedS3
) -> None:
    """Another machine's gc may remove an object this client listed a moment ago: registering those bytes again
    uploads them, instead of believing a cached listing."""
    first = _hub(tmp_path, sqlite_url, store=s3_url)
    model = trained_model(1)
    v = first.register(model, "a", task="t", name="x")
    second = Hub.open(tmp_path, sqlite_url)
    assert [d for d, _ in second.store.digests()] == [v.digest]  # listed here
    first.delete(v.ref)
    assert first.gc(grace_s=0, purge_deleted=True).removed == [v.digest]  # and collected by the other client
    again = second.register(model, "a", task="t", name="y")
    assert again.digest == v.digest and second.read_artifact(again.ref)[1] == model.adapter_to_bytes("a")
    assert s3_env.filesystem().exists(_key(s3_url, v.digest)) and second.verify() == []
    first.close()
    second.close()
