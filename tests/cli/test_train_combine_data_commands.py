"""`adapter-hub compose` and `adapter-hub data` through the real CLI, checked against the library."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_cli, seeded_backbone, trained_model

from adapter_hub import AdapterModel, Hub, LoRAConfig, backbones, data, pipelines
from adapter_hub.errors import ConfigError


def cli(home: Path, *args: str, real: bool = False) -> subprocess.CompletedProcess:
    return run_cli(home, *args, real=real)


def test_compose_average_registers_the_exact_weighted_sum_with_its_lineage(tmp_path: Path):
    home = tmp_path / "home"
    added = cli(home, "backbone", "add", "small", "resnet_small", "--num-classes", "10", "--seed", "3")
    assert added.returncode == 0, added.stderr
    source = {"architecture": "resnet_small", "num_classes": 10, "seed": 3, "weights": None}
    model = AdapterModel(backbones.build_backbone(source))
    hub = Hub.open(home)
    hub.add_task("t", num_classes=10)
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"]))
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        hub.register(model, name, task="t", name=name)
    hub.close()

    done = cli(home, "compose", "average", "t/a", "t/b", "--weights", "0.5,-1", "--method", "linear", "-o", "t/ab")
    assert done.returncode == 0, done.stderr
    assert "registered t/ab:1" in done.stdout
    hub = Hub.open(home)
    hub.load_into(model, "t/ab", name="ab")
    for path, layer in model.adapters["ab"].layer_items():
        la, lb = (dict(model.adapters[n].layer_items())[path] for n in "ab")
        expected = 0.5 * la.delta_weight() - lb.delta_weight()
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    edges = hub.lineage("t/ab").edges
    assert sorted((e.parent, e.relation, e.method, e.weight) for e in edges) == [
        ("t/a:1", "composed_from", "linear", 0.5), ("t/b:1", "composed_from", "linear", -1.0)]  # fmt: skip
    hub.close()

    bad = cli(home, "compose", "average", "t/a", "t/nothere", "-o", "t/x")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = cli(home, "compose", "average", "t/a", "t/b", "--method", "ties", "-o", "t/x")
    assert bad.returncode == 1 and "needs density" in bad.stderr


def test_combine_is_the_verb_and_compose_stack_and_average_are_its_aliases(tmp_path: Path):
    """`combine` registers what the library's `combine` returns; `compose average` is the same command and
    `compose stack` is `combine --method linear` with weights 1 each."""
    home = tmp_path / "home"
    added = cli(home, "backbone", "add", "small", "resnet_small", "--num-classes", "10", "--seed", "3")
    assert added.returncode == 0, added.stderr
    model = AdapterModel(backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10, "seed": 3}))
    with Hub.open(home) as hub:
        hub.add_task("t", num_classes=10)
        for i, name in enumerate(("a", "b")):
            model.add_adapter(name, LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"]))
            with torch.no_grad():
                for p in model.adapters[name].parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
            hub.register(model, name, task="t", name=name)

    runs = {
        "c": ("combine", "t/a", "t/b", "--weights", "0.5,-1", "-o", "t/c"),
        "avg": ("compose", "average", "t/a", "t/b", "--weights", "0.5,-1", "-o", "t/avg"),
        "s": ("compose", "stack", "t/a", "t/b", "-o", "t/s"),
    }
    for name, args in runs.items():
        done = cli(home, *args)
        assert done.returncode == 0, done.stderr
        assert f"registered t/{name}:1 (linear of 2 versions)" in done.stdout
    with Hub.open(home) as hub:
        for name in runs:
            hub.load_into(model, f"t/{name}", name=name)
        assert sorted((e.parent, e.method, e.weight) for e in hub.lineage("t/c").edges) == [
            ("t/a:1", "linear", 0.5), ("t/b:1", "linear", -1.0)]  # fmt: skip
    sources = {n: dict(model.adapters[n].layer_items()) for n in ("a", "b")}
    for name, (wa, wb) in (("c", (0.5, -1.0)), ("avg", (0.5, -1.0)), ("s", (1.0, 1.0))):
        for path, layer in model.adapters[name].layer_items():
            expected = wa * sources["a"][path].delta_weight() + wb * sources["b"][path].delta_weight()
            torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)

    bad = cli(home, "combine", "t/a", "t/b", "--method", "ties", "-o", "t/x")
    assert bad.returncode == 1 and "needs density" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_data_digits_writes_an_imagefolder_the_loader_reads(tmp_path: Path):
    done = cli(tmp_path, "--json", "data", "digits", str(tmp_path / "rot"), "--domain", "rotated", "--pool", "target",
               real=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    loaded = data.load_imagefolder(tmp_path / "rot", num_classes=10)
    expected = data.digits("rotated", pool="target")
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (counts["train"], counts["val"], counts["test"])
    assert len(loaded.test) == len(expected.test)
    bad = cli(tmp_path, "data", "digits", str(tmp_path / "x"), "--domain", "sideways", real=True)
    assert bad.returncode == 1 and "Invalid value for '--domain'" in bad.stderr and bad.stderr.count("\n") == 1


def test_train_then_transfer_then_eval_through_the_cli(tmp_path: Path):
    home = tmp_path / "home"
    for args in (("backbone", "add", "small", "resnet_small", "--num-classes", "10"),
                 ("task", "add", "rot", "--num-classes", "10"), ("task", "add", "inv", "--num-classes", "10"),
                 ("data", "digits", str(tmp_path / "rot"), "--domain", "rotated", "--pool", "target"),
                 ("data", "digits", str(tmp_path / "inv"), "--domain", "inverted", "--pool", "target")):  # fmt: skip
        done = cli(home, *args)
        assert done.returncode == 0, done.stderr
    first = cli(home, "--json", "train", "rot/lora", "--backbone", "small", "--data", str(tmp_path / "rot"),
                "--epochs", "1", real=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    moved = cli(home, "train", "inv/lora", "--backbone", "small", "--data", str(tmp_path / "inv"), "--from",
                "rot/lora", "--epochs", "1")  # fmt: skip
    assert moved.returncode == 0 and "registered inv/lora:1" in moved.stdout, moved.stderr
    hub = Hub.open(home)
    edges = hub.lineage("inv/lora:1").edges
    assert [(e.parent, e.relation) for e in edges] == [("rot/lora:1", "transferred_from")]
    logged = {m.name: m.value for m in hub.metrics("rot/lora:1")}
    hub.close()
    evaluated = cli(home, "--json", "eval", "rot/lora", "--data", str(tmp_path / "rot"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == logged["test/accuracy"], "the same model gives the same score"

    dora = cli(home, "--json", "train", "rot/dora", "--backbone", "small", "--data", str(tmp_path / "rot"),
               "--epochs", "1", "--dora")  # fmt: skip
    assert dora.returncode == 0, dora.stderr
    with Hub.open(home) as hub:
        model = pipelines.model_for(hub, "small")
        hub.load_into(model, "rot/dora:1", name="d")
        dora_accuracy = {m.name: m.value for m in hub.metrics("rot/dora:1")}["test/accuracy"]
    record = model.export_record("d")
    magnitudes = [k for k in record.tensors if k.endswith("lora_magnitude_vector")]
    assert record.config.use_dora and magnitudes, "a DoRA version carries its magnitudes"
    evaluated = cli(home, "--json", "eval", "rot/dora", "--data", str(tmp_path / "rot"))
    assert json.loads(evaluated.stdout)["accuracy"] == dora_accuracy
    both = cli(home, "train", "rot/z", "--backbone", "small", "--data", str(tmp_path / "rot"), "--dora", "--from",
               "rot/lora")  # fmt: skip
    assert both.returncode == 1 and "--dora make a new adapter; --from continues REF's own" in both.stderr
    kept = cli(home, "train", "rot/z", "--backbone", "small", "--data", str(tmp_path / "rot"), "--from", "rot/lora",
               "--rank", "2", "--targets", "nomatch")  # fmt: skip
    assert kept.returncode == 1 and "--rank, --targets make a new adapter" in kept.stderr

    missing = cli(home, "train", "rot/x", "--backbone", "small", "--data", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    cli(home, "task", "add", "two", "--num-classes", "2")
    wrong = cli(home, "train", "two/x", "--backbone", "small", "--data", str(tmp_path / "rot"))
    assert wrong.returncode == 1 and "the task expects 2" in wrong.stderr
    other = cli(home, "backbone", "add", "other", "resnet_small", "--num-classes", "10", "--seed", "1")
    assert other.returncode == 0
    cross = cli(home, "train", "inv/y", "--backbone", "other", "--data", str(tmp_path / "inv"), "--from", "rot/lora")
    assert cross.returncode == 1 and "was made for backbone 'small'" in cross.stderr


def test_compose_refuses_a_method_it_cannot_run_before_rebuilding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The engine's method checks are made by `compose_refs` before a backbone is rebuilt or an adapter loaded."""

    def rebuilt(*_args, **_kwargs):
        raise AssertionError("the backbone was rebuilt before the method was checked")

    monkeypatch.setattr(pipelines, "model_for", rebuilt)
    with Hub.open(tmp_path / "home") as hub:
        hub.add_backbone("tiny", seeded_backbone(0))
        hub.add_task("t")
        for seed, name in ((1, "a"), (2, "b")):
            hub.register(trained_model(seed), "a", task="t", name=name)
        for method, message in (("ties", "method 'ties' needs density="), ("mean", "unknown combine method 'mean'")):
            with pytest.raises(ConfigError, match=message):
                pipelines.compose_refs(hub, ["t/a", "t/b"], "t/ab", method=method)
        assert [s.name for s in hub.ls()] == ["a", "b"], "nothing was registered"
