"""The SQL registry: versions, lineage, metrics, aliases and a verified artifact store."""

from __future__ import annotations

from .errors import (
    AlreadyExists,
    ArtifactError,
    ConnectionLost,
    DatabaseUnreachable,
    LimitError,
    NotFound,
    ReadOnlyRegistry,
    RefError,
    RegistryBusy,
    RegistryError,
    SchemaError,
    StorageFull,
    StoreMismatch,
)
from .hub import Hub
from .records import (
    AdapterSummary,
    Backbone,
    Edge,
    GcReport,
    Lineage,
    MetricRecord,
    MetricTable,
    Parent,
    Problem,
    Task,
    Version,
)
from .refs import Ref, parse_ref

__all__ = [
    "AdapterSummary",
    "AlreadyExists",
    "ArtifactError",
    "Backbone",
    "ConnectionLost",
    "DatabaseUnreachable",
    "Edge",
    "GcReport",
    "Hub",
    "LimitError",
    "Lineage",
    "MetricRecord",
    "MetricTable",
    "NotFound",
    "Parent",
    "Problem",
    "ReadOnlyRegistry",
    "Ref",
    "RefError",
    "RegistryBusy",
    "RegistryError",
    "SchemaError",
    "StorageFull",
    "StoreMismatch",
    "Task",
    "Version",
    "parse_ref",
]
