"""The SQL registry: versions, lineage, metrics, aliases and a verified artifact store."""

from __future__ import annotations

from .errors import (
    AlreadyExists,
    ArtifactError,
    DatabaseUnreachable,
    NotFound,
    RefError,
    RegistryError,
    SchemaError,
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
    "DatabaseUnreachable",
    "Edge",
    "GcReport",
    "Hub",
    "Lineage",
    "MetricRecord",
    "MetricTable",
    "NotFound",
    "Parent",
    "Problem",
    "Ref",
    "RefError",
    "RegistryError",
    "SchemaError",
    "Task",
    "Version",
    "parse_ref",
]
