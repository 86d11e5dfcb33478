"""Composition: Stack / Switch policies, per-sample routing, and merge methods as pure tensor functions."""

from .policies import Stack, Switch
from .routing import RoutedOutput

__all__ = ["RoutedOutput", "Stack", "Switch"]
