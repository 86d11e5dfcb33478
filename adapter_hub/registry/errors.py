"""Registry errors: each one is a user mistake or bad input, reported by the CLI as one line."""

from __future__ import annotations

from ..errors import AdapterHubError


class RegistryError(AdapterHubError):
    """Base of every registry error."""


class RefError(RegistryError, ValueError):
    """A ref that does not parse (expected TASK/ADAPTER, TASK/ADAPTER:N or TASK/ADAPTER@ALIAS)."""


class NotFound(RegistryError, LookupError):
    """A backbone, task, adapter, version or alias that the registry does not hold."""


class AlreadyExists(RegistryError, ValueError):
    """A backbone or task name (or an adapter name under a task) that is taken."""


class ArtifactError(RegistryError):
    """An artifact blob that is missing, or whose bytes do not match the recorded digest."""


class SchemaError(RegistryError):
    """A database whose schema is older or newer than this code, or not a registry at all."""


class DatabaseUnreachable(RegistryError):
    """A database URL that cannot be opened."""
