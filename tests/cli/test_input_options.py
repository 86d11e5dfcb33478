"""`adapter-hub backbone add` with --image-size, --mean, --std and --torchvision-weights: what it records in the
backbone's source (compared with torchvision's enum and with the values given), the refusals (one line, exit
code 1, nothing registered), and a backbone added without them recording what it always did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner

from adapter_hub.cli import main


def run(home: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--home", str(home), *args])


def ok(home: Path, *args: str) -> Any:
    result = run(home, *args)
    assert result.exit_code == 0, result.output
    return result


def backbones_in(home: Path) -> dict[str, dict[str, Any]]:
    """name -> source of every registered backbone, read through `backbone ls --json`."""
    return {r["name"]: r["source"] for r in json.loads(ok(home, "--json", "backbone", "ls").stdout)}


def test_given_values_are_recorded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok(home, "backbone", "add", "rs", "resnet_small", "--num-classes", "10", "--image-size", "32", "--mean",
       "0.5", "--std", "0.25,0.5,2")  # fmt: skip
    ok(home, "backbone", "add", "plain", "resnet_small", "--num-classes", "10")
    sources = backbones_in(home)
    assert sources["rs"]["inputs"] == {"size": 32, "resize": 32, "interpolation": "bilinear",
                                       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 2.0]}  # fmt: skip
    assert sources["plain"] == {"architecture": "resnet_small", "weights": None, "seed": 0, "num_classes": 10}


def test_torchvision_weights_give_their_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--torchvision-weights DEFAULT records the enum's crop, resize, interpolation, mean and std; --image-size
    and --mean replace theirs. The weights file is a seeded model's own in torchvision's cache (no download)."""
    member = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), cache / Path(member.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    home = tmp_path / "home"
    ok(home, "backbone", "add", "sq", "squeezenet1_1", "--torchvision-weights", "DEFAULT")
    ok(home, "backbone", "add", "sq64", "squeezenet1_1", "--torchvision-weights", "SqueezeNet1_1_Weights.IMAGENET1K_V1",
       "--image-size", "64", "--mean", "0,0.1,0.2")  # fmt: skip
    preset = member.transforms()
    sources = backbones_in(home)
    assert sources["sq"]["torchvision_weights"] == "DEFAULT"
    assert sources["sq"]["inputs"] == {"size": preset.crop_size[0], "resize": preset.resize_size[0],
                                       "interpolation": preset.interpolation.value, "mean": list(preset.mean),
                                       "std": list(preset.std)}  # fmt: skip
    assert sources["sq64"]["inputs"] == {"size": 64, "resize": 64, "interpolation": preset.interpolation.value,
                                         "mean": [0.0, 0.1, 0.2], "std": list(preset.std)}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "0"], "image size must be at least 1 and at most 4096, got 0"),
        (["--image-size", "4097"], "image size must be at least 1 and at most 4096, got 4097"),
        (["--mean", "0.5,0.5", "--std", "1"], "mean takes 3 numbers (one per RGB channel) or 1 for all three, got 2"),
        (["--mean", "a,b,c", "--std", "1"], "--mean takes comma-separated numbers, got 'a,b,c'"),
        (["--mean", "nan", "--std", "1"], "mean must be a finite number, got nan"),
        (["--mean", "0", "--std", "inf"], "std must be a finite number, got inf"),
        (["--mean", "0", "--std", "1,0,1"], "std must be greater than 0 in every channel, got [1.0, 0.0, 1.0]"),
        (["--mean", "0", "--std", "-0.5"], "std must be greater than 0 in every channel"),
        (["--mean", "0.5"], "mean and std go together: give both (or neither)"),
        (["--torchvision-weights", "DEFAULT"], "for a torchvision.models architecture, not 'resnet_small'"),
    ],
)
def test_bad_values_are_refused_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    home = tmp_path / "home"
    result = run(home, "backbone", "add", "rs", "resnet_small", "--num-classes", "10", *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert message in result.stderr, result.stderr
    assert backbones_in(home) == {}


def test_options_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args, message in [
        (["r", "resnet18", "--torchvision-weights", "NOPE"], "resnet18 has no torchvision weights 'NOPE'"),
        (["t", "--hf", str(tmp_path), "--image-size", "8"], "--image-size: for an image backbone built from"),
        (["f", "--fingerprint", "ab" * 32, "--mean", "0", "--std", "1"], "--mean, --std: for an image backbone"),
        (["r", "resnet18", "--weights", __file__, "--torchvision-weights", "DEFAULT"], "not both"),
    ]:
        result = run(home, "backbone", "add", *args)
        assert result.exit_code == 1, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert backbones_in(home) == {}
