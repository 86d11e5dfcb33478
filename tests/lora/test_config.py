"""LoRAConfig checks every field for its type and range (a config also arrives from files and registry records)
and accepts the forms a caller naturally passes: sets of targets (PEFT's habit), numpy and 0-dim torch
scalars."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from adapter_hub.lora import LoRAConfig, LoRAConfigError


def test_natural_forms_are_accepted_and_normalised():
    config = LoRAConfig(r=np.int64(4), alpha=torch.tensor(8.0), targets={"v", "q"}, heads=("fc",),
                        use_rslora=np.bool_(True), use_dora=0, rank_pattern={"q": torch.tensor(2)})  # fmt: skip
    assert (config.r, config.alpha, config.targets, config.heads) == (4, 8.0, ["q", "v"], ["fc"])
    assert config.use_rslora is True and config.use_dora is False and config.rank_pattern == {"q": 2}
    assert type(config.r) is int and type(config.alpha) is float
    assert LoRAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "LoRA rank must be a positive integer"),
        ({"r": 10**12}, "at most 65,536"),
        ({"r": 2.0}, "LoRA rank must be a positive integer"),
        ({"r": True}, "LoRA rank must be a positive integer"),
        ({"alpha": math.nan}, "alpha must be a finite number"),
        ({"alpha": math.inf}, "alpha must be a finite number"),
        ({"alpha": 10**400}, "alpha must be a finite number"),
        ({"alpha": 0}, "alpha must be non-zero"),
        ({"alpha": 1e10}, "at most 1e+09 in size"),
        ({"alpha": "sixteen"}, "alpha must be a number"),
        ({"targets": [""]}, "targets holds an empty pattern"),
        ({"targets": [1, 2]}, "targets must be a list of module names"),
        ({"heads": {"fc": 1}}, "heads must be a list of module names"),
        ({"rank_pattern": {"q": "two"}}, "rank_pattern['q']"),
        ({"alpha_pattern": {"q": math.nan}}, "alpha_pattern['q'] must be a finite number"),
        ({"alpha_pattern": [1]}, "alpha_pattern must map module patterns to numbers"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"use_dora": 2}, "use_dora must be true or false"),
        ({"norm_layers": ["all"]}, "unknown norm_layers"),
    ],
)
def test_a_bad_field_is_one_error_naming_it(fields, message):
    with pytest.raises(LoRAConfigError, match=re.escape(message)):
        LoRAConfig(**fields)


def test_from_dict_refuses_what_is_not_a_mapping():
    with pytest.raises(LoRAConfigError, match="a LoRA config must be a mapping, got list"):
        LoRAConfig.from_dict([1, 2])
