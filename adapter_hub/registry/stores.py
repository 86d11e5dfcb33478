"""Which artifact store a registry uses: store URLs, their options, and opening the right backend.

A store is named by a URL: a local folder (a path or ``file://``; the default is each client's
``HOME/artifacts``) or any fsspec URL (``s3://bucket/prefix`` through ``s3fs``; ``gs://``, ``az://`` through
their fsspec packages). The registry's database records the URL its stores live at (``registry.store_url``), so
every client of a shared database uses the same store; options (an endpoint, a region) come from the client —
``--store-option KEY=VALUE``, the AWS environment variables and config files — and never from the database, so
no credential is ever stored there. This module imports no fsspec: the CLI starts without it."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from .errors import RegistryError

if TYPE_CHECKING:
    from collections.abc import Iterable

STORE_ENV = "ADAPTER_HUB_STORE"
LOCAL = "local"  # `store set local`: back to each client's HOME/artifacts
MAX_URL = 1000  # registry.store_url's length


class Store(Protocol):
    """What the Hub needs of an artifact store. ``Entry`` is whatever ``digests``/``temp_files`` list (a Path
    for the local store, a listing record for an object store); ``age_s``, ``size_of`` and ``remove`` take it."""

    url: str

    def identity(self) -> str | None: ...

    def bind(self, registry_id: str) -> str: ...

    def check(self) -> None: ...

    def has_blobs(self) -> bool: ...

    def has(self, digest: str) -> bool: ...

    def put(self, data: bytes, token: str | None = None) -> str: ...

    def read(self, digest: str, what: str) -> bytes: ...

    def problem(self, digest: str, size: int | None = None) -> str | None: ...

    def problems(self, wanted: Mapping[str, int | None]) -> dict[str, str | None]: ...

    def digests(self) -> Iterator[tuple[str, Any]]: ...

    def temp_files(self) -> Iterator[tuple[str, Any]]: ...

    def age_s(self, entry: Any) -> float: ...

    def size_of(self, entry: Any) -> int: ...

    def remove(self, entry: Any) -> int: ...


# -- URLs ---------------------------------------------------------------------------------------------------


def protocol_of(url: str) -> str | None:
    """The URL's scheme ("s3", "gs"…), None for a local path (a plain path, ``file://`` or ``local://``)."""
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme.lower() in ("file", "local") or len(scheme) == 1:  # C://… on Windows is a path
        return None
    return scheme.lower()


def normalise(url: str) -> str:
    """The canonical form of a store URL, as recorded in the database and compared with a client's: an absolute
    path for a local folder; ``scheme://bucket/prefix`` without a trailing slash for an object store. A URL that
    holds credentials (``s3://KEY:SECRET@bucket``) or parameters is refused: the database would record them."""
    text = url.strip()
    if not text:
        raise RegistryError("the artifact store URL is empty: give a folder or a URL such as s3://bucket/prefix")
    if "\x00" in text or any(ord(c) < 32 for c in text):
        raise RegistryError(f"the artifact store URL {text!r:.120} holds control characters")
    protocol = protocol_of(text)
    if protocol is None:
        path = text.split("://", 1)[1] if "://" in text and len(text.split("://", 1)[0]) > 1 else text
        normal = str(Path(path).expanduser().resolve())
    else:
        rest = text.split("://", 1)[1].strip("/")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise RegistryError(f"artifact store URL {text!r:.200} names no bucket: use {protocol}://BUCKET[/PREFIX]")
        if "@" in bucket or any(c in rest for c in "?#"):
            raise RegistryError(
                f"artifact store URL {protocol}://{bucket.rsplit('@', 1)[-1]}/… holds credentials or parameters; "
                "give them with --store-option or the usual environment variables: the URL is recorded in the database"
            )
        if any(part in (".", "..") for part in rest.split("/")) or "//" in rest:
            raise RegistryError(f"artifact store URL {text!r:.200} has an empty, '.' or '..' part")
        normal = f"{protocol}://{rest}"
    if len(normal) > MAX_URL:
        raise RegistryError(f"the artifact store URL is {len(normal)} characters long; at most {MAX_URL} are recorded")
    return normal


def default_local(home: Path) -> str:
    return str((Path(home) / "artifacts").expanduser().resolve())


# -- options --------------------------------------------------------------------------------------------------


# a JSON number without leading zeros (``00123`` is an id or a secret: kept as text), or true/false/null
_JSON_SCALAR = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null")


def _value(text: str) -> Any:
    """A JSON number, true, false or null as its value; anything else stays the text it is."""
    return json.loads(text) if _JSON_SCALAR.fullmatch(text) else text


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec storage options: a JSON number, ``true``, ``false`` or ``null`` becomes a
    value of its type (``10`` an int, ``2.5`` a float), anything else stays a string (``00123`` too); a dotted
    key nests (``client_kwargs.region_name=eu-west-1``). A key given a value and nested keys is refused."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.isidentifier() for p in parts):
            raise RegistryError(f"a store option is KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:8333), got {pair!r}")
        node = options
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RegistryError(
                    f"store option {key.strip()!r} conflicts with {'.'.join(parts[: depth + 1])!r}, which is set to a "
                    "value: give one or the other"
                )
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise RegistryError(
                f"store option {key.strip()!r} conflicts with the options nested under it ({key.strip()}.…): give "
                "one or the other"
            )
        node[parts[-1]] = _value(value.strip())
    return options


# -- the client's configured store (the CLI's --store / --store-option, for one command) ----------------------

_CONFIGURED: contextvars.ContextVar[tuple[str | None, dict[str, Any]]] = contextvars.ContextVar(
    "adapter_hub_store", default=(None, {})
)


@contextlib.contextmanager
def using_store(url: str | None, options: Sequence[str] | Mapping[str, Any] = ()) -> Iterator[None]:
    """Every Hub.open inside uses store URL (None: the one the database records) with these options, unless
    the call names its own."""
    parsed = dict(options) if isinstance(options, Mapping) else parse_options(options)
    token = _CONFIGURED.set((url, parsed))
    try:
        yield
    finally:
        _CONFIGURED.reset(token)


class Recorded:
    """The type of RECORDED: Hub.open(store=RECORDED) uses the store the database records, whatever the client
    configured (the `store` commands, which must open a registry whose store they are about to change)."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED = Recorded()


def configured(
    url: str | Recorded | None, options: Mapping[str, Any] | None, home: Path | None = None
) -> tuple[str | None, dict[str, Any]]:
    """The store URL a client asks for, normalised (argument, else ``using_store``, else $ADAPTER_HUB_STORE; None
    for none; ``local`` is HOME/artifacts, as for `store set local`), and its options."""
    ctx_url, ctx_options = _CONFIGURED.get()
    if isinstance(url, Recorded):
        chosen = None
    else:
        chosen = url if url is not None else ctx_url if ctx_url is not None else os.environ.get(STORE_ENV) or None
    chosen_options = dict(options if options is not None else ctx_options)
    if chosen and chosen.strip() == LOCAL:  # without a home (a caller that passes it on to Hub.open): as is
        return (default_local(home) if home is not None else LOCAL), chosen_options
    return (normalise(chosen) if chosen else None), chosen_options


class Unavailable:
    """The recorded store when it cannot even be set up (its fsspec package is missing, an option is refused):
    the `store` commands still show and change the registry's store; any other use raises why, in one line."""

    def __init__(self, url: str, error: RegistryError) -> None:
        self.url = url
        self.error = error

    def __repr__(self) -> str:
        return f"Unavailable({self.url!r})"

    def __getattr__(self, name: str) -> Any:
        raise self.error


def unavailable(url: str, error: RegistryError) -> Store:
    return cast(Store, Unavailable(url, error))


# -- opening ---------------------------------------------------------------------------------------------------


def open_store(url: str, options: Mapping[str, Any] | None = None) -> Store:
    """The store at URL (normalised): a LocalStore for a folder, an ObjectStore for an fsspec URL."""
    normal = normalise(url)
    if protocol_of(normal) is None:
        from .store import ArtifactStore

        return ArtifactStore(Path(normal))  # store options are an object store's: a folder has none
    from .object_store import ObjectStore

    return ObjectStore(normal, options or {})


def shown(url: str | None, home: Path) -> str:
    """A recorded store URL for people: None is each client's own folder."""
    return url if url is not None else f"{default_local(home)} (this machine's HOME/artifacts)"
