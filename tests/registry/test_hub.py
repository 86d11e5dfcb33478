"""The Hub API on SQLite and PostgreSQL: versions, refs, loading, lineage, metrics, aliases, tags, bad input."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from helpers import seeded_backbone
from sqlalchemy import create_engine, func, select, text

from adapter_hub.errors import AdapterHubError, FingerprintMismatch
from adapter_hub.lora import LoRAConfig
from adapter_hub.model import AdapterModel
from adapter_hub.registry import AlreadyExists, ArtifactError, Hub, NotFound, RefError, RegistryError
from adapter_hub.registry.models import VersionRow
from adapter_hub.registry.render import to_mermaid


def make_model(seed: int = 0) -> AdapterModel:
    return AdapterModel(seeded_backbone(seed))


def add_adapter(model: AdapterModel, name: str, *, seed: int, r: int = 2, heads: tuple[str, ...] = ()) -> None:
    """A LoRA adapter with random (non-zero) A and B, so that different seeds give different bytes."""
    model.add_adapter(name, LoRAConfig(r=r, alpha=2 * r, targets=["0", "4"], heads=list(heads)))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.adapters[name].parameters():
            p.normal_()


def blob_files(home: Path) -> list[Path]:
    root = home / "artifacts" / "sha256"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def hub(tmp_path: Path, db_url: str):
    with Hub.open(tmp_path / "home", db_url) as h:
        h.add_backbone("tiny", seeded_backbone(0), architecture="tiny-conv")
        h.add_task("digits", domain="mnist", num_classes=10, metric="val/accuracy")
        yield h


def test_versions_are_numbered_and_resolve_by_number_alias_and_latest(hub: Hub) -> None:
    model = make_model()
    contents = []
    for seed in range(3):
        add_adapter(model, f"a{seed}", seed=seed)
        contents.append(model.adapter_to_bytes(f"a{seed}"))
        v = hub.register(model, f"a{seed}", task="digits", name="lora")
        assert (v.number, v.ref) == (seed + 1, f"digits/lora:{seed + 1}")
        # the stored blob is named by the sha256 of exactly the model's bytes
        assert v.digest == hashlib.sha256(contents[-1]).hexdigest() and v.size == len(contents[-1])
        assert hub.store.path(v.digest).read_bytes() == contents[-1]
    assert hub.resolve("digits/lora").number == 3
    assert hub.resolve("digits/lora@latest").number == 3
    hub.set_alias("digits/lora:2", "production")
    assert hub.resolve("digits/lora@production").number == 2
    hub.set_alias("digits/lora:1", "production")  # moving an alias
    assert hub.resolve("digits/lora@production").number == 1
    assert hub.set_tag("digits/lora:1", "owner", "vision").tags == {"owner": "vision"}
    assert [v.number for v in hub.versions("digits/lora")] == [1, 2, 3]

    # soft delete: the row stays, the number is never reused, latest moves back, the alias goes
    hub.delete("digits/lora:3")
    hub.delete("digits/lora@production")
    assert hub.resolve("digits/lora").number == 2
    with pytest.raises(NotFound, match="was deleted"):
        hub.resolve("digits/lora:3")
    with pytest.raises(NotFound, match="no alias 'production'"):
        hub.resolve("digits/lora@production")
    assert hub.resolve("digits/lora:3", include_deleted=True).status == "deleted"
    v4 = hub.register(model, "a0", task="digits", name="lora")
    assert v4.number == 4
    assert [v.number for v in hub.versions("digits/lora", include_deleted=True)] == [1, 2, 3, 4]
    assert [v.number for v in hub.versions("digits/lora")] == [2, 4]
    # v4 has the bytes of v1: one blob, two versions
    assert v4.digest == hashlib.sha256(contents[0]).hexdigest()
    assert len(blob_files(hub.home)) == 3
    summary = hub.ls("digits")[0]
    assert (summary.name, summary.versions, summary.latest) == ("lora", 2, 4)


def test_load_into_restores_the_exact_adapter(hub: Hub) -> None:
    model = make_model()
    add_adapter(model, "src", seed=7, heads=("4",))
    original = model.adapter_to_bytes("src")
    v = hub.register(model, "src", task="digits", name="lora", description="first")
    assert v.trainable_params == model.num_trainable_parameters("src")
    assert v.config == model.adapter_config("src").to_dict()

    fresh = make_model()
    hub.load_into(fresh, v.ref, name="loaded")
    assert fresh.adapter_to_bytes("loaded") == model.adapter_to_bytes("src") == original
    x = torch.randn(2, 3, 8, 8)
    model.activate("src")
    fresh.activate("loaded")
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_wrong_backbone_is_refused_unless_forced(hub: Hub) -> None:
    model = make_model(0)
    add_adapter(model, "a", seed=1)
    v = hub.register(model, "a", task="digits", name="lora")
    other = make_model(seed=5)  # same architecture, other weights: another fingerprint
    with pytest.raises(FingerprintMismatch, match="digits/lora:1"):
        hub.load_into(other, v.ref)
    assert "lora" not in other.adapters
    hub.load_into(other, v.ref, force=True)
    assert "lora" in other.adapters
    # registering from an unregistered backbone is refused before anything is written
    blobs = blob_files(hub.home)
    add_adapter(other, "b", seed=2)
    with pytest.raises(NotFound, match="no registered backbone"):
        hub.register(other, "b", task="digits", name="lora")
    with pytest.raises(FingerprintMismatch):
        hub.register(other, "b", task="digits", name="lora", backbone="tiny")
    assert blob_files(hub.home) == blobs
    assert [v.number for v in hub.versions("digits/lora")] == [1]


def test_corrupt_or_missing_blob_names_the_ref_and_digest(hub: Hub) -> None:
    model = make_model()
    add_adapter(model, "a", seed=1)
    add_adapter(model, "b", seed=2)
    va = hub.register(model, "a", task="digits", name="a")
    vb = hub.register(model, "b", task="digits", name="b")
    assert hub.verify() == []
    path = hub.store.path(va.digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    hub.store.path(vb.digest).unlink()
    with pytest.raises(ArtifactError, match=f"digits/a:1 is corrupt: expected sha256:{va.digest}"):
        hub.load_into(make_model(), "digits/a")
    with pytest.raises(ArtifactError, match=f"digits/b:1 is missing: sha256:{vb.digest}"):
        hub.load_into(make_model(), "digits/b:1")
    problems = {p.ref: p.problem for p in hub.verify()}
    assert set(problems) == {"digits/a:1", "digits/b:1"}
    assert "corrupt" in problems["digits/a:1"] and "missing" in problems["digits/b:1"]
    assert [p.ref for p in hub.verify("digits/b")] == ["digits/b:1"]


def test_lineage_graph_holds_ancestors_and_descendants(hub: Hub) -> None:
    model = make_model()
    for seed, name in enumerate("abcdef"):
        add_adapter(model, name, seed=seed)
    hub.add_task("rotated", domain="rotated")
    a = hub.register(model, "a", task="digits", name="base")
    b = hub.register(model, "b", task="digits", name="base", parents=[(a.ref, "finetuned_from")])
    c = hub.register(model, "c", task="rotated", name="t", parents=[(b.ref, "transferred_from")])
    d = hub.register(
        model,
        "d",
        task="rotated",
        name="mix",
        parents=[
            {"ref": c.ref, "relation": "composed_from", "weight": 0.7, "method": "ties", "params": {"density": 0.2}},
            (a.ref, "composed_from", 0.3, "ties"),
        ],
    )
    e = hub.register(model, "e", task="rotated", name="ft", parents=[(d.ref, "finetuned_from")])
    hub.register(model, "f", task="digits", name="unrelated")
    g = hub.lineage(c.ref)
    assert set(g.versions) == {a.ref, b.ref, c.ref, d.ref, e.ref}
    assert g.ancestors() == {a.ref, b.ref}
    assert g.descendants() == {d.ref, e.ref}
    composed = {(x.parent, x.weight, x.method) for x in g.parents(d.ref)}
    assert composed == {(c.ref, 0.7, "ties"), (a.ref, 0.3, "ties")}
    assert next(x for x in g.parents(d.ref) if x.parent == c.ref).params == {"density": 0.2}
    assert hub.lineage(e.ref).ancestors() == {a.ref, b.ref, c.ref, d.ref}
    mermaid = to_mermaid(g)
    nodes = dict(re.findall(r'^\s+(v\d+)\["([^"]+)"\]', mermaid, re.M))
    arrows = {(nodes[x], nodes[y]) for x, y in re.findall(r"(v\d+) -->\|[^|]*\| (v\d+)", mermaid)}
    assert arrows == {(x.parent, x.child) for x in g.edges} and len(arrows) == 5
    with pytest.raises(RegistryError, match="unknown lineage relation"):
        hub.register(model, "f", task="digits", name="x", parents=[(a.ref, "copied_from")])
    with pytest.raises(NotFound, match="digits/base:9 does not exist"):
        hub.register(model, "f", task="digits", name="x", parents=[("digits/base:9", "finetuned_from")])


def test_metric_comparison_takes_latest_value_and_best_by_direction(hub: Hub) -> None:
    model = make_model()
    add_adapter(model, "a", seed=1)
    v1 = hub.register(model, "a", task="digits", name="m", metrics={"val/accuracy": 0.80})
    v2 = hub.register(model, "a", task="digits", name="m", metrics={"val/accuracy": 0.90})
    hub.log_metric(v1.ref, "val/accuracy", 0.95, split="val", step=10)  # later step supersedes
    hub.log_metric(v1.ref, "val/accuracy", 0.50, split="val", step=5)
    for ref, loss in ((v1.ref, 0.4), (v2.ref, 0.3)):
        hub.log_metric(ref, "loss", loss, split="test")
    table = hub.compare_metrics([v1.ref, v2.ref])
    assert table.value(v1.ref, "val/accuracy", "val") == 0.95
    assert table.value(v2.ref, "val/accuracy", "val") == 0.90
    assert table.best[table.key("val/accuracy", "val")] == v1.ref
    assert table.best[table.key("loss", "test")] == v2.ref  # lower is better for a loss
    assert len(hub.metrics(v1.ref)) == 4  # every logged value is kept
    with pytest.raises(RegistryError, match="finite"):
        hub.log_metric(v1.ref, "val/accuracy", float("nan"))


@pytest.mark.parametrize(
    "ref", ["digits", "digits/", "/lora", "digits/lora:0", "digits/lora:x", "digits/lora@", "a/b/c", "dig its/lora"]
)
def test_malformed_refs(hub: Hub, ref: str) -> None:
    with pytest.raises(RefError, match="malformed ref"):
        hub.resolve(ref)


def test_unknown_names_suggest_close_ones_and_duplicates_are_refused(hub: Hub) -> None:
    model = make_model()
    add_adapter(model, "a", seed=1)
    hub.register(model, "a", task="digits", name="lora-r8")
    with pytest.raises(NotFound, match=r"unknown adapter digits/lora-r9 \(did you mean digits/lora-r8\?\)"):
        hub.resolve("digits/lora-r9")
    with pytest.raises(NotFound, match=r"unknown task 'digit' \(did you mean digits\?\)"):
        hub.resolve("digit/lora-r8")
    with pytest.raises(NotFound, match=r"digits/lora-r8:5 does not exist: digits/lora-r8 has versions 1..1"):
        hub.resolve("digits/lora-r8:5")
    with pytest.raises(NotFound, match=r"unknown task 'digit' \(did you mean digits\?\)"):
        hub.register(model, "a", task="digit", name="x")
    with pytest.raises(AlreadyExists, match="task 'digits' already exists"):
        hub.add_task("digits")
    with pytest.raises(AlreadyExists, match="backbone 'tiny' already exists"):
        hub.add_backbone("tiny", seeded_backbone(3))
    assert hub.add_backbone("tiny", seeded_backbone(0), exist_ok=True).name == "tiny"
    with pytest.raises(AlreadyExists, match="adapter digits/lora-r8 already exists"):
        hub.add_adapter("digits", "lora-r8")
    with pytest.raises(RegistryError, match="invalid task name"):
        hub.add_task("has space")
    with pytest.raises(RegistryError, match="reserved"):
        hub.set_alias("digits/lora-r8:1", "latest")
    with pytest.raises(NotFound, match="holds no adapter 'nope'"):
        hub.register(model, "nope", task="digits")
    # none of the refused calls wrote a row
    engine = create_engine(hub.engine.url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(VersionRow)) == 1
    engine.dispose()


def test_gc_removes_only_unreferenced_old_blobs(hub: Hub) -> None:
    model = make_model()
    add_adapter(model, "a", seed=1)
    add_adapter(model, "b", seed=2)
    keep = hub.register(model, "a", task="digits", name="a")
    dropped = hub.register(model, "b", task="digits", name="b")
    orphan = hub.store.put(b"bytes that no version references")
    tmp = hub.store.tmp_dir / "left-by-a-crash.part"
    tmp.write_bytes(b"partial")
    assert hub.gc().removed == []  # everything is younger than the default grace period
    report = hub.gc(grace_s=0)
    assert report.removed == [orphan] and report.temp_files == 1
    assert not tmp.exists() and not hub.store.path(orphan).exists()
    hub.delete(dropped.ref)
    assert hub.gc(grace_s=0).removed == []  # a soft-deleted version keeps its blob…
    report = hub.gc(grace_s=0, purge_deleted=True)  # …until purged
    assert report.removed == [dropped.digest] and report.purged_versions == [dropped.ref]
    assert hub.resolve(dropped.ref, include_deleted=True).status == "purged"
    assert hub.verify() == []
    assert [p.name for p in blob_files(hub.home)] == [keep.digest[2:]]


def test_schema_newer_outdated_or_foreign_database_is_refused(tmp_path: Path, db_url: str) -> None:
    with Hub.open(tmp_path, db_url) as hub:
        hub.add_task("digits")  # a database with data is never migrated by itself (one without is: see below)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(AdapterHubError, match="revision 9999, newer than this adapter-hub"):
        Hub.open(tmp_path, db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    with pytest.raises(AdapterHubError, match=r"older than this adapter-hub .*adapter-hub db upgrade"):
        Hub.open(tmp_path, db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    with pytest.raises(AdapterHubError, match="not a registry"):
        Hub.open(tmp_path, db_url)
    engine.dispose()


def test_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterHubError, match="cannot open database postgresql"):
        Hub.open(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(AdapterHubError, match="not a database URL"):
        Hub.open(tmp_path, "no-such-scheme:/x")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(AdapterHubError, match="cannot open database sqlite"):
        Hub.open(tmp_path, f"sqlite:///{tmp_path}/a-file/hub.db")
    (tmp_path / "not-a-db").write_text("plain text, not SQLite" * 100)
    with pytest.raises(AdapterHubError, match="cannot open database sqlite"):
        Hub.open(tmp_path, f"sqlite:///{tmp_path}/not-a-db")


def test_a_task_takes_any_whole_number_of_classes_in_range(hub: Hub) -> None:
    import numpy as np

    assert hub.add_task("np", num_classes=np.int64(10)).output == {"num_classes": 10}
    for bad, message in ((0, "at least 1"), (10**20, "at most 1,000,000"), (2.5, "a whole number"), (True, "whole")):
        with pytest.raises(RegistryError, match=message):
            hub.add_task("bad", num_classes=bad)
    with pytest.raises(RegistryError, match="metric name cannot be empty"):
        hub.add_task("bad", metric=" ")
    assert "bad" not in [t.name for t in hub.tasks()]


def test_a_digest_or_token_that_is_not_hex_never_names_a_file(hub: Hub) -> None:
    store = hub.store
    for digest in ("../../etc/passwd", "A" * 64, "0" * 63, ""):
        with pytest.raises(ArtifactError, match="is not a sha256 digest"):
            store.path(digest)
    with pytest.raises(ArtifactError, match="is not hex"):
        store.temp_path("../x")
    assert store.path("0" * 64).parent.name == "00"
