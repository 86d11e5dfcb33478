"""Build a backbone from what `backbone add` recorded: a torchvision name or `module:callable`, an optional
safetensors weights file, and the seed of the initialisation."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..registry.errors import RegistryError


def build(source: dict[str, Any]) -> Any:
    import torch

    arch = source.get("architecture")
    if not arch:
        raise RegistryError("the backbone records no architecture to build it from")
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
                raise RegistryError(f"cannot import backbone factory {arch!r}: {exc}") from None
            model = factory(**kwargs)
        else:
            import torchvision

            try:
                model = torchvision.models.get_model(arch, weights=None, **kwargs)
            except ValueError as exc:
                raise RegistryError(f"unknown torchvision architecture {arch!r}: {exc}") from None
    weights = source.get("weights")
    if weights:
        _load_weights(model, Path(weights))
    return model.eval()


def _load_weights(model: Any, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise RegistryError(f"backbone weights must be a .safetensors file (nothing is unpickled): {path}")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise RegistryError(f"cannot read backbone weights {path}: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RegistryError(
            f"weights {path} do not fit the architecture: {len(missing)} missing, {len(unexpected)} unexpected keys"
        )


def build_checked(name: str, source: dict[str, Any] | None, fingerprint: str) -> Any:
    """The backbone rebuilt from its record, refused unless its fingerprint is the recorded one."""
    from ..formats import fingerprint as fingerprint_of

    if not source:
        raise RegistryError(f"backbone {name!r} was recorded by fingerprint only; it cannot be rebuilt here")
    model = build(source)
    actual = fingerprint_of(model)
    if actual != fingerprint:
        raise RegistryError(
            f"backbone {name!r} rebuilt from {source} has fingerprint {actual[:12]}…, "
            f"not the recorded {fingerprint[:12]}…"
        )
    return model
