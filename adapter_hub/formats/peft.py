"""PEFT's LoRA directory format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``; an embedding's are
``lora_embedding_A`` / ``lora_embedding_B``; an nn.MultiheadAttention keeps its in_proj pair under
its own path and its out_proj pair under ``<path>.base_layer.out_proj``; heads (``modules_to_save``)
keep their original keys. PEFT's A for a grouped conv sees every input channel: a grouped A is
written as that full A with zeros outside its group's block, and read back as grouped when it has that
block structure (otherwise it runs as is but cannot be merged).

A codec between an ``AdapterRecord`` and such a directory: reading one needs the backbone's modules
(a grouped conv's A is stored full, heads are found by their keys), so ``import_peft`` takes the backbone.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..adapter import module_at
from ..errors import AdapterFileError
from ..lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRAMultiheadAttention,
    LoRATransposedLinear,
    lora_class_for,
    lora_scaling,
)
from .adapter_file import read_tensors
from .record import AdapterRecord

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_MHA_OUT = ".base_layer.out_proj"


def _peft_alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives ``scaling`` at ``rank`` under PEFT's rule (α/r or α/√r)."""
    return scaling * (math.sqrt(rank) if use_rslora else rank)


def _full_a(a: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """A grouped A (rank, in/g, *k) as PEFT's full A (rank, in, *k): zero outside each group's block.
    An ungrouped A (every layer but a grouped conv) is already PEFT's. A conv's ``a_groups`` is 1 or its
    groups, so a grouped A has ``a_groups`` blocks."""
    a = a.detach()
    g = int(spec.get("a_groups", 1))
    if g == 1:
        return a
    rank, in_g = a.shape[:2]
    full = a.new_zeros((rank, in_g * g, *a.shape[2:]))
    rg = rank // g
    for j in range(g):
        full[j * rg : (j + 1) * rg, j * in_g : (j + 1) * in_g] = a[j * rg : (j + 1) * rg]
    return full


def _grouped_a(full: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The grouped A of a full A whose rows of group j only read input channels of group j, else None."""
    rank, cin = full.shape[:2]
    if groups == 1 or rank % groups or cin % groups:
        return None
    rg, in_g = rank // groups, cin // groups
    blocks = []
    for j in range(groups):
        rows = full[j * rg : (j + 1) * rg]
        outside = torch.cat([rows[:, : j * in_g], rows[:, (j + 1) * in_g :]], dim=1)
        if outside.numel() and bool(outside.any()):
            return None
        blocks.append(rows[:, j * in_g : (j + 1) * in_g])
    return torch.cat(blocks, dim=0)


def export_peft(
    record: AdapterRecord,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``record`` as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads."""
    cfg = record.config
    src = record.tensors
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets = []
    for path, spec in record.layers.items():
        key = PREFIX + path
        targets.append(path)
        a, b = src[f"{path}.lora_A.weight"], src[f"{path}.lora_B.weight"]
        if spec.get("type") == LoRAEmbedding.__name__:
            pairs = {"lora_embedding_A": a, "lora_embedding_B": b}
        elif spec.get("type") == LoRAMultiheadAttention.__name__:
            pairs = {
                "lora_A.weight": a,
                "lora_B.weight": b,
                f"{_MHA_OUT[1:]}.lora_A.weight": src[f"{path}.out_proj.lora_A.weight"],
                f"{_MHA_OUT[1:]}.lora_B.weight": src[f"{path}.out_proj.lora_B.weight"],
            }
        else:
            pairs = {"lora_A.weight": _full_a(a, spec), "lora_B.weight": b}
        tensors.update({f"{key}.{k}": v for k, v in pairs.items()})
        rank = next(iter(pairs.values())).shape[0]
        scaling = lora_scaling(int(spec["r"]), float(spec["alpha"]), cfg.use_rslora)
        alpha = _peft_alpha(scaling, rank, cfg.use_rslora)
        if rank != cfg.r or not math.isclose(alpha, cfg.alpha, rel_tol=1e-12):
            rank_pattern[re.escape(path)] = rank
            alpha_pattern[re.escape(path)] = alpha
    heads = list(record.heads)
    for path in heads:
        prefix = path + "."
        tensors.update({PREFIX + k: t for k, t in src.items() if k.startswith(prefix) and PREFIX + k not in tensors})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": cfg.use_rslora,
        "lora_dropout": cfg.dropout,
        "modules_to_save": heads or None,
        "bias": "none",
        # transformers' Conv1D stores its weight (in, out): PEFT's name for that layout (it sets the flag per
        # module by the module's type on loading, so a mix with nn.Linear layers loads right as well)
        "fan_in_fan_out": any(spec.get("type") == LoRATransposedLinear.__name__ for spec in record.layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(data, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module whose name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def import_peft(backbone: nn.Module, directory: str | os.PathLike, *, adapter_name: str = "default") -> AdapterRecord:
    """The record of a PEFT LoRA directory, for ``backbone`` (an adapter not called "default" may sit in
    a subfolder named after it). PEFT keeps no backbone fingerprint: the record's is ""."""
    root = Path(directory)
    if not (root / CONFIG_NAME).exists() and (root / adapter_name / CONFIG_NAME).exists():
        root = root / adapter_name
    try:
        cfg = json.loads((root / CONFIG_NAME).read_text())
        data = (root / WEIGHTS_NAME).read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"{root}: not a PEFT adapter directory ({exc.strerror}: {exc.filename})") from None
    except json.JSONDecodeError:
        raise AdapterFileError(f"{root / CONFIG_NAME}: not valid JSON") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{root}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters import")
    if cfg.get("use_dora"):
        raise AdapterFileError(f"{root}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{root}: LoRA bias {cfg['bias']!r} is not supported (only 'none')")
    source = str(root / WEIGHTS_NAME)
    raw, _ = read_tensors(data, source)
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: unexpected key {key} (PEFT keys start with {PREFIX!r})")
        key = key[len(PREFIX) :]
        m = re.fullmatch(r"(.+?)(\.base_layer\.out_proj)?\.(lora_A\.weight|lora_B\.weight|lora_embedding_[AB])", key)
        if m is None:
            rest[key] = t
            continue
        path, out_proj, part = m.groups()
        part = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}.get(part, part)
        tensors[f"{path}{'.out_proj' if out_proj else ''}.{part}"] = t
        specs.setdefault(path, {})
    for path, spec in specs.items():
        module = module_at(backbone, path)
        a = tensors.get(f"{path}.lora_A.weight")
        if a is None:
            raise AdapterFileError(f"{source}: missing key {PREFIX}{path}.lora_A.weight")
        rank = int(_pattern_value(rank_pattern, path, r0))
        alpha = float(_pattern_value(alpha_pattern, path, alpha0))
        if a.shape[0] != rank:
            raise AdapterFileError(
                f"{source}: key {PREFIX}{path}.lora_A.weight has rank {a.shape[0]}, the config says {rank}"
            )
        spec.update(r=rank, alpha=alpha)
        if (cls := lora_class_for(module)) is not None:  # without one, adding the record names the module
            spec["type"] = cls.__name__
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            grouped = _grouped_a(a, module.groups)
            spec.update(rank=rank, a_groups=1 if grouped is None else module.groups)
            if grouped is not None:
                tensors[f"{path}.lora_A.weight"] = grouped
    heads = _head_paths(backbone, rest, source)
    tensors.update(rest)
    config = LoRAConfig(
        r=r0,
        alpha=alpha0,
        targets=sorted(specs),
        heads=heads,
        use_rslora=rslora,
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
    )
    meta = {"imported_from": {"format": "peft", "base_model_name_or_path": cfg.get("base_model_name_or_path")}}
    return AdapterRecord(config=config, layers=specs, heads=heads, tensors=tensors, metadata=meta, source=source)


def _head_paths(backbone: nn.Module, rest: dict[str, torch.Tensor], source: str) -> list[str]:
    """The module paths of full tensors (PEFT's modules_to_save), found by walking up each key."""
    modules = dict(backbone.named_modules())
    heads: list[str] = []
    for key in sorted(rest):
        path = key.rpartition(".")[0]
        while path and path not in modules:
            path = path.rpartition(".")[0]
        if not path or key[len(path) + 1 :] not in modules[path].state_dict():
            raise AdapterFileError(f"{source}: unexpected key {PREFIX}{key}")
        if path not in heads:
            heads.append(path)
    return heads
