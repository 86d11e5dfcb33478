"""A local web view of the registry (`adapter-hub ui`): tasks and adapters, versions, a version's record,
its lineage graph and metric comparisons, read-only. Needs Flask (and plotly for the charts' script)."""

from __future__ import annotations

from .app import create_app, serve

__all__ = ["create_app", "serve"]
