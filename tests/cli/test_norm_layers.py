"""`train --norm-layers` and `combine --norms` through the real CLI, checked against the registered adapters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from helpers import run_cli

from adapter_hub import AdapterModel, Hub, backbones


def cli(home: Path, *args: str, real: bool = False) -> subprocess.CompletedProcess:
    return run_cli(home, *args, real=real)


def one_line_refusal(done: subprocess.CompletedProcess, text: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert text in done.stderr, done.stderr


def test_train_owns_batchnorms_by_default_and_combine_keeps_the_chosen_norms(tmp_path: Path):
    home, digits = tmp_path / "home", tmp_path / "digits"
    for args in (("backbone", "add", "small", "resnet_small", "--num-classes", "10", "--seed", "1"),
                 ("task", "add", "t", "--num-classes", "10"),
                 ("data", "digits", str(digits), "--domain", "inverted", "--pool", "target")):  # fmt: skip
        done = cli(home, *args)
        assert done.returncode == 0, done.stderr
    common = ("--backbone", "small", "--data", str(digits), "--epochs", "1", "--targets", "layer4.*.conv*")
    assert cli(home, "train", "t/own", *common).returncode == 0
    assert cli(home, "train", "t/frozen", *common, "--norm-layers", "frozen").returncode == 0
    one_line_refusal(cli(home, "train", "t/more", "--backbone", "small", "--data", str(digits), "--from", "t/own",
                         "--norm-layers", "all"), "--norm-layers make a new adapter")  # fmt: skip
    bad = cli(home, "train", "t/bad", *common, "--norm-layers", "some")  # click's usage error
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Invalid value for '--norm-layers'" in bad.stderr

    with Hub.open(home) as hub:
        model = AdapterModel(backbones.build_backbone(hub.backbone("small").source))
        for ref in ("t/own", "t/frozen"):
            hub.load_into(model, ref, name=ref[2:])
    bns = [p for p, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    own = dict(model.adapters["own"].norm_items())
    assert list(own) == bns and len(model.adapters["frozen"].norms) == 0
    # trained in training mode: the adapter's statistics moved away from the backbone's
    assert not torch.equal(own["layer4.0.bn1"].running_mean, model.backbone.get_submodule("layer4.0.bn1").running_mean)

    done = cli(home, "combine", "t/own", "t/frozen", "--weights", "1,-1", "--norms", "t/own", "--head", "t/own",
               "-o", "t/diff")
    assert done.returncode == 0, done.stderr
    one_line_refusal(cli(home, "combine", "t/own", "t/frozen", "--norms", "t/nothere", "-o", "t/x"), "t/nothere")
    with Hub.open(home) as hub:
        hub.load_into(model, "t/diff", name="diff")
    for path, norm in model.adapters["diff"].norm_items():
        for key, t in norm.state_dict().items():
            assert torch.equal(t, own[path].state_dict()[key]), (path, key)
