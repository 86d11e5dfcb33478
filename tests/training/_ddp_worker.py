"""Run by tests/training/test_data_parallel.py under torchrun: the same training as the test's single process."""

from __future__ import annotations

import sys

from safetensors.torch import save_file

from adapter_hub import distributed
from tests.training.test_data_parallel import run_fit, run_multitask  # noqa: E402

if __name__ == "__main__":
    assert distributed.setup()
    rank, size = distributed.world()
    assert size == 2
    tensors = {**run_fit(), **run_multitask()}
    save_file(tensors, f"{sys.argv[1]}/rank{rank}.safetensors")
    distributed.teardown()
