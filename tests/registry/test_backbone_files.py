"""Files stored with a backbone (a Transformers tokenizer): content-addressed in the artifact store, read back
verified, never collected by gc while a backbone names them, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from adapter_hub.registry import AlreadyExists, ArtifactError, Hub, NotFound, RegistryError

FP = "ab" * 32
FILES = b'{"format":"adapter-hub/hf-files","files":{},"version":1}'


@pytest.fixture
def hub(tmp_path: Path, db_url: str):
    with Hub.open(tmp_path / "home", db_url) as h:
        yield h


def test_files_are_stored_by_sha256_recorded_in_the_source_and_read_back_verified(hub: Hub) -> None:
    record = hub.add_backbone("tb", FP, architecture="transformers/BertModel", source={"hf": {"path": "/m"}},
                              files=FILES)  # fmt: skip
    digest = hashlib.sha256(FILES).hexdigest()
    assert record.source == {"hf": {"path": "/m"}, "files": {"sha256": digest, "size": len(FILES)}}
    assert hub.store.path(digest).read_bytes() == FILES and hub.backbone_files("tb") == FILES
    assert hub.verify() == []
    hub.store.path(digest).chmod(0o644)
    hub.store.path(digest).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=f"artifact of backbone 'tb' is corrupt: expected sha256:{digest}"):
        hub.backbone_files("tb")
    assert [(p.ref, p.digest) for p in hub.verify()] == [("backbone tb", digest)]
    hub.store.path(digest).unlink()
    with pytest.raises(ArtifactError, match="artifact of backbone 'tb' is missing"):
        hub.backbone_files("tb")


def test_a_backbone_without_files_and_a_source_that_names_files_itself(hub: Hub) -> None:
    hub.add_backbone("plain", FP)
    with pytest.raises(NotFound, match="backbone 'plain' records no files"):
        hub.backbone_files("plain")
    with pytest.raises(RegistryError, match="'files' entry is set by the registry"):
        hub.add_backbone("fake", FP, source={"files": {"sha256": "../../etc/passwd"}})
    hub.add_backbone("tb", FP, files=FILES)
    with pytest.raises(AlreadyExists, match="backbone 'tb' already exists"):
        hub.add_backbone("tb", FP, files=b"other bytes")
    assert [d for d, _ in hub.store.digests()] == [hashlib.sha256(FILES).hexdigest()], "nothing else stored"
    assert hub.gc(grace_s=0).removed == []


def test_gc_never_collects_a_backbones_files(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_backbone("tb", FP, files=FILES)
    orphan = hub.store.put(b"left by a crashed registration")
    report = hub.gc(grace_s=0, purge_deleted=True)
    assert report.removed == [orphan]
    assert hub.backbone_files("tb") == FILES
    # gc listed the blobs before the backbone committed (its listing does not see the backbone): the
    # decision taken again under the digest's lock still finds the backbone and keeps the blob
    monkeypatch.setattr(Hub, "_backbone_file_digests", lambda self, s: {})
    assert hub.gc(grace_s=0).removed == []
    assert hub.backbone_files("tb") == FILES and hub.verify() == []
