"""The names of the methods that combine adapters into one, in a module that imports no torch: the command line
offers them as choices, and a call is checked, before torch is loaded. The maths is in
``adapter_hub.compose.methods``, run by ``adapter_hub.compose.combine``."""

from __future__ import annotations

from .errors import ConfigError

EXACT = ("linear", "cat")  # the factors concatenated: the weighted sum itself, at rank Σrᵢ
DENSE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # a combined ΔW per layer, factorised to rank k
METHODS = (*EXACT, "svd", *DENSE)


def check_method(method: str, density: float | None) -> str:
    """``method`` if it names a combine method and has what it needs (a dense one needs a density)."""
    if method not in METHODS:
        raise ConfigError(f"unknown combine method {method!r}; choose one of {', '.join(METHODS)}")
    if method in DENSE and density is None:
        raise ConfigError(f"method {method!r} needs density= (the fraction of each delta to keep)")
    return method
