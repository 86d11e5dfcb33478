"""`adapter-hub train` as users run it: Ctrl-C registers nothing, torchrun trains in two processes and
registers once, --full logs the full fine-tuning baseline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_hub import AdapterModel, Hub, backbones, data
from adapter_hub.pipelines import train_adapter

SOURCE = {"architecture": "resnet_small", "num_classes": 10, "seed": 7, "weights": None}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A registry with a backbone and a task, and a small rotated-digits ImageFolder (all ten classes)."""
    home, folder = tmp_path / "home", tmp_path / "rot"
    with Hub.open(home) as hub:
        hub.add_backbone("small", backbones.build_backbone(SOURCE), architecture="resnet_small", source=SOURCE)
        hub.add_task("rot", num_classes=10)
    ds = data.digits("rotated", pool="target")
    small = data.Dataset(*(data.Split(s.x[:n], s.y[:n]) for s, n in ((ds.train, 90), (ds.val, 60), (ds.test, 60))),
                         10, "rot")  # fmt: skip
    assert all(len(set(s.y.tolist())) == 10 for s in (small.train, small.val, small.test))
    data.write_imagefolder(small, folder)
    return home, folder


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "ADAPTER_HUB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTER_HUB_DB", None)
    return env


def _blobs(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file() and p.suffix not in (".db", ".lock") and "hub.db" not in p.name]


def test_ctrl_c_during_training_registers_nothing_and_says_so(setup: tuple[Path, Path]):
    home, folder = setup
    before = _blobs(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapter_hub.cli", "train", "rot/a", "--backbone", "small", "--data", str(folder),
         "--epochs", "200"],
        env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()  # printed right before the first step
    assert first.startswith("training rot/a on 90 images"), first
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert rest.strip().splitlines() == ["Error: training interrupted; nothing was registered"]
    with Hub.open(home) as hub:
        assert hub.ls() == []
    assert _blobs(home) == before, "no artifact was written"


def test_torchrun_trains_in_two_processes_and_registers_once(setup: tuple[Path, Path]):
    home, folder = setup
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "adapter_hub.cli", "train", "rot/ddp", "--backbone", "small", "--data", str(folder), "--epochs", "2",
         "--norm-layers", "frozen"],  # owned BatchNorms would take each process's own batch statistics
        env=_env(home), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("registered rot/ddp:1") == 1 and "in 2 processes" in done.stderr
    torch.set_num_threads(1)
    with Hub.open(home) as hub:
        assert [v.ref for v in hub.versions("rot/ddp")] == ["rot/ddp:1"]
        # the same training in this one process, with the --full baseline
        single = train_adapter(hub, "rot/one", backbone="small", data_dir=str(folder), epochs=2, full=True,
                               progress=False, norm_layers="frozen")  # fmt: skip
        assert single is not None
        model = AdapterModel(backbones.build_backbone(SOURCE))
        hub.load_into(model, "rot/ddp:1", name="ddp")
        hub.load_into(model, single.ref, name="one")
        ddp, one = model.adapters["ddp"].state_dict(), model.adapters["one"].state_dict()
        for key, value in one.items():
            # summation order differs; Adam's 1/√v magnifies that rounding where gradients are near zero
            # (A's, while B is still ~0), hence 1e-4 on values of ~0.02
            torch.testing.assert_close(ddp[key], value, rtol=1e-3, atol=1e-4, msg=key)
        metrics = {m.name: m.value for m in hub.metrics(single.ref)}
        ddp_metrics = {m.name: m.value for m in hub.metrics("rot/ddp:1")}
    assert metrics["test/accuracy"] == ddp_metrics["test/accuracy"]
    assert metrics["baseline/full_finetune_params"] == sum(p.numel() for p in model.backbone.parameters())
    assert 0.0 <= metrics["baseline/full_finetune_accuracy"] <= 1.0
    owned = subprocess.run(  # the default owns every BatchNorm: refused in one line before the first step
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "adapter_hub.cli", "train", "rot/owned", "--backbone", "small", "--data", str(folder), "--epochs", "1"],
        env=_env(home), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert owned.returncode != 0 and "whose batch statistics each of the 2 processes" in owned.stderr
    with Hub.open(home) as hub:
        assert sorted(a.name for a in hub.ls("rot")) == ["ddp", "one"], "nothing registered"
