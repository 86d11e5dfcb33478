"""Backbones: the catalogue of torchvision models with sensible LoRA targets, building a recorded source (a
catalogue or torchvision name, module:callable behind a trust gate, or a Transformers directory through
adapter_hub.hf), loading weights, and rebuilding a record under its fingerprint."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks, hf
from .errors import BackboneError, UntrustedFactory, first_line


@dataclass(frozen=True)
class Entry:
    """How to build one backbone and where its LoRA deltas and its task head go."""

    builder: str  # torchvision.models name, or a function of this module
    targets: list[str]
    head: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def resnet_small(num_classes: int = 10, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)) -> nn.Module:
    """A torchvision ResNet for 8–32 px inputs: 3×3 stride-1 stem, no max-pool."""
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, list(blocks), num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_small(num_classes: int = 10, image_size: int = 8, patch_size: int = 2) -> nn.Module:
    """A torchvision VisionTransformer for 8–32 px inputs (4 layers, width 64)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=num_classes,
    )  # fmt: skip


_RESNET = ["conv1", "layer*.*.conv*", "layer*.*.downsample.0"]
_VIT = ["*.self_attention", "*.mlp.0", "*.mlp.3"]
CATALOGUE: dict[str, Entry] = {
    "resnet18": Entry("resnet18", _RESNET, "fc"),
    "resnet34": Entry("resnet34", _RESNET, "fc"),
    "resnet50": Entry("resnet50", _RESNET, "fc"),
    "mobilenet_v3_small": Entry("mobilenet_v3_small", ["features.*.block.*.0", "classifier.0"], "classifier.3"),
    "mobilenet_v3_large": Entry("mobilenet_v3_large", ["features.*.block.*.0", "classifier.0"], "classifier.3"),
    "efficientnet_b0": Entry("efficientnet_b0", ["features.*.*.block.*.0"], "classifier.1"),
    "convnext_tiny": Entry("convnext_tiny", ["features.*.*.block.3", "features.*.*.block.5"], "classifier.2"),
    "vit_b_16": Entry("vit_b_16", _VIT, "heads.head"),
    "swin_t": Entry("swin_t", ["features.*.*.attn.qkv", "features.*.*.attn.proj", "features.*.*.mlp.0"], "head"),
    "resnet_small": Entry("resnet_small", ["conv1", "layer*.*.conv*"], "fc"),
    "vit_small": Entry("vit_small", _VIT, "heads.head"),
}


def entry(architecture: str) -> Entry:
    if architecture not in CATALOGUE:
        raise BackboneError(f"unknown backbone {architecture!r}; the catalogue has {', '.join(CATALOGUE)}")
    return CATALOGUE[architecture]


TRUSTED_FACTORIES_ENV = "ADAPTER_HUB_TRUSTED_FACTORIES"
_TRUST_CODE: ContextVar[bool] = ContextVar("adapter_hub_trust_code", default=False)


def is_factory(architecture: str) -> bool:
    """Whether an architecture is ``module:callable`` (code to import and run) rather than a catalogue or
    torchvision name (a builder that ships with the package or with torchvision)."""
    return ":" in architecture


def trusted_factories_file() -> Path:
    """``$XDG_CONFIG_HOME/adapter-hub/trusted-factories`` (``~/.config/...`` by default): one
    ``module:callable`` per line that rebuilds may run."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"  # a relative value is ignored (XDG)
    return root / "adapter-hub" / "trusted-factories"


def trusted_factories() -> set[str]:
    """The factories the local user allows: ``$ADAPTER_HUB_TRUSTED_FACTORIES`` (comma-separated) and the
    lines of :func:`trusted_factories_file` (``#`` starts a comment line). Never read from the registry
    home or database: whoever can write those must not be able to allow their own code."""
    names = {name.strip() for name in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(",")}
    path = trusted_factories_file()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise BackboneError(f"cannot read the trusted factories file {path}: {first_line(exc)}") from None
    names.update(line.strip() for line in lines if not line.lstrip().startswith("#"))
    names.discard("")
    return names


@contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Inside this block :func:`rebuild` runs any factory a registry record names, as ``trust_code=True``
    does for one call (the CLI's ``--trust-code``)."""
    token = _TRUST_CODE.set(trust)
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def check_trusted(name: str, architecture: str, *, trust_code: bool = False) -> None:
    """Refuse to run a registry record's ``module:callable`` unless the local user allowed it. Called before
    anything is imported: importing a module runs its code too."""
    if not is_factory(architecture) or trust_code or _TRUST_CODE.get():
        return
    if architecture in trusted_factories():
        return
    raise UntrustedFactory(
        f"backbone {name!r} is built by {architecture!r}, code named by the registry that you have not allowed "
        f"to run; allow it with --trust-code (trust_code=True in Python), or add {architecture} to "
        f"${TRUSTED_FACTORIES_ENV} or to {trusted_factories_file()}"
    )


def load_factory(architecture: str) -> Callable[..., Any]:
    """Import ``module:callable`` and return the callable. This runs the module's code: a registry record's
    factory passes :func:`check_trusted` first."""
    module_name, _, attr = architecture.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise BackboneError(f"backbone factory {architecture!r} is not module:callable (e.g. mypackage.nets:build)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BackboneError(f"cannot import backbone factory {architecture!r}: no module named {exc.name!r}") from None
    except Exception as exc:  # a module's code may raise anything while it is imported
        raise BackboneError(f"cannot import backbone factory {architecture!r}: {first_line(exc)}") from None
    if not hasattr(module, attr):
        raise BackboneError(f"cannot import backbone factory {architecture!r}: {module_name} has no {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise BackboneError(f"backbone factory {architecture!r} is a {type(factory).__name__}, not a callable")
    return factory


def build_backbone(source: dict[str, Any]) -> nn.Module:
    """Build a backbone from its recorded source: ``architecture`` (a catalogue name, any
    torchvision.models name, or ``module:callable``), ``num_classes``, ``seed`` of the initialisation,
    ``weights`` (a local .safetensors or torchvision .pth file) or ``torchvision_weights`` (a torchvision
    weights name, downloaded by torchvision where there is internet). A source with ``hf`` is a
    Transformers model directory (see :func:`from_transformers`).

    A ``module:callable`` is imported and called here without asking: this is for an architecture the
    caller chose. A registry record is rebuilt with :func:`rebuild`, which asks first."""
    if hf.is_transformers(source):
        return hf.build(source)
    arch = source.get("architecture")
    if not arch:
        raise BackboneError("the backbone records no architecture to build it from")
    if not isinstance(arch, str):
        raise BackboneError(f"the backbone's architecture must be a name or module:callable, got {arch!r}")
    kwargs: dict[str, Any] = {}
    if source.get("num_classes") is not None:
        kwargs["num_classes"] = checks.num_classes(source["num_classes"])
    factory = load_factory(arch) if is_factory(arch) else None  # before seeding: importing may draw numbers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(source.get("seed") or 0))
        if factory is not None:
            try:
                model = factory(**kwargs)
            except Exception as exc:  # the factory is code of any kind; its failure is reported, not raised
                given = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
                raise BackboneError(f"calling backbone factory {arch!r}{given} failed: {first_line(exc)}") from None
        elif arch in ("resnet_small", "vit_small"):
            model = globals()[arch](**kwargs)
        else:
            import torchvision

            if arch not in torchvision.models.list_models():
                raise BackboneError(
                    f"unknown architecture {arch!r}: give a catalogue name ({', '.join(CATALOGUE)}), a "
                    "torchvision.models name or module:callable"
                )
            try:
                weights = source.get("torchvision_weights")
                model = torchvision.models.get_model(arch, weights=weights, **kwargs)
            except (ValueError, TypeError) as exc:  # weights that do not exist or do not fit num_classes
                raise BackboneError(f"cannot build torchvision {arch!r}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BackboneError(f"backbone factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if source.get("weights"):
        load_weights(model, source["weights"])
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file: safetensors, or a torchvision .pth read with weights_only=True (no
    arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch.load raise several types for a bad file
        raise BackboneError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise BackboneError(f"weights {path} hold no state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = str(exc).splitlines()[-1].strip()
        raise BackboneError(f"weights {path} do not fit the architecture: {detail}") from None
    if missing or unexpected:
        raise BackboneError(
            f"weights {path} do not fit the architecture: {len(missing)} missing, {len(unexpected)} unexpected keys"
            + (f" (first missing: {missing[0]})" if missing else "")
        )


def save_weights(model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def rebuild(name: str, source: dict[str, Any] | None, fingerprint: str, *, trust_code: bool = False) -> nn.Module:
    """A registered backbone rebuilt from its record, refused unless its fingerprint is the recorded one.

    The registry may be shared, so a record's ``module:callable`` runs only where the local user allowed it:
    ``trust_code=True`` (or inside :func:`trusting_code`), or the factory listed in
    ``$ADAPTER_HUB_TRUSTED_FACTORIES`` or :func:`trusted_factories_file`. Otherwise UntrustedFactory is
    raised before the module is imported. Catalogue and torchvision names always build."""
    from .formats import fingerprint as fingerprint_of

    if not source:
        raise BackboneError(f"backbone {name!r} was recorded by fingerprint only; it cannot be rebuilt here")
    architecture = source.get("architecture")
    if isinstance(architecture, str):
        check_trusted(name, architecture, trust_code=trust_code)
    model = build_backbone(source)
    actual = fingerprint_of(model)
    if actual != fingerprint:
        raise BackboneError(
            f"backbone {name!r} rebuilt from {source} has fingerprint {actual[:12]}…, "
            f"not the recorded {fingerprint[:12]}…"
        )
    return model
