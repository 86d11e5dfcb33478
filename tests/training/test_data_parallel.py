"""Two processes under torchrun (gloo) train exactly what one process trains on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapter_hub import AdapterModel, LoRAConfig, backbones, data, training
from adapter_hub.errors import ConfigError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the checkout


def _model() -> AdapterModel:
    torch.manual_seed(0)  # the adapters' initialisation (rank 0's is broadcast to the other process)
    return AdapterModel(backbones.build_backbone({"architecture": "resnet_small", "num_classes": 10, "seed": 2}))


def _split(ds: data.Dataset, n: int) -> data.Split:
    return data.Split(ds.train.x[:n], ds.train.y[:n])


def run_fit() -> dict[str, torch.Tensor]:
    """One adapter; 101 samples in batches of 25: the last batch (1 sample) leaves one process empty."""
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"], norm_layers="frozen"))
    model.activate("a")
    ds = data.digits("rotated", pool="target")
    training.fit(model, _split(ds, 101), data.Split(ds.val.x[:64], ds.val.y[:64]), epochs=2, lr=1e-2,
                 batch_size=25, progress=False)  # fmt: skip
    return {f"fit.{k}": v.contiguous() for k, v in model.adapters.state_dict().items()}


def run_multitask() -> dict[str, torch.Tensor]:
    """A Switch over two adapters of different head widths; batches of 9 split 5 + 4."""
    model = _model()
    cfg = LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"], norm_layers="frozen")
    model.add_adapter("digit", cfg)
    model.add_adapter("parity", cfg, head_modules={"fc": nn.Linear(512, 2)})
    rot, inv = data.digits("rotated", pool="target"), data.digits("inverted", labels="parity", pool="target")
    tasks = {"digit": (_split(rot, 40), rot.val), "parity": (_split(inv, 23), inv.val)}
    training.fit_multitask(model, tasks, epochs=1, lr=1e-2, batch_size=9, progress=False)
    return {f"multi.{k}": v.contiguous() for k, v in model.adapters.state_dict().items()}


def test_two_gloo_processes_match_one_process(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "_ddp_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    torch.set_num_threads(1)
    single = {**run_fit(), **run_multitask()}
    assert set(single) == set(ranks[0]) == set(ranks[1])
    for key, expected in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"the processes diverged on {key}"
        # the gradient of each global batch is the same sum, only in another order: equal up to rounding
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-4, atol=1e-5, msg=key)
    started_at_zero = [k for k in single if "lora_B" in k]  # B starts at zero: non-zero means it was trained
    assert len(started_at_zero) == 6 and all(single[k].abs().sum() > 0 for k in started_at_zero)


def test_an_adapter_owning_batchnorms_is_refused_in_more_than_one_process(monkeypatch):
    """Each process would normalise its own rows with their own batch statistics: refused before any step
    (every process makes the same check); in one process, or with frozen norms, it trains."""
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2, targets=["layer4.*.conv*"], heads=["fc"]))
    model.activate("a")
    ds = data.digits("rotated", pool="target")
    before = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    monkeypatch.setattr(training.distributed, "world", lambda: (0, 2))
    with pytest.raises(ConfigError, match=r"owns the BatchNorm bn1, whose batch statistics each of the 2 processes"):
        training.fit(model, _split(ds, 16), _split(ds, 16), epochs=1, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.adapters.state_dict().items())
    training.distributed.refuse_batch_statistics([("bn1", nn.BatchNorm2d(4).eval())])  # eval mode: nothing to take
    monkeypatch.undo()
    training.fit(model, _split(ds, 16), _split(ds, 16), epochs=1, progress=False)  # one process: it trains
    assert any(not torch.equal(v, before[k]) for k, v in model.adapters.state_dict().items())
