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
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import AdapterFileError
from ..lora import LoRAConfig, LoRAConfigError
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFileError(f"{source}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{source}: not a safetensors file (header is not a mapping)")
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise AdapterFileError(f"{source}: not a safetensors file (metadata is not a mapping of strings)")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise AdapterFileError(f"{source}: not a safetensors file (tensor {key!r} has no valid data_offsets)")
        ends.append(offsets[1])
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
    if version < 1:
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata (format version {version})")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{source}: adapter file format {version} is newer than this adapter-hub reads ({FORMAT_VERSION}); "
            "upgrade adapter-hub"
        )
    try:
        config = LoRAConfig.from_dict(_json(meta, "adapter_hub.config", None, dict, source))
    except LoRAConfigError as exc:
        raise AdapterFileError(f"{source}: adapter_hub.config: {exc}") from None
    specs = _json(meta, "adapter_hub.layers", None, dict, source)
    heads = _json(meta, "adapter_hub.heads", "[]", list, source)
    norms = _json(meta, "adapter_hub.norms", "[]", list, source)
    extra = _json(meta, "adapter_hub.metadata", "{}", dict, source)
    if not all(isinstance(p, str) and p for p in (*heads, *norms)):
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata (heads and norms must be lists of paths)")
    if not all(isinstance(spec, dict) for spec in specs.values()):
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata (each layer's record must be a mapping)")
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


def _json(meta: Mapping[str, str], key: str, default: str | None, kind: type, source: str) -> Any:
    """The JSON value of metadata ``key`` (``default`` when absent; required when None), of type ``kind``."""
    text = meta.get(key, default)
    if text is None:
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata (no {key})")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a hostile header nested thousands deep
        raise AdapterFileError(f"{source}: malformed adapter_hub metadata ({key} is not valid JSON)") from None
    if not isinstance(value, kind):
        raise AdapterFileError(
            f"{source}: malformed adapter_hub metadata ({key} must be a JSON {'object' if kind is dict else 'array'}, "
            f"got {type(value).__name__})"
        )
    return value


def load(path: str | os.PathLike) -> AdapterRecord:
    """The record in the adapter file at ``path`` (a regular file; see ``read_file``)."""
    return decode(read_file(path, "an adapter file"), source=str(path))


# A regular file is read whole; this bounds what a path given by a user may cost in memory
# (ADAPTER_HUB_MAX_FILE_BYTES changes it).
MAX_FILE_BYTES = 16 * 1024**3


def max_file_bytes() -> int:
    text = os.environ.get("ADAPTER_HUB_MAX_FILE_BYTES")
    if text is None:
        return MAX_FILE_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise AdapterFileError(f"ADAPTER_HUB_MAX_FILE_BYTES must be a positive whole number of bytes, got {text!r}")
    return value


def read_file(path: str | os.PathLike, what: str, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed), refused in one AdapterFileError line when
    it is missing, not a regular file (a directory, /dev/zero, a pipe: these could be read without end) or
    larger than ``limit`` (default: ``max_file_bytes()``)."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; it changes nothing for a regular file
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise AdapterFileError(f"{path} is a directory, not {what}")
            if not stat.S_ISREG(info.st_mode):
                raise AdapterFileError(f"{path} is not a regular file ({what} is read from one)")
            most = limit or max_file_bytes()
            if info.st_size > most:
                raise AdapterFileError(
                    f"{path}: {info.st_size:,} bytes, more than {what} may take here ({most:,}"
                    + ("" if limit else "; ADAPTER_HUB_MAX_FILE_BYTES raises the limit") + ")"
                )
            data = f.read(info.st_size + 1)
    except IsADirectoryError:
        raise AdapterFileError(f"{path} is a directory, not {what}") from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > info.st_size:
        raise AdapterFileError(f"{path}: the file grew while it was read")
    return data
