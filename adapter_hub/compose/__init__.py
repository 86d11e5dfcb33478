"""Composition: Stack / Switch policies, merge methods as pure tensor functions."""

from .policies import Stack, Switch

__all__ = ["Stack", "Switch"]
