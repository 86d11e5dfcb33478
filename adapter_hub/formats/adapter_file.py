"""The adapter file: one safetensors file per adapter.

Tensor keys are ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's shapes; an attention
module's out_proj under ``<path>.out_proj.lora_A.weight``) and each head's state under its module
path. The header metadata holds the format version, the backbone fingerprint, the config and the exact
geometry of every layer, so a file rebuilds the same adapter without guessing. A DoRA adapter adds each
layer's magnitude under ``<module path>.lora_magnitude_vector`` (one value per output channel), sets
``use_dora`` in the config and is written as format version 2, which older readers refuse. An adapter that
owns normalisation layers lists them in ``adapter_hub.norms`` (their state under their paths, like a head's)
and is written as format version 3.

This module is a codec between an ``AdapterRecord`` and those bytes (``encode`` / ``decode``, ``save`` /
``load`` for files); ``AdapterModel`` turns adapters into records and back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import AdapterFileError
from ..lora import LoRAConfig
from .record import AdapterRecord

# 1: plain LoRA. 2: DoRA (``use_dora`` in the config, a ``<path>.lora_magnitude_vector`` per layer); a reader
# of version 1 refuses it as newer instead of running it as plain LoRA. Plain LoRA adapters are still
# written as version 1, byte for byte as before, so older readers keep reading them. 3: norms owned by the
# adapter (``adapter_hub.norms``); a reader of 1 or 2 would run the backbone's norms instead, so it must refuse.
FORMAT_VERSION = 3
_DORA_VERSION = 2
_PLAIN_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


def format_version(record: AdapterRecord) -> int:
    """The oldest format that holds ``record``: 3 when it owns norms, 2 for a DoRA adapter, 1 otherwise."""
    if record.norms:
        return FORMAT_VERSION
    return _DORA_VERSION if record.config.use_dora else _PLAIN_VERSION


def _config_json(record: AdapterRecord) -> str:
    config = record.config.to_dict()
    if not config.get("use_dora"):
        del config["use_dora"]  # absent means plain LoRA: a plain adapter's bytes stay what version 1 wrote
    if config.get("norm_layers") == "frozen":
        del config["norm_layers"]  # absent means frozen, which is all that versions 1 and 2 knew
    return json.dumps(config, sort_keys=True)


def header_metadata(record: AdapterRecord) -> dict[str, str]:
    """The safetensors header metadata of ``record`` (every value a string, as safetensors requires)."""
    return {
        "format": "pt",
        "adapter_hub.format_version": str(format_version(record)),
        "adapter_hub.backbone_fingerprint": record.fingerprint,
        "adapter_hub.config": _config_json(record),
        "adapter_hub.layers": json.dumps(record.layers, sort_keys=True),
        "adapter_hub.heads": json.dumps(list(record.heads)),
        "adapter_hub.metadata": json.dumps(record.metadata, sort_keys=True),
        **({"adapter_hub.norms": json.dumps(list(record.norms))} if record.norms else {}),
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


def encode(record: AdapterRecord) -> bytes:
    """The file's exact bytes; the same record always gives the same bytes."""
    return canonical_safetensors(record.tensors, header_metadata(record))


def save(record: AdapterRecord, path: str | os.PathLike) -> None:
    """Write ``record`` as an adapter file at ``path``."""
    write_atomic(path, encode(record))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
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


def decode(data: bytes, source: str = "adapter data") -> AdapterRecord:
    """The record in adapter-file bytes; ``source`` (a path, say) is named in every error. Whether the
    record fits a backbone is the model's check (``AdapterModel.add_adapter_from_record``)."""
    tensors, meta = read_tensors(data, source)
    if "adapter_hub.layers" not in meta:
        raise AdapterFileError(f"{source}: not an adapter-hub adapter file (no adapter_hub metadata)")
    try:
        version = int(meta.get("adapter_hub.format_version", "0"))
    except ValueError:
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata (format version is not a number)") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source}: adapter file format {version} is newer than this adapter-hub reads ({FORMAT_VERSION}); "
            "upgrade adapter-hub"
        )
    try:
        config = LoRAConfig.from_dict(json.loads(meta["adapter_hub.config"]))
        specs = json.loads(meta["adapter_hub.layers"])
        heads = json.loads(meta.get("adapter_hub.heads", "[]"))
        norms = json.loads(meta.get("adapter_hub.norms", "[]"))
        extra = json.loads(meta.get("adapter_hub.metadata", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata ({exc})") from None
    paths_ok = all(isinstance(x, list) and all(isinstance(p, str) for p in x) for x in (heads, norms))
    if not isinstance(specs, dict) or not paths_ok or not isinstance(extra, dict):
        raise AdapterFileError(
            f"{source}: malformed adapter_hub metadata (layers, heads, norms or metadata of a wrong type)"
        )
    return AdapterRecord(
        config=config,
        layers=specs,
        heads=heads,
        tensors=tensors,
        metadata=extra,
        fingerprint=meta.get("adapter_hub.backbone_fingerprint", ""),
        source=source,
        norms=norms,
    )


def load(path: str | os.PathLike) -> AdapterRecord:
    """The record in the adapter file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc.strerror})") from None
    return decode(data, source=str(path))
