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

import regex
import safetensors.torch
import torch
from torch import nn

from ..adapter import module_at
from ..errors import AdapterFileError, AdapterHubWarning, ConfigError
from ..lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRAMultiheadAttention,
    LoRATransposedLinear,
    is_norm,
    lora_class_for,
    lora_scaling,
)
from .adapter_file import read_file, read_tensors
from .record import AdapterRecord

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_MHA_OUT = ".base_layer.out_proj"
_CONFIG_MAX = 16 * 1024 * 1024  # a PEFT config is a few KB; a larger one is not one


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


def _exact_pattern_key(path: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that PEFT applies to the module ``path`` alone. PEFT tries a key
    as ``re.match(rf"(.*\\.)?({key})$", name)``: a bare path also hits every module whose name ends with "." +
    path ("lin0" hits "block.lin0", "0" hits "1.0"). Behind a prefix the anchor ``^`` cannot match, so the
    anchored, escaped path hits ``path`` only."""
    return "^" + re.escape(path)


def _exact_targets(paths: list[str]) -> str:
    """PEFT's ``target_modules`` for exactly ``paths``. A list would also target every module whose name ends
    with "." + a listed path; a string is one regex that PEFT matches against the full module name."""
    return "|".join(re.escape(p) for p in sorted(paths))


def _check_heads_keep_targets(heads: list[str], targets: list[str]) -> None:
    """PEFT wraps every module whose name ends with a ``modules_to_save`` entry and never puts LoRA on a module
    whose name holds one as whole segments (``re.match(rf"(^|.*\\.){m}($|\\..*)", name)``, the entry taken as
    a regex); a target caught that way would lose its LoRA in PEFT without an error, so such an export is
    refused."""
    for head in heads:
        for target in targets:
            if target.endswith(head) or re.match(rf"(^|.*\.){head}($|\..*)", target):
                raise ConfigError(
                    f"cannot export to PEFT: its modules_to_save entry {head!r} (a head) would also catch the LoRA "
                    f"target {target!r}, which PEFT would then load without its LoRA"
                )


class PeftCompatibilityWarning(AdapterHubWarning):
    """An exported adapter that PEFT loads but computes differently from adapter-hub (a known PEFT bug)."""


def peft_caveats(record: AdapterRecord) -> list[str]:
    """One line per way PEFT (≤ 0.21) computes this adapter differently from adapter-hub's dense W + ΔW."""
    mha = sorted(p for p, s in record.layers.items() if s.get("type") == LoRAMultiheadAttention.__name__)
    if not mha:
        return []
    more = f" (and {len(mha) - 1} more)" if len(mha) > 1 else ""
    return [
        f"PEFT <= 0.21 adds the out_proj delta of an nn.MultiheadAttention LoRA twice in its forward "
        f"(huggingface/peft PR #3774), so inside PEFT {mha[0]}{more} gives other outputs than here"
    ]


# DoRA: PEFT saves each layer's magnitude as <path>.lora_magnitude_vector, of shape (out,) for a linear layer
# (transformers' Conv1D too) and (1, out, 1, …) for a conv (the shape of its conv weight norm); adapter-hub keeps
# it as (out,). PEFT's DoRA on a grouped conv multiplies B by A over all input channels and reshapes that into
# the grouped kernel, which is not W + ΔW: such a layer is refused both ways.
_GROUPED_DORA = (
    "PEFT's DoRA on a grouped conv reshapes B·A over all input channels into the grouped kernel, so its norm and "
    "output are not those of W + ΔW"
)


def _peft_magnitude(m: torch.Tensor, b: torch.Tensor, spec: dict[str, Any], path: str) -> torch.Tensor:
    """A DoRA magnitude (out,) in PEFT's saved shape (``b``, the layer's B, tells a conv by its kernel dims)."""
    if int(spec.get("a_groups", 1)) > 1:
        raise ConfigError(f"cannot export the DoRA layer {path} to PEFT: {_GROUPED_DORA}")
    return m if b.dim() == 2 else m.reshape(1, -1, *[1] * (b.dim() - 2))


def _import_magnitude(module: nn.Module, path: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check the DoRA magnitude of ``path`` and store it as adapter-hub's (out,); refuse where DoRA is not exact."""
    cls = lora_class_for(module)
    if cls is None or not cls.supports_dora:
        raise AdapterFileError(
            f"{source}: use_dora=True on {path}, a {type(module).__name__}: DoRA imports for Linear, transformers' "
            "Conv1D and Conv1d/2d/3d layers only"
        )
    if getattr(module, "groups", 1) > 1:
        raise AdapterFileError(f"{source}: use_dora=True on the grouped conv {path} is not imported: {_GROUPED_DORA}")
    key = f"{path}.lora_magnitude_vector"
    m = tensors.get(key)
    if m is None:
        raise AdapterFileError(f"{source}: missing key {PREFIX}{key} (the config says use_dora=True)")
    w = module.weight
    out = w.shape[1] if cls is LoRATransposedLinear else w.shape[0]
    want = (out,) if w.dim() == 2 else (1, out, *[1] * (w.dim() - 2))
    if tuple(m.shape) != want:
        raise AdapterFileError(f"{source}: key {PREFIX}{key} has shape {tuple(m.shape)}, expected {want}")
    tensors[key] = m.reshape(out)


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
        if cfg.use_dora:
            pairs["lora_magnitude_vector"] = _peft_magnitude(src[f"{path}.lora_magnitude_vector"], b, spec, path)
        tensors.update({f"{key}.{k}": v for k, v in pairs.items()})
        rank = next(iter(pairs.values())).shape[0]
        scaling = lora_scaling(int(spec["r"]), float(spec["alpha"]), cfg.use_rslora)
        alpha = _peft_alpha(scaling, rank, cfg.use_rslora)
        if rank != cfg.r or not math.isclose(alpha, cfg.alpha, rel_tol=1e-12):
            rank_pattern[_exact_pattern_key(path)] = rank
            alpha_pattern[_exact_pattern_key(path)] = alpha
    if not targets:
        raise ConfigError(
            "cannot export to PEFT: the adapter has no LoRA layer (heads only), and PEFT loads no adapter without "
            "one; save it as an adapter file instead"
        )
    heads = [*record.heads, *record.norms]  # both are PEFT's modules_to_save: a trained copy per adapter
    _check_heads_keep_targets(heads, targets)
    for path in heads:
        prefix = path + "."
        tensors.update({PREFIX + k: t for k, t in src.items() if k.startswith(prefix) and PREFIX + k not in tensors})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "target_modules": _exact_targets(targets),
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
        "use_dora": cfg.use_dora,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(data, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# A pattern key is a regex from the file: matching is bounded in time so a key built to backtrack
# catastrophically (``(((.*)*)*)*!``) is refused instead of hanging the import.
_PATTERN_SECONDS = 1.0
_PATTERN_KEY_MAX = 1000


def _pattern_value(patterns: dict[str, Any], path: str, default: Any, source: str) -> Any:
    """PEFT's rule (``get_pattern_key``), in the file's key order: the first key ``k`` for which
    ``re.match(rf"(.*\\.)?({k})$", path)`` holds gives the value, i.e. a regex that matches the end of the
    name after a dot or the whole name (``^``-anchored keys: the whole name only); else the entry named
    exactly ``path``, else ``default``. Matched with the ``regex`` package (``re``'s syntax) under a time
    limit."""
    for key, value in patterns.items():
        try:
            hit = regex.match(rf"(.*\.)?({key})$", path, timeout=_PATTERN_SECONDS)
        except regex.error as exc:
            raise AdapterFileError(f"{source}: pattern key {key!r:.200} is not a valid regex ({exc})") from None
        except TimeoutError:
            raise AdapterFileError(
                f"{source}: pattern key {key!r:.200} takes more than {_PATTERN_SECONDS:g} s to match {path!r}; "
                "refused (a regex that backtracks without end)"
            ) from None
        if hit:
            return value
    return patterns.get(path, default)


def _read_config(root: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a mapping whose fields that the import reads have PEFT's types: r and
    rank_pattern values positive integers, lora_alpha and alpha_pattern values finite numbers, flags true or
    false, lora_dropout in [0, 1), modules_to_save a list of names, pattern keys strings of at most
    _PATTERN_KEY_MAX characters. Anything else is one AdapterFileError naming the field."""
    path = root / CONFIG_NAME
    text = read_file(path, "a PEFT config", limit=_CONFIG_MAX)
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError):
        raise AdapterFileError(f"{path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{path}: not a PEFT config (a JSON object)")

    def bad(name: str, want: str) -> AdapterFileError:
        return AdapterFileError(f"{path}: {name} must be {want}, got {_shown(cfg.get(name))}")

    def whole(value: Any) -> bool:
        return type(value) is int and value >= 1

    def finite(value: Any) -> bool:
        return type(value) in (int, float) and math.isfinite(value)

    if not whole(cfg.get("r", 8)):
        raise bad("r", "a positive integer")
    if not finite(cfg.get("lora_alpha", 8)) or cfg.get("lora_alpha", 8) == 0:
        raise bad("lora_alpha", "a finite, non-zero number")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
        if cfg.get(flag) not in (None, True, False):
            raise bad(flag, "true or false")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (finite(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    for name, ok, want in (("rank_pattern", whole, "a positive integer"), ("alpha_pattern", finite, "a finite number")):
        patterns = cfg.get(name) or {}
        if not isinstance(patterns, dict):
            raise bad(name, "a mapping of module patterns to numbers")
        for key, value in patterns.items():
            if len(key) > _PATTERN_KEY_MAX:
                raise AdapterFileError(f"{path}: {name} key {_shown(key)} is longer than {_PATTERN_KEY_MAX} characters")
            if not ok(value):
                raise AdapterFileError(f"{path}: {name}[{_shown(key)}] must be {want}, got {_shown(value)}")
    modules = cfg.get("target_modules")
    names = [modules] if isinstance(modules, str) else modules
    if modules is not None and not (isinstance(names, list) and all(isinstance(m, str) for m in names)):
        raise bad("target_modules", "a module name, a regex or a list of module names")
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise bad("modules_to_save", "a list of module names")
    if not isinstance(cfg.get("peft_type"), str | None):
        raise bad("peft_type", "a string")
    return cfg


# Every field of PEFT's LoraConfig (peft 0.21) is in exactly one of the three tables below.
# Read exactly, or without effect on what the saved tensors compute. The tensors' keys name the adapted modules,
# so target_modules, exclude_modules, layers_to_transform and layers_pattern are honoured by construction; PEFT
# sets fan_in_fan_out per layer type whatever the file says (False for nn.Linear, True for transformers' Conv1D),
# as the import does; lora_dropout and velora_config act in training only (VeLoRA approximates A's gradient;
# its forward is plain LoRA); the *_config fields of eva/corda/lora_ga/loftq only feed the initialisation
# named by init_lora_weights, judged there; use_dora is read layer by layer (_import_magnitude).
HARMLESS_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "fan_in_fan_out",
    "modules_to_save", "megatron_core", "eva_config", "corda_config", "lora_ga_config", "loftq_config",
    "velora_config", "qalora_group_size", "runtime_config", "use_dora",
})  # fmt: skip
# Refused whenever set (not None/False/empty): what the field does that adapter-hub does not compute.
REFUSED_FIELDS = {
    "lora_bias": "lora_B carries a bias (ΔW·x + b)",
    "target_parameters": "LoRA on raw parameters (PEFT's ParamWrapper) is read in another layout than a module's",
    "alora_invocation_tokens": "Activated LoRA applies the delta only from the invocation tokens on",
    "layer_replication": "PEFT repeats backbone layers to build a deeper model",
    "trainable_token_indices": "PEFT also trains single embedding rows (trainable tokens)",
    "megatron_config": "Megatron tensor-parallel layers",
    "use_qalora": "QALoRA pools A's input in groups",
    "monteclora_config": "MonteCLoRA samples its factors",
    "kasa_config": "KaSA truncates the backbone weight's singular values and adds a learned diagonal",
    "arrow_config": "Arrow routes each token among several adapters",
    "use_bdlora": "BD-LoRA stores block-diagonal factors in a compact layout",
    "ensure_weight_tying": "PEFT ties the LoRA of the output layer to the input embedding's",
}
# init_lora_weights: these made the adapter against a base PEFT rewrote (W - s·B₀·A₀, or LoftQ's quantised W),
# so its tensors fit only that base; PEFT converts such an adapter to plain LoRA when saved with
# path_initial_model_for_weight_conversion (the config then says True). The others leave the base untouched.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
VALUE_JUDGED_FIELDS = ("bias", "init_lora_weights")  # refused for some values only (see _refuse_changed_maths)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")


def _plain_name(name: Any) -> bool:
    """Whether ``name`` is one folder name: a subfolder of the directory, never a way out of it."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _unset(value: Any) -> bool:
    """PEFT switches these features on by the field's truth value (None, False, 0 and empty mean off)."""
    return not value


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_changed_maths(cfg: dict[str, Any], root: Path) -> None:
    """One line naming the first config field whose value changes what the tensors compute in a way the import
    does not reproduce exactly; a field this version does not know is refused when set (it may be such a field)."""
    for name, value in cfg.items():
        if name == "bias" and value not in (None, "none"):
            why = "PEFT trained the backbone's biases too; adapter-hub never changes backbone parameters"
        elif name == "init_lora_weights" and not (isinstance(value, bool) or str(value).lower() in _PLAIN_INITS):
            rewritten = str(value).lower().startswith(_BASE_REWRITING_INITS)
            why = (
                "the adapter belongs to a backbone PEFT rewrote when it made it; save it in PEFT with "
                "path_initial_model_for_weight_conversion to get a plain LoRA"
                if rewritten
                else "an initialisation this version does not know (it may have rewritten the backbone)"
            )
        elif name in REFUSED_FIELDS and not _unset(value):
            why = REFUSED_FIELDS[name]
        elif name not in HARMLESS_FIELDS and name not in (*VALUE_JUDGED_FIELDS, *REFUSED_FIELDS):
            if _unset(value):
                continue
            why = "a LoraConfig field this version does not know; it may change the adapter's maths"
        else:
            continue
        raise AdapterFileError(f"{root}: {name}={_shown(value)} is not supported: {why}")


def import_peft(backbone: nn.Module, directory: str | os.PathLike, *, adapter_name: str = "default") -> AdapterRecord:
    """The record of a PEFT LoRA directory, for ``backbone`` (an adapter not called "default" may sit in
    a subfolder named after it). PEFT keeps no backbone fingerprint: the record's is ""."""
    if not _plain_name(adapter_name):
        raise AdapterFileError(f"PEFT adapter name {_shown(adapter_name)} must be one folder name (no '/', not '..')")
    root = Path(directory)
    if not (root / CONFIG_NAME).exists() and (root / adapter_name / CONFIG_NAME).exists():
        root = root / adapter_name
    if not root.is_dir():
        why = "not a directory" if root.exists() else "it does not exist"
        raise AdapterFileError(f"{root}: not a PEFT adapter directory ({why})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).exists():
            raise AdapterFileError(f"{root}: not a PEFT adapter directory (no {name})")
    cfg = _read_config(root)
    data = read_file(root / WEIGHTS_NAME, "PEFT weights")
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{root}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters import")
    use_dora = bool(cfg.get("use_dora"))  # DoRA: each layer's magnitude is read too (_import_magnitude)
    _refuse_changed_maths(cfg, root)
    source = str(root / WEIGHTS_NAME)
    raw, _ = read_tensors(data, source)
    r0, alpha0 = cfg.get("r", 8), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    rest: dict[str, torch.Tensor] = {}
    embedding_keyed: set[str] = set()  # paths whose pair is saved as lora_embedding_A/B
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: unexpected key {key} (PEFT keys start with {PREFIX!r})")
        key = key[len(PREFIX) :]
        # without use_dora a magnitude stays in ``rest``, where it is refused as DoRA's
        parts = r"lora_A\.weight|lora_B\.weight|lora_embedding_[AB]" + (r"|lora_magnitude_vector" if use_dora else "")
        m = re.fullmatch(rf"(.+?)(\.base_layer\.out_proj)?\.({parts})", key)
        if m is None:
            rest[key] = t
            continue
        path, out_proj, part = m.groups()
        if part.startswith("lora_embedding_"):
            embedding_keyed.add(path)
        part = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}.get(part, part)
        tensors[f"{path}{'.out_proj' if out_proj else ''}.{part}"] = t
        specs.setdefault(path, {})
    for path, spec in specs.items():
        module = module_at(backbone, path)
        _check_pair_kind(module, path, path in embedding_keyed, source)
        a = tensors.get(f"{path}.lora_A.weight")
        if a is None:
            raise AdapterFileError(f"{source}: missing key {PREFIX}{path}.lora_A.weight")
        rank = int(_pattern_value(rank_pattern, path, r0, source))
        alpha = float(_pattern_value(alpha_pattern, path, alpha0, source))
        if a.shape[0] != rank:
            raise AdapterFileError(
                f"{source}: key {PREFIX}{path}.lora_A.weight has rank {a.shape[0]}, the config says {rank}"
            )
        spec.update(r=rank, alpha=alpha)
        if use_dora:
            _import_magnitude(module, path, tensors, source)
        if (cls := lora_class_for(module)) is not None:  # without one, adding the record names the module
            spec["type"] = cls.__name__
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            grouped = _grouped_a(a, module.groups)
            spec.update(rank=rank, a_groups=1 if grouped is None else module.groups)
            if grouped is not None:
                tensors[f"{path}.lora_A.weight"] = grouped
    rest = _without_known_extras(backbone, rest, specs, source, velora=not _unset(cfg.get("velora_config")))
    saved = _head_paths(backbone, rest, specs, source)
    # a normalisation layer among modules_to_save is a norm the adapter owns; anything else is a head
    norms = [p for p in saved if is_norm(module_at(backbone, p), "all")]
    heads = [p for p in saved if p not in norms]
    tensors.update(rest)
    config = LoRAConfig(
        r=r0,
        alpha=alpha0,
        targets=sorted(specs),
        heads=heads,
        use_rslora=rslora,
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        use_dora=use_dora,
        norm_layers=_norm_policy(backbone, norms),
    )
    meta = {"imported_from": {"format": "peft", "base_model_name_or_path": cfg.get("base_model_name_or_path")}}
    return AdapterRecord(
        config=config, layers=specs, heads=heads, tensors=tensors, metadata=meta, source=source, norms=norms
    )


def _norm_policy(backbone: nn.Module, norms: list[str]) -> str:
    """The ``norm_layers`` that describes the norms an imported adapter owns (its record lists them)."""
    if not norms:
        return "frozen"
    kinds = {isinstance(module_at(backbone, p), nn.modules.batchnorm._BatchNorm) for p in norms}
    return "batchnorm" if kinds == {True} else "all"


def _check_pair_kind(module: nn.Module, path: str, embedding_keyed: bool, source: str) -> None:
    """PEFT saves an nn.Embedding's pair as lora_embedding_A/B (A: (r, num_embeddings)) and every other
    module's as lora_A/lora_B.weight; the other name on a module means another layout (a square embedding would
    be read transposed), so it is refused."""
    is_embedding = isinstance(module, nn.Embedding)
    if embedding_keyed and not is_embedding:
        raise AdapterFileError(
            f"{source}: key {PREFIX}{path}.lora_embedding_A: PEFT writes lora_embedding_A/B for an nn.Embedding "
            f"only, and {path} is a {type(module).__name__}"
        )
    if is_embedding and not embedding_keyed:
        raise AdapterFileError(
            f"{source}: key {PREFIX}{path}.lora_A.weight on the nn.Embedding {path}: PEFT saves an embedding "
            f"module's LoRA as lora_embedding_A/B (lora_A/lora_B on one come from target_parameters, another layout)"
        )


# Keys that belong to a PEFT feature adapter-hub does not import, named in the refusal.
_FEATURE_KEYS = (
    (re.compile(r".*\.lora_magnitude_vector(\..*)?"), "DoRA (use_dora)"),
    (re.compile(r".*\.lora_B\.bias"), "lora_bias"),
    (re.compile(r".*\.trainable_tokens_delta"), "trainable tokens (trainable_token_indices)"),
    (re.compile(r".*\.lora_diag(\..*)?"), "KaSA (kasa_config)"),
    (re.compile(r".*\.lora_monteclora_sampler\..*"), "MonteCLoRA (monteclora_config)"),
    (re.compile(r".*\.lora_arrow\..*"), "Arrow (arrow_config)"),
    (re.compile(r".*\.lora_velora_embed"), "VeLoRA (velora_config)"),
)


def _without_known_extras(
    backbone: nn.Module, rest: dict[str, torch.Tensor], specs: dict[str, Any], source: str, *, velora: bool
) -> dict[str, torch.Tensor]:
    """``rest`` without what PEFT saves beside the LoRA pairs and adds nothing: VeLoRA's projection buffer (used
    in training only), and a copy of an adapted module's own tensor under ``<path>.base_layer.`` (PEFT saves a
    targeted embedding's weight so), accepted only when bit-identical to this backbone's. A key of a PEFT
    feature that is not imported is refused, naming the feature."""
    kept: dict[str, torch.Tensor] = {}
    for key, t in rest.items():
        if velora and key.endswith(".lora_velora_embed"):
            continue
        for pattern, feature in _FEATURE_KEYS:
            if pattern.fullmatch(key):
                raise AdapterFileError(
                    f"{source}: key {PREFIX}{key} belongs to PEFT's {feature}, which adapter-hub does not import"
                )
        m = re.fullmatch(r"(.+?)\.base_layer\.(.+)", key)
        if m is None or m.group(1) not in specs:
            kept[key] = t
            continue
        path, name = m.groups()
        own = module_at(backbone, path).state_dict().get(name)
        if own is None or own.dtype != t.dtype or own.shape != t.shape or not torch.equal(own, t):
            raise AdapterFileError(
                f"{source}: key {PREFIX}{key} is a copy of the adapted module's {name} that differs from this "
                f"backbone's {path}.{name} (the adapter was saved with another base weight)"
            )
    return kept


def _head_paths(backbone: nn.Module, rest: dict[str, torch.Tensor], specs: dict[str, Any], source: str) -> list[str]:
    """The module paths of full tensors (PEFT's modules_to_save), found by walking up each key. A tensor of a
    module that also has a LoRA pair is a trained backbone parameter (PEFT's bias="all"/"lora_only"): refused."""
    modules = dict(backbone.named_modules())
    heads: list[str] = []
    for key in sorted(rest):
        path = key.rpartition(".")[0]
        while path and path not in modules:
            path = path.rpartition(".")[0]
        if not path or key[len(path) + 1 :] not in modules[path].state_dict():
            raise AdapterFileError(f"{source}: unexpected key {PREFIX}{key}")
        if path in specs:
            raise AdapterFileError(
                f"{source}: key {PREFIX}{key} is a parameter of the adapted module {path} (PEFT saves those "
                f"when it trains backbone biases), which adapter-hub does not change"
            )
        if path not in heads:
            heads.append(path)
    return heads
