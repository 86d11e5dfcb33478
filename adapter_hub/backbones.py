"""Catalogue of torchvision backbones with sensible LoRA targets, and loading their weights."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterHubError


class BackboneError(AdapterHubError, ValueError):
    """An unknown architecture or a weights file that does not fit."""


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


def build_backbone(source: dict[str, Any]) -> nn.Module:
    """Build a backbone from its recorded source: ``architecture`` (a catalogue name, any
    torchvision.models name, or ``module:callable``), ``num_classes``, ``seed`` of the initialisation,
    ``weights`` (a local .safetensors or torchvision .pth file) or ``torchvision_weights`` (a torchvision
    weights name, downloaded by torchvision where there is internet)."""
    arch = source.get("architecture")
    if not arch:
        raise BackboneError("the backbone records no architecture to build it from")
    kwargs: dict[str, Any] = {}
    if source.get("num_classes") is not None:
        kwargs["num_classes"] = int(source["num_classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(source.get("seed") or 0))
        if ":" in arch:
            module_name, _, attr = arch.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise BackboneError(f"cannot import backbone factory {arch!r}: {exc}") from None
            model = factory(**kwargs)
        elif arch in ("resnet_small", "vit_small"):
            model = globals()[arch](**kwargs)
        else:
            import torchvision

            try:
                weights = source.get("torchvision_weights")
                model = torchvision.models.get_model(arch, weights=weights, **kwargs)
            except ValueError as exc:
                raise BackboneError(f"unknown torchvision architecture {arch!r}: {exc}") from None
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


def rebuild(name: str, source: dict[str, Any] | None, fingerprint: str) -> nn.Module:
    """A registered backbone rebuilt from its record, refused unless its fingerprint is the recorded one."""
    from .formats import fingerprint as fingerprint_of

    if not source:
        raise BackboneError(f"backbone {name!r} was recorded by fingerprint only; it cannot be rebuilt here")
    model = build_backbone(source)
    actual = fingerprint_of(model)
    if actual != fingerprint:
        raise BackboneError(
            f"backbone {name!r} rebuilt from {source} has fingerprint {actual[:12]}…, "
            f"not the recorded {fingerprint[:12]}…"
        )
    return model
