"""`adapter-hub train` on backbones outside the catalogue: any torchvision.models name and `module:callable`
factories, given --targets, with the head from --head or found by itself (the last Linear, said on stderr),
conv heads, --from on such a backbone, the warning an oversized explicit target gives, and one-line refusals.
Trained adapters are checked against outputs computed by hand (the backbone with ΔW folded in and the head
swapped), or against the accuracy the registry logged."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import TESTS, tiny_backbone
from torch import nn

from adapter_hub import Hub, backbones, data, pipelines, training
from adapter_hub.errors import BackboneError

TINY = "helpers:tiny_backbone"


def conv_head_net(num_classes: int = 10) -> nn.Module:
    """SqueezeNet's shape in small: the classes come out of a 1×1 conv, then a global pool; no Linear."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTER_HUB_HOME": str(home), "ADAPTER_HUB_TRUSTED_FACTORIES": TINY,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("ADAPTER_HUB_DB", None)
    return subprocess.run([sys.executable, "-m", "adapter_hub.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def in_process(home: Path, *args: str) -> Any:
    from adapter_hub.cli import main

    return CliRunner().invoke(main, ["--home", str(home), *args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A registry with tasks t and u (10 classes), torchvision's shufflenet_v2_x0_5 added through the CLI as
    "shuf", squeezenet1_1 (no Linear: its classes come out of a conv) as "squeeze", and a small rotated-digits
    ImageFolder."""
    root = tmp_path_factory.mktemp("anyarch")
    home, folder = root / "home", root / "rot"
    ds = data.digits("rotated", pool="target")
    small = data.Dataset(*(data.Split(s.x[:n], s.y[:n]) for s, n in ((ds.train, 96), (ds.val, 32), (ds.test, 32))),
                         10, "rot")  # fmt: skip
    data.write_imagefolder(small, folder)
    squeeze = {"architecture": "squeezenet1_1", "num_classes": 10, "seed": 0}
    with Hub.open(home) as hub:
        hub.add_task("t", num_classes=10)
        hub.add_task("u", num_classes=10)
        hub.add_backbone("squeeze", backbones.build_backbone(squeeze), architecture="squeezenet1_1", source=squeeze)
    added = cli(home, "backbone", "add", "shuf", "shufflenet_v2_x0_5", "--num-classes", "10")
    assert added.returncode == 0, added.stderr
    return home, folder


def test_a_torchvision_model_outside_the_catalogue_trains_with_targets_and_its_last_linear(setup: tuple[Path, Path]):
    home, folder = setup
    done = cli(home, "train", "t/shuf", "--backbone", "shuf", "--data", str(folder), "--epochs", "1",
               "--targets", "conv1.0,stage2.0.branch1.0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "registered t/shuf:1" in done.stdout
    lines = done.stderr.splitlines()
    assert "head: fc, the backbone's last Linear (found by itself; --head PATH names another)" in lines
    # stage2.0.branch1.0 is depthwise (24 channels, 3×3): A (24, 1, 3, 3) + B (24, 1, 1, 1) against (24, 1, 3, 3)
    depthwise = backbones.build_backbone({"architecture": "shufflenet_v2_x0_5"}).get_submodule("stage2.0.branch1.0")
    c = depthwise.out_channels
    assert depthwise.groups == c and depthwise.weight.numel() == 9 * c
    warned = [line for line in lines if line.startswith("warning:")]
    assert warned == [f"warning: adapter 'adapter': 1 target layer(s) get a delta larger than the layer itself "
                      f"({10 * c:,} delta parameters against {9 * c:,} in those layers; stage2.0.branch1.0: "
                      f"{10 * c:,} against {9 * c:,}); leave them out of the targets, or list them in heads to train "
                      "them whole"]  # fmt: skip

    with Hub.open(home) as hub:
        model = pipelines.model_for(hub, "shuf")
        hub.load_into(model, "t/shuf:1", name="v")
        logged = {m.name: m.value for m in hub.metrics("t/shuf:1")}
    adapter = model.adapters["v"]
    assert sorted(p for p, _ in adapter.layer_items()) == ["conv1.0", "stage2.0.branch1.0"]
    heads = dict(adapter.head_items())
    assert list(heads) == ["fc"] and heads["fc"].out_features == 10
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in adapter.layer_items()), "the deltas trained"
    model.activate("v")
    test = data.load_imagefolder(folder, num_classes=10).test
    assert training.evaluate(model, test) == logged["test/accuracy"], "the registered adapter is the one trained"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--backbone", "shuf"],
            "backbone 'shuf' (shufflenet_v2_x0_5) is not in the catalogue, so it has no default "
            "targets: pass --targets",
        ),
        (["--backbone", "shuf", "--targets", "nothing*"], "target pattern 'nothing*' matches no module"),
        (
            ["--backbone", "shuf", "--targets", "conv1.0", "--head", "fcc"],
            "head 'fcc' is not a module of the backbone (close: fc",
        ),
        (
            ["--backbone", "shuf", "--targets", "conv1.0", "--head", "conv5"],
            "head 'conv5' is a Sequential, a module without a weight of its own",
        ),
        (["--backbone", "shuf", "--targets", "conv1.0", "--head", "conv5.1"], "head 'conv5.1' is a BatchNorm2d"),
        (
            ["--backbone", "shuf", "--targets", "conv1.0", "--head", "conv5.0"],
            "the backbone does not run with a 10-class head at conv5.0 (RuntimeError: running_mean",
        ),
        (
            ["--backbone", "squeeze", "--targets", "features.0"],
            "the backbone has no nn.Linear to train as its head: pass --head PATH",
        ),
    ],
)
def test_train_refuses_in_one_line(setup: tuple[Path, Path], args: list[str], message: str):
    home, folder = setup
    with Hub.open(home) as hub:
        before = [a.to_dict() for a in hub.ls()]
    result = in_process(home, "train", "t/bad", "--data", str(folder), "--epochs", "1", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    with Hub.open(home) as hub:
        assert [a.to_dict() for a in hub.ls()] == before, "nothing was registered"


def test_a_module_callable_backbone_trains_with_targets_and_transfers_with_from(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    home, folder = setup
    monkeypatch.setenv(backbones.TRUSTED_FACTORIES_ENV, TINY)  # for the commands run in this process
    source = {"architecture": TINY, "num_classes": 10, "seed": 1}
    with Hub.open(home) as hub:
        hub.add_backbone("tiny", backbones.build_backbone(source), architecture=TINY, source=source)
    first = cli(
        home,
        "train",
        "t/tiny",
        "--backbone",
        "tiny",
        "--data",
        str(folder),
        "--epochs",
        "1",
        "--targets",
        "0",
        "--rank",
        "2",
    )  # at rank 8 the 3→8 conv's delta (280) would outgrow it (224), and say so
    assert first.returncode == 0, first.stderr
    assert "head: 4, the backbone's last Linear" in first.stderr and "warning" not in first.stderr
    moved = cli(home, "train", "u/tiny", "--backbone", "tiny", "--data", str(folder), "--epochs", "1", "--from",
                "t/tiny")  # fmt: skip
    assert moved.returncode == 0 and "registered u/tiny:1" in moved.stdout, moved.stderr
    assert "head:" not in moved.stderr, "the head is the parent's: nothing to find"
    wrong = in_process(home, "train", "u/x", "--backbone", "tiny", "--data", str(folder), "--from", "t/tiny",
                       "--head", "0")  # fmt: skip
    assert wrong.exit_code == 1 and "'0' is not a head of the adapter training starts from (its heads: 4)" in \
           wrong.stderr  # fmt: skip

    with Hub.open(home) as hub:
        assert [(e.parent, e.relation) for e in hub.lineage("u/tiny:1").edges] == [("t/tiny:1", "transferred_from")]
        model = pipelines.model_for(hub, "tiny", trust_code=True)
        hub.load_into(model, "u/tiny:1", name="v")
    layer, head = dict(model.adapters["v"].layer_items())["0"], dict(model.adapters["v"].head_items())["4"]
    assert layer.lora_B.weight.abs().sum() > 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        reference = tiny_backbone(10)  # what the source's seed 1 builds
    with torch.no_grad():
        reference[0].weight += layer.delta_weight()
    reference[4] = copy.deepcopy(head)
    x = data.load_imagefolder(folder, num_classes=10).test.x[:8]
    model.activate("v")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_conv_head_named_with_head_is_replaced_per_adapter(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch):
    home, folder = setup
    architecture = f"{__name__}:conv_head_net"
    monkeypatch.setenv(backbones.TRUSTED_FACTORIES_ENV, architecture)
    source = {"architecture": architecture, "num_classes": 10, "seed": 2}
    with Hub.open(home) as hub:
        hub.add_backbone("convhead", backbones.build_backbone(source), architecture=architecture, source=source)
        with pytest.raises(BackboneError, match="has no nn.Linear to train as its head: pass --head PATH"):
            pipelines.train_adapter(hub, "t/conv", backbone="convhead", data_dir=str(folder), targets=["0"], epochs=1)
        version = pipelines.train_adapter(hub, "t/conv", backbone="convhead", data_dir=str(folder), targets=["0"],
                                          head="2", rank=2, epochs=1, seed=5, progress=False)  # fmt: skip
        assert version is not None
        model = pipelines.model_for(hub, version)
        hub.load_into(model, version.ref, name="v")
    layer, head = dict(model.adapters["v"].layer_items())["0"], dict(model.adapters["v"].head_items())["2"]
    assert type(head) is nn.Conv2d and head.weight.shape == (10, 8, 1, 1)
    assert layer.lora_B.weight.abs().sum() > 0, "the delta trained"
    torch.manual_seed(5)
    start = nn.Conv2d(8, 10, 1)  # the head training started from: drawn first after seeding
    assert not torch.equal(head.weight, start.weight), "the conv head trained"
    reference = backbones.build_backbone(source)
    with torch.no_grad():
        reference[0].weight += layer.delta_weight()
    reference[2] = copy.deepcopy(head)
    x = data.load_imagefolder(folder, num_classes=10).test.x[:8]
    model.activate("v")
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.abs().sum() > 0
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
