"""Bad names, refs, paths and numbers are refused before any long work: `train --epochs 500`, `demo`,
`compose`, `eval` and `predict` given one bad value exit 1 within seconds, with one line, having
registered nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapter_hub import AdapterModel, Hub, LoRAConfig, backbones, data
from adapter_hub.errors import AdapterHubError
from adapter_hub.pipelines import compose_refs, train_adapter
from adapter_hub.predict import predict_refs

SOURCE = {"architecture": "resnet_small", "num_classes": 10, "seed": 7, "weights": None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry (backbone small, task rot, one version rot/base:1) and a rotated-digits ImageFolder big
    enough that 500 epochs on it take minutes."""
    root = tmp_path_factory.mktemp("early")
    home, folder = root / "home", root / "rot"
    model = AdapterModel(backbones.build_backbone(SOURCE))
    model.add_adapter("base", LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"]))
    with Hub.open(home) as hub:
        hub.add_backbone("small", model.backbone, architecture="resnet_small", source=SOURCE)
        hub.add_task("rot", num_classes=10)
        hub.register(model, "base", task="rot", name="base")
    ds = data.digits("rotated", pool="target")
    small = data.Dataset(*(data.Split(s.x[:n], s.y[:n]) for s, n in ((ds.train, 90), (ds.val, 30), (ds.test, 30))),
                         10, "rot")  # fmt: skip
    data.write_imagefolder(small, folder)
    return home, folder


def registry_state(home: Path) -> tuple[Any, ...]:
    with Hub.open(home) as hub:
        return [a.to_dict() for a in hub.ls()], [v.ref for v in hub.versions("rot/base", include_deleted=True)]


def blobs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts").rglob("*") if p.is_file())


def refused(home: Path, args: list[str], message: str) -> None:
    before, stored = registry_state(home), blobs(home)
    start = time.perf_counter()
    result = CliRunner().invoke(main_cli(), ["--home", str(home), *args])
    took = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, (args, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]
    assert took < 5, f"{args} took {took:.1f} s before refusing"
    assert registry_state(home) == before and blobs(home) == stored, "nothing was registered or stored"


def main_cli() -> Any:
    from adapter_hub.cli import main

    return main


TRAIN = ["--backbone", "small", "--epochs", "500"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rot/a b"], "invalid adapter name 'a b'"),
        (["rot/../x"], "train takes TASK/ADAPTER (the registry numbers the version), got 'rot/../x'"),
        (["rot/.."], "invalid adapter name '..'"),
        (["rot/a:2"], "train takes TASK/ADAPTER"),
        (["rot/" + "a" * 201], "adapter name 'aaaa"),
        (["nope/a"], "unknown task 'nope'"),
        (["rot/a", "--backbone", "smal"], "unknown backbone 'smal' (did you mean small?)"),
        (["rot/a", "--from", "rot/nope"], "unknown adapter rot/nope"),
        (["rot/a", "--from", "rot/base:99999999999999999999"], "version number 99999999999999999999 is out of range"),
        (["rot/a", "--from", "rot/base:7"], "rot/base:7 does not exist"),
        (["rot/a", "--alpha", "nan"], "alpha must be a finite number, got nan"),
        (["rot/a", "--alpha", "inf"], "alpha must be a finite number, got inf"),
        (["rot/a", "--alpha", "0"], "alpha must be greater than 0, got 0"),
        (["rot/a", "--lr", "nan"], "lr must be a finite number, got nan"),
        (["rot/a", "--lr", "0"], "lr must be greater than 0, got 0"),
        (["rot/a", "--lr", "-0.1"], "lr must be greater than 0, got -0.1"),
        (["rot/a", "--seed", str(2**63)], f"seed must be at least 0 and at most {2**63 - 1}, got {2**63}"),
        (["rot/a", "--seed", "-1"], "seed must be at least 0"),
        (["rot/a", "--rank", "0"], "rank must be at least 1 and at most 4096, got 0"),
        (["rot/a", "--epochs", "0"], "epochs must be at least 1 and at most 100000, got 0"),
    ],
)
def test_train_refuses_bad_input_before_the_first_step(setup: tuple[Path, Path], args: list[str], message: str):
    home, folder = setup
    refused(home, ["train", args[0], "--data", str(folder), *TRAIN, *args[1:]], message)


def test_train_refuses_a_missing_data_directory(setup: tuple[Path, Path], tmp_path: Path):
    home, _ = setup
    refused(home, ["train", "rot/a", "--data", str(tmp_path / "none"), *TRAIN], "does not exist")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "rot/a b"], "invalid adapter name 'a b'"),
        (["-o", "rot/x/y"], "-o takes TASK/ADAPTER"),
        (["-o", "nope/x"], "unknown task 'nope'"),
        (["-o", "rot/x", "--weights", "nan,1"], "each weight must be a finite number, got nan"),
        (["-o", "rot/x", "--weights", "1"], "1 weights for 2 versions"),
        (["-o", "rot/x", "--weights", "a,b"], "--weights takes comma-separated numbers"),
        (["-o", "rot/x", "--method", "ties", "--density", "0"], "density must be greater than 0, got 0"),
        (["-o", "rot/x", "--method", "ties", "--density", "nan"], "density must be a finite number"),
        (["-o", "rot/x", "--method", "ties", "--density", "1.5"], "density must be at most 1, got 1.5"),
        (["-o", "rot/x", "--method", "svd", "--rank", "0"], "rank must be at least 1, got 0"),
        (["-o", "rot/x", "--method", "dare_ties", "--density", "0.5", "--seed", "-1"], "seed must be at least 0"),
        (["-o", "rot/x", "--head", "rot/nope"], "unknown adapter rot/nope"),
    ],
)
def test_compose_refuses_bad_input_before_combining(setup: tuple[Path, Path], args: list[str], message: str):
    home, _ = setup
    refused(home, ["compose", "average", "rot/base", "rot/base:1", *args], message)


def test_eval_and_predict_refuse_bad_paths_before_rebuilding(setup: tuple[Path, Path], tmp_path: Path):
    home, folder = setup
    refused(home, ["eval", "rot/base", "--data", str(tmp_path / "none")], "data directory")
    refused(home, ["eval", "rot/base:0", "--data", str(folder)], "version numbers start at 1")
    refused(home, ["predict", "rot/base", "--data", str(tmp_path / "none")], "does not exist")
    refused(home, ["predict", "rot/base", "--data", str(folder), "-o", str(tmp_path / "no" / "p.csv")],
            f"-o {tmp_path / 'no' / 'p.csv'}: folder {tmp_path / 'no'} does not exist")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be at least 0"),
        (["--seed", str(2**64)], "seed must be at least 0 and at most"),
        (["--epochs", "0"], "epochs must be at least 1 and at most 100, got 0"),
        (["--rank", "257"], "rank must be at least 1 and at most 256, got 257"),
    ],
)
def test_demo_refuses_bad_options_before_training(setup: tuple[Path, Path], args: list[str], message: str):
    home, _ = setup
    refused(home, ["demo", "--quiet", *args], message)


def test_the_api_refuses_the_same_values(setup: tuple[Path, Path], tmp_path: Path):
    home, folder = setup
    with Hub.open(home) as hub:
        for call in (
            lambda: train_adapter(hub, "rot/a b", backbone="small", data_dir=str(folder), epochs=500),
            lambda: train_adapter(hub, "rot/a", backbone="small", data_dir=str(folder), epochs=500, alpha=0.0),
            lambda: train_adapter(hub, "rot/a", backbone="small", data_dir=str(folder), epochs=500, seed=2**70),
            lambda: compose_refs(hub, ["rot/base", "rot/base"], "rot/x", weights=[1.0, float("inf")]),
            lambda: predict_refs(hub, ["rot/base"], folder, output=tmp_path / "none" / "p.csv"),
        ):
            start = time.perf_counter()
            with pytest.raises(AdapterHubError):
                call()
            assert time.perf_counter() - start < 5
        assert [a.name for a in hub.ls()] == ["base"]


def test_numbers_of_any_size_give_a_short_message():
    from adapter_hub import checks
    from adapter_hub.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^seed must be at least 0 and at most \d+, got an integer of 16610 bits$"):
        checks.seed(10**5000)
    with pytest.raises(ConfigError, match=r"^lr must be a finite number, got an integer of 1329 bits$"):
        checks.number("lr", 10**400, above=0)
    with pytest.raises(ConfigError, match=r"^rank must be a whole number, got 2\.5$"):
        checks.whole("rank", 2.5, low=1)
    assert checks.seed(2**63 - 1) == 2**63 - 1 and checks.number("density", 1, above=0, at_most=1) == 1.0
