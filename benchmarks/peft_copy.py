"""adapter-hub's adapter tensors copied into a PEFT model, for benchmarks that run both on the same numbers."""

from __future__ import annotations

import re

import torch


def peft_name(key: str, adapter: str) -> str:
    """adapter-hub's file key → PEFT's parameter name: ``X.lora_A.weight`` → ``base_model.model.X.lora_A.<adapter>
    .weight``; a head's or a norm's ``fc.weight`` → ``base_model.model.fc.modules_to_save.<adapter>.weight``."""
    m = re.fullmatch(r"(.*)\.(lora_[AB])\.weight", key)
    if m:
        return f"base_model.model.{m[1]}.{m[2]}.{adapter}.weight"
    path, _, param = key.rpartition(".")
    return f"base_model.model.{path}.modules_to_save.{adapter}.{param}"


def copy_into_peft(model, name: str, tensors: dict[str, torch.Tensor], error: type[Exception]) -> None:
    """Copy ``tensors`` (adapter-hub's keys) into PEFT's adapter ``name`` key by key. PEFT's adapter must hold
    exactly those tensors (its LoRA factors and modules_to_save copies), else ``error`` names the difference."""
    params = dict(model.named_parameters())
    wanted = {peft_name(k, name): t for k, t in tensors.items()}
    theirs = {n for n in params if f".{name}." in n and (".lora_" in n or ".modules_to_save." in n)}
    if set(wanted) != theirs:
        raise error(
            f"PEFT's adapter {name} holds other tensors than adapter-hub's: only ours "
            f"{sorted(set(wanted) - theirs)[:3]}, only PEFT's {sorted(theirs - set(wanted))[:3]}"
        )
    with torch.no_grad():
        for n, t in wanted.items():
            params[n].copy_(t)
