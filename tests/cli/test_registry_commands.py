"""The registry commands, run as a user runs them: `python -m adapter_hub.cli` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TESTS, seeded_backbone, trained_model

from adapter_hub.formats import fingerprint
from adapter_hub.model import AdapterModel
from adapter_hub.registry import Hub, schema
from adapter_hub.registry.db import make_engine


def cli(home: Path, *args: str, ok: bool = True, db: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("ADAPTER_HUB_DB", None)
    env["COLUMNS"] = "200"
    env["ADAPTER_HUB_TRUSTED_FACTORIES"] = "helpers:tiny_backbone"  # export/import rebuild the tests' own factory
    cmd = [sys.executable, "-m", "adapter_hub.cli", "--home", str(home), *(["--db", db] if db else []), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert "Traceback" not in run.stderr, run.stderr
    if ok:
        assert run.returncode == 0, f"{args}: {run.stderr}"
    else:  # a user error: exit code 1 and exactly one line on stderr
        assert run.returncode == 1, f"{args} should fail: {run.stdout}"
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    return run


def as_json(home: Path, *args: str) -> Any:
    return json.loads(cli(home, "--json", *args).stdout)


def cli_all(home: Path, *commands: tuple[str, ...]) -> list[str]:
    """Run independent read-only commands side by side (each pays the interpreter's start-up); stdouts."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return [r.stdout for r in pool.map(lambda args: cli(home, *args), commands)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry set up through the CLI (backbone, task), holding versions registered through the API."""
    home = tmp_path_factory.mktemp("cli") / "home"
    added = cli(home, "backbone", "add", "tiny", "helpers:tiny_backbone", "--seed", "0").stdout
    assert fingerprint(seeded_backbone(0)) in added  # the CLI built the very backbone the tests build
    cli(home, "task", "add", "digits", "--num-classes", "10", "--metric", "val/accuracy")
    with Hub.open(home) as hub:
        v1 = hub.register(trained_model(1), "a", task="digits", name="lora", metrics={"val/accuracy": 0.91})
        hub.register(trained_model(2), "a", task="digits", name="lora", parents=[(v1.ref, "finetuned_from")])
        hub.log_metric("digits/lora:2", "val/accuracy", 0.95)
        hub.add_task("rotated", domain="rotated")
        hub.register(trained_model(3), "a", task="rotated", name="t", parents=[("digits/lora:2", "transferred_from")])
    return home


def test_listings_match_the_api(home: Path) -> None:
    ls_json, table, shown = cli_all(home, ("--json", "ls"), ("ls",), ("show", "--json", "digits/lora:2"))
    with Hub.open(home) as hub:
        assert json.loads(ls_json) == [s.to_dict() for s in hub.ls()]
        version = hub.resolve("digits/lora:2").to_dict()
    assert re.search(r"digits/lora\s*│\s*2\s*│\s*2", table)
    record = json.loads(shown)
    assert {k: record[k] for k in version} == version
    assert [(e["parent"], e["relation"]) for e in record["parents"]] == [("digits/lora:1", "finetuned_from")]
    assert [(e["child"], e["relation"]) for e in record["children"]] == [("rotated/t:1", "transferred_from")]


def test_lineage_formats(home: Path) -> None:
    dot, tree = cli_all(home, ("lineage", "digits/lora:1", "--format", "dot"), ("lineage", "digits/lora:2"))
    names = dict(re.findall(r'^\s+(v\d+) \[label="([^"]+)"', dot, re.M))
    edges = {(names[a], names[b], label) for a, b, label in re.findall(r'(v\d+) -> (v\d+) \[label="([^"]+)"', dot)}
    assert edges == {
        ("digits/lora:1", "digits/lora:2", "finetuned_from"),
        ("digits/lora:2", "rotated/t:1", "transferred_from"),
    }
    assert tree.index("made from") < tree.index("digits/lora:1") and "rotated/t:1" in tree
    if shutil.which("dot"):
        cli(home, "lineage", "digits/lora:1", "--format", "png", "-o", str(home / "l.png"))
        assert (home / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "graphviz" in cli(home, "lineage", "digits/lora:1", "--format", "png", ok=False).stderr.lower()


def test_metrics_comparison_and_aliases_and_tags(home: Path) -> None:
    table = as_json(home, "metrics", "digits/lora:1", "digits/lora:2")
    assert table["values"]["val/accuracy|val"] == {"digits/lora:1": 0.91}
    assert table["values"]["val/accuracy|"] == {"digits/lora:2": 0.95}
    cli(home, "alias", "set", "digits/lora:1", "production")
    cli(home, "tag", "set", "digits/lora@production", "owner=vision", "stage=beta")
    with Hub.open(home) as hub:
        v = hub.resolve("digits/lora@production")
    assert (v.number, v.aliases, v.tags) == (1, ("production",), {"owner": "vision", "stage": "beta"})


def test_export_and_import_roundtrip(home: Path, tmp_path: Path) -> None:
    cli_all(
        home,
        ("export", "digits/lora:2", str(tmp_path / "file")),
        ("export", "digits/lora:2", str(tmp_path / "peft"), "--format", "peft"),
    )
    exported = (tmp_path / "file" / "digits+lora-v2.safetensors").read_bytes()
    with Hub.open(home) as hub:
        assert hashlib.sha256(exported).hexdigest() == hub.resolve("digits/lora:2").digest
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    imported = as_json(home, "import", str(tmp_path / "peft"), "--task", "digits", "--adapter", "from-peft",
                       "--backbone", "tiny")  # fmt: skip
    assert imported["ref"] == "digits/from-peft:1" and imported["tags"]["imported_from"].startswith("peft:")
    # the adapter that went out through PEFT and came back computes what the original computes
    x = torch.randn(4, 3, 8, 8)
    outputs = []
    with Hub.open(home) as hub:
        for ref in ("digits/lora:2", "digits/from-peft:1"):
            model = AdapterModel(seeded_backbone(0))
            hub.load_into(model, ref, name="x")
            model.activate("x")
            with torch.no_grad():
                outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_user_errors_are_one_line(home: Path) -> None:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = list(
            pool.map(
                lambda kw: cli(home, *kw.pop("args"), ok=False, **kw),
                [
                    {"args": ("show", "digits/lor")},
                    {"args": ("task", "add", "digits")},
                    {"args": ("ls",), "db": "postgresql+psycopg://nobody@127.0.0.1:1/none"},
                ],
            )
        )
    unknown, duplicate, unreachable = (r.stderr for r in runs)
    assert "did you mean digits/lora" in unknown
    assert "already exists" in duplicate
    assert "cannot open database" in unreachable


def test_rm_verify_and_gc(home: Path) -> None:
    with Hub.open(home) as hub:
        for seed in (4, 5):
            hub.register(trained_model(seed), "a", task="rotated", name="scratch")
        digest = hub.resolve("rotated/scratch:1").digest
    cli(home, "rm", "rotated/scratch:2")
    listed = as_json(home, "versions", "rotated/scratch", "--all")
    assert [(v["number"], v["status"]) for v in listed] == [(1, "ready"), (2, "deleted")]

    blob = home / "artifacts" / "sha256" / digest[:2] / digest[2:]
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    failed = cli(home, "verify", "--all", ok=False).stderr
    assert f"rotated/scratch:1: corrupt blob: expected sha256:{digest}" in failed

    report = as_json(home, "gc", "--grace", "0", "--purge-deleted")
    assert report["purged_versions"] == ["rotated/scratch:2"] and len(report["removed"]) == 1


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    assert "upgraded from empty to" in cli(home, "db", "upgrade").stdout
    engine = make_engine(f"sqlite:///{home / 'hub.db'}")
    with engine.connect() as conn:
        assert schema.schema_state(conn).up_to_date
    with Hub.open(home) as hub:
        hub.add_task("digits")  # an older database holding data is never migrated without being asked
    schema.downgrade(engine, "0001")
    engine.dispose()
    with ThreadPoolExecutor(max_workers=2) as pool:
        refused, current = pool.map(
            lambda args: cli(home, *args, ok=args[-1] != "ls"), [("ls",), ("--json", "db", "current")]
        )
    assert "older than this adapter-hub" in refused.stderr and "adapter-hub db upgrade" in refused.stderr
    assert json.loads(current.stdout) == {"current": "0001", "head": schema.head_revision(), "status": "outdated"}
    assert f"upgraded from 0001 to {schema.head_revision()}" in cli(home, "db", "upgrade").stdout
    with Hub.open(home) as hub:
        assert hub.ls() == []


def test_the_command_line_starts_without_torch_and_offers_the_engines_methods(tmp_path: Path) -> None:
    """`--help`, `compose average --help` and `db current` import no torch; the combine methods the CLI offers
    are the ones the engine runs (one list, in a module without torch)."""
    from adapter_hub.combine_methods import METHODS
    from adapter_hub.compose import combine

    env = {**os.environ, "ADAPTER_HUB_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("ADAPTER_HUB_DB", None)
    runs = [
        subprocess.run([sys.executable, "-X", "importtime", "-m", "adapter_hub.cli", *args], env=env,
                       capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        for args in (("--help",), ("compose", "average", "--help"), ("db", "current"))
    ]
    for run in runs:
        imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import")]
        assert imported and not [m for m in imported if m.split(".")[0] == "torch"], run.args
    offered = re.search(r"\[(linear\|[^\]]*)\]", runs[1].stdout)
    assert offered is not None and tuple(offered[1].split("|")) == METHODS
    assert combine.check_method("svd", None) == "svd"  # the engine checks a method against the same list


def test_db_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda kw: cli(home, *kw.pop("args"), ok=False, **kw), [
            {"args": ("db", "upgrade", "no-such-revision")},
            {"args": ("db", "upgrade", "head+5")},  # alembic itself fails on it with a bare assertion
            {"args": ("db", "current"), "db": "nosuchdialect://x"},
            {"args": ("db", "upgrade"), "db": "postgresql+psycopg://nobody@127.0.0.1:1/none"},
        ]))  # fmt: skip
    unknown, beyond, dialect, unreachable = (r.stderr for r in runs)
    assert "cannot upgrade database" in unknown and "'no-such-revision'" in unknown
    assert "to revision 'head+5'" in beyond
    assert "cannot open database nosuchdialect://x" in dialect
    assert "cannot open database postgresql+psycopg://nobody@127.0.0.1:1/none" in unreachable
    assert json.loads(cli(home, "--json", "db", "current").stdout)["status"] == "empty", "nothing was migrated"


def test_import_through_the_library_and_its_checks_before_rebuilding(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipelines.import_adapter` is what `adapter-hub import` runs: an adapter file comes back as a version
    tagged and linked to where it came from; bad input is refused before the backbone is rebuilt."""
    from adapter_hub import pipelines
    from adapter_hub.errors import AdapterHubError

    with Hub.open(home) as hub:
        _version, file = pipelines.export_ref(hub, "digits/lora:1", tmp_path / "out")
        imported = pipelines.import_adapter(hub, file, task="digits", adapter="from-file", backbone="tiny",
                                            parents=["digits/lora:1"], trust_code=True)  # fmt: skip
        assert imported.tags == {"imported_from": f"safetensors:{file.resolve()}"}
        assert [(e.parent, e.relation) for e in hub.lineage(imported.ref).parents(imported.ref)] == [
            ("digits/lora:1", "imported_from")
        ]
        assert hub.read_artifact(imported.ref)[1] == hub.read_artifact("digits/lora:1")[1]

        def rebuilt(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("the backbone was rebuilt before the input was checked")

        monkeypatch.setattr(pipelines, "model_for", rebuilt)
        before = [s.to_dict() for s in hub.ls()]
        for changed, message in [
            ({"fmt": "peft"}, "a PEFT import needs a directory"),
            ({"fmt": "onnx"}, "unknown import format 'onnx'"),
            ({"task": "nope"}, "unknown task 'nope'"),
            ({"adapter": "a b"}, "invalid adapter name 'a b'"),
            ({"parents": ["digits/nothere"]}, "digits/nothere"),
            ({"key": "a key"}, "registration key"),
        ]:
            kwargs: dict[str, Any] = {"task": "digits", "adapter": "again", "backbone": "tiny", **changed}
            with pytest.raises(AdapterHubError, match=re.escape(message)):
                pipelines.import_adapter(hub, file, **kwargs)
        with pytest.raises(AdapterHubError, match="does not exist"):
            pipelines.import_adapter(hub, tmp_path / "missing", task="digits", adapter="again", backbone="tiny")
        assert [s.to_dict() for s in hub.ls()] == before
