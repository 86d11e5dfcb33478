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


class ConnectionLost(DatabaseUnreachable):
    """The database connection broke during a command: the message says whether anything was written.
    `outcome_unknown` is True when it broke during COMMIT, so the change may have been made."""

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class RegistryBusy(RegistryError):
    """Another process held the registry's write lock for longer than the busy timeout."""


class ReadOnlyRegistry(RegistryError):
    """A write to a registry that this process can only read."""


class StorageFull(RegistryError):
    """The filesystem holding the database or the artifacts has no space left."""


class StoreMismatch(RegistryError):
    """An artifact store that belongs to another registry database (or a new database beside a used store)."""


class LimitError(RegistryError, ValueError):
    """A value the registry cannot store: too long, out of its column's range, not finite, or with a NUL."""
