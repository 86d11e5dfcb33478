"""Adapter files: the adapter-hub safetensors format, PEFT directories, backbone fingerprints."""

from .fingerprint import fingerprint

__all__ = ["fingerprint"]
