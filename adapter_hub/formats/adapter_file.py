"""The adapter file: one safetensors file per adapter.

Tensor keys are ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's shapes; an attention
module's out_proj under ``<path>.out_proj.lora_A.weight``) and each head's state under its module
path. The header metadata holds the format version, the backbone fingerprint, the config and the exact
geometry of every layer, so a file rebuilds the same adapter without guessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError, FingerprintMismatch
from ..lora import LoRAConfig, plain_copy
from ..lora.conv import _LoRAConvNd

if TYPE_CHECKING:
    from ..model import Adapter, AdapterModel

FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": type(layer).__name__, "r": layer.r, "alpha": layer.alpha}
    if isinstance(layer, _LoRAConvNd):
        spec.update(rank=layer.rank, a_groups=layer.a_groups)
    return spec


def adapter_tensors(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file keys (CPU, contiguous)."""
    adapter = model._require(name)
    out: dict[str, torch.Tensor] = {}
    for path, module in [*adapter.layer_items(), *adapter.head_items()]:
        for key, t in module.state_dict().items():
            out[f"{path}.{key}"] = t.detach().cpu().contiguous()
    return out


def adapter_metadata(model: AdapterModel, name: str) -> dict[str, str]:
    adapter = model._require(name)
    return {
        "format": "pt",
        "adapter_hub.format_version": str(FORMAT_VERSION),
        "adapter_hub.backbone_fingerprint": model.fingerprint,
        "adapter_hub.config": json.dumps(adapter.config.to_dict(), sort_keys=True),
        "adapter_hub.layers": json.dumps({p: layer_spec(m) for p, m in adapter.layer_items()}, sort_keys=True),
        "adapter_hub.heads": json.dumps([p for p, _ in adapter.head_items()]),
        "adapter_hub.metadata": json.dumps(adapter.metadata, sort_keys=True),
    }


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Safetensors bytes with a canonical header (sorted keys, tensors in name order).

    ``safetensors.torch.save`` keeps the metadata in a hash map whose order changes from one process
    to the next; artifacts are addressed by their sha256, so the same adapter must give the same bytes.
    The result is a standard safetensors file that ``safetensors`` (and PEFT) read as usual.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def adapter_to_bytes(model: AdapterModel, name: str) -> bytes:
    """The file's exact bytes; the same adapter always gives the same bytes."""
    return canonical_safetensors(adapter_tensors(model, name), adapter_metadata(model, name))


def save_adapter(model: AdapterModel, name: str, path: str | os.PathLike) -> None:
    data = adapter_to_bytes(model, name)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # write then rename: a crash never leaves half a file under the name
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(data: bytes, source: str) -> dict[str, Any]:
    """Parse and check the safetensors header: length, JSON, and that every tensor's bytes are there."""
    if len(data) < 8:
        raise AdapterFileError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or n > len(data) - 8:
        raise AdapterFileError(f"{source}: not a safetensors file, or truncated (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{source}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{source}: not a safetensors file (header is not a mapping)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if max(ends, default=0) > len(data) - 8 - n:
        raise AdapterFileError(f"{source}: truncated ({len(data)} bytes, the header promises more)")
    return header


def read_tensors(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = read_header(data, source)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for any malformed payload
        raise AdapterFileError(f"{source}: unreadable safetensors payload ({exc})") from None
    return tensors, header.get("__metadata__") or {}


def adapter_from_bytes(
    model: AdapterModel, name: str, data: bytes, *, force: bool = False, source: str = "adapter data"
) -> Adapter:
    """Add adapter ``name`` from file bytes. Nothing is modified if anything is wrong."""
    tensors, meta = read_tensors(data, source)
    if "adapter_hub.layers" not in meta:
        raise AdapterFileError(f"{source}: not an adapter-hub adapter file (no adapter_hub metadata)")
    version = int(meta.get("adapter_hub.format_version", "0"))
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source}: adapter file format {version} is newer than this adapter-hub reads ({FORMAT_VERSION}); "
            "upgrade adapter-hub"
        )
    fp = meta.get("adapter_hub.backbone_fingerprint", "")
    if fp != model.fingerprint and not force:
        raise FingerprintMismatch(
            f"{source}: made for backbone {fp[:12] or '?'}…, this backbone is {model.fingerprint[:12]}… "
            "(pass force=True to load anyway)"
        )
    if name in model.adapters:
        raise ConfigError(f"an adapter named {name!r} already exists (delete_adapter it first)")
    try:
        config = LoRAConfig.from_dict(json.loads(meta["adapter_hub.config"]))
        specs = json.loads(meta["adapter_hub.layers"])
        heads = json.loads(meta.get("adapter_hub.heads", "[]"))
        extra = json.loads(meta.get("adapter_hub.metadata", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata ({exc})") from None
    config.heads = list(heads)
    return build_adapter(model, name, config, specs, tensors, source=source, metadata=extra)


def build_adapter(
    model: AdapterModel,
    name: str,
    config: LoRAConfig,
    specs: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    metadata: Mapping[str, Any] | None = None,
) -> Adapter:
    """Create the adapter from explicit layer specs, then fill it from ``tensors`` (keys must match
    exactly, shapes too); on any mismatch the adapter is removed again and the first bad key named."""
    head_modules = {}
    for path in config.heads:
        original = model._module_for_layer(path)
        head_modules[path] = head_from_tensors(original, path, tensors, source)
    adapter = model.add_adapter(name, config, head_modules=head_modules, layer_specs=specs)
    try:
        expected = adapter_tensors(model, name)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise AdapterFileError(f"{source}: missing key {missing[0]}" + _more(missing))
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise AdapterFileError(f"{source}: unexpected key {extra[0]}" + _more(extra))
        for key in sorted(expected):
            if tuple(tensors[key].shape) != tuple(expected[key].shape):
                raise AdapterFileError(
                    f"{source}: key {key} has shape {tuple(tensors[key].shape)}, expected {tuple(expected[key].shape)}"
                )
        for path, module in [*adapter.layer_items(), *adapter.head_items()]:
            prefix = path + "."
            module.load_state_dict({k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)
                                    and k[len(prefix) :] in module.state_dict()})  # fmt: skip
    except Exception:
        model.delete_adapter(name)
        raise
    adapter.metadata = dict(metadata or {})
    return adapter


def head_from_tensors(
    original: nn.Module, path: str, tensors: Mapping[str, torch.Tensor], source: str = "adapter data"
) -> nn.Module:
    """A copy of the backbone's module whose tensors take the saved sizes of their first (output)
    dimension, e.g. a classifier with another number of classes. Any other change of shape is refused."""
    head = plain_copy(original)
    for owner_path, owner in head.named_modules():
        local = {**owner._parameters, **owner._buffers}
        new_outputs = set()
        for attr, t in local.items():
            key = f"{path}.{owner_path + '.' if owner_path else ''}{attr}"
            saved = tensors.get(key)
            if t is None or saved is None or saved.shape == t.shape:
                continue
            if saved.dim() != t.dim() or saved.dim() == 0 or saved.shape[1:] != t.shape[1:]:
                raise AdapterFileError(f"{source}: key {key} has shape {tuple(saved.shape)}, expected {tuple(t.shape)}")
            new_outputs.add(saved.shape[0])
            new = torch.empty(saved.shape, dtype=t.dtype, device=t.device)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(new)
            else:
                owner._buffers[attr] = new
        if len(new_outputs) > 1:
            raise AdapterFileError(f"{source}: the tensors of head {path} disagree on their output size")
        if new_outputs:
            _resize_attributes(owner)
    return head


def _resize_attributes(module: nn.Module) -> None:
    """Keep the size attributes of common layers in step with their new weight."""
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = w.shape[0]
    elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm):
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)
        else:
            module.num_features = w.shape[0]


def load_adapter(model: AdapterModel, name: str, path: str | os.PathLike, *, force: bool = False) -> Adapter:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc.strerror})") from None
    return adapter_from_bytes(model, name, data, force=force, source=str(path))


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
