"""Hugging Face Transformers models as backbones: a sequence classifier around a base model, the default LoRA
targets and pooling per architecture, and the files that carry a tokenizer into the registry.

This module imports torch only; transformers is imported by the functions that load a model or a tokenizer,
so the package works without it."""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks
from .errors import BackboneError, ConfigError, first_line

# The classifier's module path inside SequenceClassifier: the head each adapter replaces with its own.
HEAD = "classifier"
POOLINGS = ("mean", "last")

# LoRA targets by config.model_type, as glob patterns over the wrapper's module names.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), ["*.attention.self.query", "*.attention.self.value"]),
    "distilbert": ["*.attention.q_lin", "*.attention.v_lin"],
    "gpt2": ["*.attn.c_attn", "*.attn.c_proj"],
    **dict.fromkeys(("llama", "mistral", "qwen2"), ["*.self_attn.q_proj", "*.self_attn.v_proj"]),
}
# Decoder-only models see each token's left context only: the last real token summarises the text.
DECODER_ONLY = frozenset({"gpt2", "gpt_neo", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                          "gemma2", "phi", "opt", "falcon", "bloom"})  # fmt: skip

# The tokenizer's outputs the classifier takes, and what padding fills each with.
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
FILES_FORMAT = "adapter-hub/hf-files"


def default_targets(model_type: str) -> list[str]:
    """The LoRA target patterns for a model type; ConfigError naming --targets for a type without defaults."""
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r} (known: {', '.join(sorted(DEFAULT_TARGETS))}); "
            "pass --targets, e.g. --targets '*.q_proj,*.v_proj'"
        )
    return list(DEFAULT_TARGETS[model_type])


def default_pooling(model_type: str, is_decoder: bool = False) -> str:
    """``last`` (last non-padding token) for decoder-only models, ``mean`` (over the attention mask) otherwise."""
    return "last" if model_type in DECODER_ONLY or is_decoder else "mean"


def max_positions(config: Mapping[str, Any]) -> int | None:
    """The most tokens a model of this configuration (a ``config.to_dict()``) takes in one text, if it says.
    RoBERTa-like models number positions from ``pad_token_id + 1``, so two of their positions are never used."""
    value = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(value, int) or value <= 0:
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        value -= int(config.get("pad_token_id") or 0) + 1
    return value


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per text from hidden states (B, L, H) and the attention mask (B, L) of 1s and 0s.

    mean: Σ_t m_t·h_t / Σ_t m_t. last: h at the last position whose mask is 1 (right or left padding alike)."""
    if how == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask != 0)).argmax(1)  # the largest position holding a real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ConfigError(f"unknown pooling {how!r}; choose {' or '.join(POOLINGS)}")


class SequenceClassifier(nn.Module):
    """A Transformers base model, a pooling over its last hidden states and a linear ``classifier``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` takes the tokenizer's outputs as keywords
    and returns logits (B, num_classes). The classifier is the task head: an adapter brings its own."""

    def __init__(self, base: nn.Module, hidden_size: int, num_classes: int, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")
        self.base = base
        self.pooling = pooling
        self.classifier = nn.Linear(hidden_size, num_classes)
        # a classifier never decodes: no key/value cache to build, where the model would build one
        self._no_cache = "use_cache" in inspect.signature(base.forward).parameters

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self._no_cache:
            kwargs["use_cache"] = False
        out = self.base(**kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.classifier(pool(hidden, attention_mask, self.pooling))


def pack_files(files: Mapping[str, bytes]) -> bytes:
    """Files (name -> bytes) as one canonical JSON document: the same files always give the same bytes, so
    the registry stores them once by sha256. Names are plain file names (no folders)."""
    for name in files:
        _check_name(name)
    doc = {"format": FILES_FORMAT, "version": 1,
           "files": {n: base64.b64encode(files[n]).decode("ascii") for n in sorted(files)}}  # fmt: skip
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def unpack_files(data: bytes) -> dict[str, bytes]:
    """The files of :func:`pack_files`; ValueError for bytes that are not such a document (nothing is run,
    and every name is a plain file name, so writing them cannot leave the folder they are written to)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FILES_FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("not a files document")
        if doc.get("version") != 1:
            raise ValueError(f"files document version {doc.get('version')!r}, this adapter-hub reads version 1")
        return {_check_name(n): base64.b64decode(v, validate=True) for n, v in doc["files"].items()}
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, TypeError) as exc:
        raise ValueError(f"malformed files document ({exc})") from None


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} is not a plain file name")
    return name


# --- reading a model directory, rebuilding a recorded one, and the tokenizer ---------------------------
# A Transformers backbone is a SequenceClassifier: the base model of a local `from_pretrained` directory
# (safetensors weights only, never remote code), a pooling and a seeded classifier. Its source records the
# directory, the model's configuration (so that a changed config.json never changes the network under a
# recorded fingerprint), the pooling, the seed and the number of classes. The tokenizer travels as files
# (pack_files) that the registry stores by sha256 beside the record (Hub.add_backbone(files=...)).

TRANSFORMERS_HINT = "Transformers backbones need the transformers package: pip install 'adapter-hub[hf]'"
# Files whose presence says a directory holds a tokenizer (AutoTokenizer would otherwise make an empty one).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")  # fmt: skip
_PROBES = ("Hello, world! The quick brown fox jumps over the lazy dog.", "naïve café 123 ÷ ✓ 日本語", "a")


@dataclass(frozen=True)
class TransformersBackbone:
    """What :func:`from_transformers` reads from a model directory."""

    module: nn.Module  # SequenceClassifier
    source: dict[str, Any]
    architecture: str  # "transformers/<base model class>"
    tokenizer_files: bytes  # pack_files of what tokenizer.save_pretrained writes


def is_transformers(source: dict[str, Any] | None) -> bool:
    """Whether a recorded source is a Transformers model directory."""
    return isinstance(source, dict) and source.get("hf") is not None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise BackboneError(TRANSFORMERS_HINT) from None
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars and no info/warning logs from transformers inside the block (restored after)."""
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def from_transformers(
    directory: str | Path, *, num_classes: int = 2, seed: int = 0, pooling: str | None = None
) -> TransformersBackbone:
    """Read a local Transformers model directory (what ``save_pretrained`` writes for a model and its
    tokenizer): the base model (``AutoModel``, safetensors weights, no remote code) wrapped in a
    SequenceClassifier with ``pooling`` (default by model type: ``last`` for decoder-only models, ``mean``
    otherwise) and a ``num_classes`` classifier drawn from ``seed``, and the tokenizer's files. A missing
    directory, one without a model, weights that do not load or a tokenizer that does not save and reload to
    the same token ids is one BackboneError line."""
    path = Path(directory).expanduser().resolve()
    if not path.exists():
        raise BackboneError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise BackboneError(f"{path} is not a directory: give the folder that save_pretrained wrote")
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path} holds no config.json: it is not a Transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise BackboneError(f"{path} holds no .safetensors weights (a .bin file is never unpickled); save the "
                            "model with save_pretrained, whose default is safetensors")  # fmt: skip
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise BackboneError(f"{path} holds no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, …): save it there with "
                            "tokenizer.save_pretrained")  # fmt: skip
    if pooling is not None and pooling not in POOLINGS:
        raise BackboneError(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")
    transformers = _transformers()
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError… for a config it cannot use
            raise BackboneError(f"cannot read the model configuration in {path}: {first_line(exc)}") from None
        if getattr(config, "is_encoder_decoder", False):
            raise BackboneError(f"{path} holds an encoder-decoder model ({config.model_type}); a Transformers "
                                "backbone is an encoder or a decoder-only model")  # fmt: skip
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                                   trust_remote_code=False)  # fmt: skip
        except Exception as exc:  # no tokenizer files, or files of a tokenizer that needs remote code
            raise BackboneError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers may make one of no files at all
        raise BackboneError(f"the tokenizer in {path} knows only its special tokens: its vocabulary files are missing")
    source = {
        "architecture": None,
        "num_classes": checks.num_classes(num_classes, BackboneError),
        "seed": int(seed),
        "hf": {
            "path": str(path),
            "model_type": config.model_type,
            "config": config.to_dict(),
            "pooling": pooling or default_pooling(config.model_type, bool(getattr(config, "is_decoder", False))),
            "dtype": "float32",
        },
    }
    module = build(source)
    architecture = f"transformers/{type(module.base).__name__}"
    source["architecture"] = architecture
    files = tokenizer_files(tokenizer)
    restored = load_tokenizer(files, source)
    for probe in _PROBES:
        if restored(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise BackboneError(f"the tokenizer in {path} gives other token ids once saved with save_pretrained "
                                f"and loaded again (for {probe!r}); it cannot be recorded faithfully")  # fmt: skip
    return TransformersBackbone(module, source, architecture, files)


def build(source: dict[str, Any]) -> nn.Module:
    """The SequenceClassifier a recorded source describes (see :func:`from_transformers`)."""
    spec = source.get("hf")
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("path", "model_type", "pooling")):
        raise BackboneError("the backbone's Transformers source is malformed (path, model_type, pooling)")
    if not isinstance(spec.get("config"), dict):
        raise BackboneError("the backbone's Transformers source records no model configuration")
    transformers = _transformers()
    path = Path(spec["path"])
    if not path.is_dir():
        raise BackboneError(f"the backbone's model directory {path} does not exist here")
    num_classes = checks.num_classes(source.get("num_classes") or 2, BackboneError)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.for_model(**spec["config"])
        except Exception as exc:  # a model type this transformers does not know, or a config it refuses
            raise BackboneError(f"cannot rebuild the model configuration of {path}: {first_line(exc)}") from None
        dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(source.get("seed") or 0))  # weights missing from the files, and the classifier
            try:
                base, info = transformers.AutoModel.from_pretrained(
                    path, config=config, local_files_only=True, use_safetensors=True, trust_remote_code=False,
                    output_loading_info=True, **dtype,
                )  # fmt: skip
            except Exception as exc:  # unreadable or misshaped weights: transformers raises many types
                raise BackboneError(f"cannot load the weights in {path}: {first_line(exc)}") from None
            # a pooler is not used by the classifier; any other weight missing from the files would be random
            missing = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] != "pooler")
            mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
            if missing or mismatched:
                first = (missing or mismatched)[0]
                raise BackboneError(
                    f"the weights in {path} do not fit the {spec['model_type']} model: {len(missing)} missing, "
                    f"{len(mismatched)} misshaped (first: {first})"
                )
            hidden = getattr(config, "hidden_size", None)
            if not isinstance(hidden, int):
                raise BackboneError(f"the {spec['model_type']} configuration has no hidden_size")
            module = SequenceClassifier(base.float(), hidden, num_classes, spec["pooling"])
    return module.eval()


def tokenizer_files(tokenizer: Any) -> bytes:
    """What ``tokenizer.save_pretrained`` writes, as one pack_files document."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        entries = sorted(Path(tmp).iterdir())
        if any(not p.is_file() for p in entries):
            raise BackboneError("the tokenizer saves folders; only a flat set of files can be recorded")
        return pack_files({p.name: p.read_bytes() for p in entries})


def load_tokenizer(files: bytes, source: dict[str, Any], *, name: str = "the backbone") -> Any:
    """The tokenizer recorded with a Transformers backbone: its files written to a temporary folder (with the
    recorded config.json, which AutoTokenizer may read for the model type) and loaded without remote code."""
    transformers = _transformers()
    try:
        unpacked = unpack_files(files)
    except ValueError as exc:
        raise BackboneError(f"the tokenizer files of {name}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp, _quiet(transformers):
        for file_name, data in unpacked.items():
            (Path(tmp) / file_name).write_bytes(data)
        config = (source.get("hf") or {}).get("config")
        if "config.json" not in unpacked and isinstance(config, dict):
            (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # files this transformers cannot read
            raise BackboneError(f"cannot load the tokenizer of {name}: {first_line(exc)}") from None
    if not set(unpacked) & set(_TOKENIZER_FILES) or len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise BackboneError(f"the recorded tokenizer files of {name} hold no vocabulary")
    return tokenizer
