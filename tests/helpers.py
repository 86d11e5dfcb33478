"""What several tests share: small backbones and adapters with fixed seeds, and where things are.

Tests import it as `helpers` (pytest puts tests/ on the path: pyproject's `pythonpath`), and `helpers:tiny_backbone`
is a `module:callable` backbone factory for the CLI in subprocesses, with TESTS on their PYTHONPATH."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent  # on the PYTHONPATH of subprocesses that import helpers
ROOT = TESTS.parent  # the checkout: pyproject.toml, adapter_hub/, migrations/, examples/


def tiny_backbone(num_classes: int = 10) -> Any:
    """A small conv net: conv → relu → pool → flatten → linear. Seed torch first for a fixed fingerprint."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def seeded_backbone(seed: int = 0) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tiny_backbone()


def trained_model(seed: int) -> Any:
    """An AdapterModel on `seeded_backbone(0)` with adapter "a" (r=2 on the conv and the linear) whose
    factors are drawn from N(0, 1) with `seed`: non-zero outputs, and bytes that differ per seed."""
    import torch

    from adapter_hub.lora import LoRAConfig
    from adapter_hub.model import AdapterModel

    model = AdapterModel(seeded_backbone(0))
    model.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=["0", "4"]))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.adapters["a"].parameters():
            p.normal_()
    return model


def run_cli(home: Path, *args: str, real: bool = False, timeout: float = 600) -> Any:
    """``adapter-hub ARGS`` with ``ADAPTER_HUB_HOME=home``, as a ``subprocess.CompletedProcess`` (returncode,
    stdout, stderr). In this process through click's runner unless ``real``: a subprocess pays torch's import
    (about 10 s on a busy CI core) every time, so tests run most commands here and keep a real process where
    the process itself is under test. The CLI's last-resort line for an unforeseen exception fails the test
    either way: every input is meant to get its own refusal."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ADAPTER_HUB_HOME": str(home)}
    env.pop("ADAPTER_HUB_DB", None)
    if real:
        done = subprocess.run([sys.executable, "-m", "adapter_hub.cli", *args], env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    else:
        from click.testing import CliRunner

        from adapter_hub.cli import main

        result = CliRunner().invoke(main, list(args), env={"ADAPTER_HUB_HOME": str(home), "ADAPTER_HUB_DB": None})
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        done = subprocess.CompletedProcess(["adapter-hub", *args], result.exit_code, result.stdout, result.stderr)
    assert "a defect in adapter-hub" not in done.stderr, done.stderr
    return done


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[Any]:
    """``benchmarks/<name>.py`` imported as module ``name``, as when it runs: its folder on ``sys.path`` (it
    imports its siblings) and the module in ``sys.modules`` (dataclasses look their module up by name); both
    undone afterwards, with torch's thread count."""
    import importlib.util
    import sys

    import torch

    folder = ROOT / "benchmarks"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(name, None)
        sys.path.remove(str(folder))
