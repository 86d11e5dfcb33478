"""Exceptions a user can cause. Every one carries a one-line message the CLI prints as is."""

from __future__ import annotations

import sys


class AdapterHubError(Exception):
    """Base of every error that reports a user mistake or bad input (never a bug)."""


class ConfigError(AdapterHubError, ValueError):
    """A LoRA configuration or call argument that cannot be honoured (r <= 0, bad weights...)."""


class TargetError(AdapterHubError, ValueError):
    """A target pattern that matches nothing, or a matched layer type that has no LoRA variant."""


class AdapterNotFound(AdapterHubError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(AdapterHubError, ValueError):
    """An adapter file or directory that is not readable, truncated, or has missing/extra/misshaped keys."""


class FingerprintMismatch(AdapterHubError, ValueError):
    """An adapter made for another backbone (load with force=True to override)."""


class MergeError(AdapterHubError, RuntimeError):
    """A delta that cannot be folded into the base weight (e.g. a grouped conv whose A crosses groups)."""


class BackboneError(AdapterHubError, ValueError):
    """An unknown architecture, a model directory or weights file that does not fit, or a rebuild that fails."""


class UntrustedFactory(BackboneError):
    """A registry record names a factory (code) that the local user has not allowed to run."""


class CheckpointRoutingError(ConfigError):
    """A backward pass whose recomputation of checkpointed layers cannot be the forward's composition."""


class CombineError(MergeError):
    """A delta that cannot be combined with others into a new adapter (it has no ΔW in the base weight's shape)."""


class AdapterHubWarning(UserWarning):
    """Base of the package's warnings: the CLI prints each as one ``warning:`` line."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception raised by code we do not control."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def is_user_error(exc: BaseException) -> bool:
    """What a user can cause: the CLI prints these as one line. ``lora/`` raises its own type (it imports
    nothing of the package); it is looked up only if loaded, so this module never imports torch."""
    if isinstance(exc, AdapterHubError):
        return True
    lora_base = sys.modules.get("adapter_hub.lora.base")
    return lora_base is not None and isinstance(exc, lora_base.LoRAConfigError)
