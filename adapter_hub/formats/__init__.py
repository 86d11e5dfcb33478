"""Adapter files: the adapter-hub safetensors format, PEFT directories, backbone fingerprints."""

from .fingerprint import fingerprint
from .record import AdapterRecord

__all__ = ["AdapterRecord", "fingerprint"]
