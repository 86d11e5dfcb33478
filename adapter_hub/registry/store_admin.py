"""A registry's artifact store: show it, copy its blobs to another store (verified), and switch to another.

Switching is safe against registrations running meanwhile: :func:`set_store` checks every blob the registry
references in the new store while holding the registry row FOR UPDATE, and a registration's final transaction
reads that row FOR SHARE and refuses to commit against a store that is no longer the registry's (see
``Hub._check_store``). So no version ever points at a store that lacks its blob."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, update

from . import stores
from .errors import ArtifactError, RegistryError, StoreMismatch
from .hub import Hub
from .models import RegistryRow
from .models import VersionRow as VRow
from .store import ArtifactStore


@dataclass(frozen=True)
class StoreInfo:
    recorded: str | None  # what the database records (None: each client's HOME/artifacts)
    in_use: str  # the store this client reads and writes
    registry_id: str
    store_identity: str | None  # the registry id the store records
    problem: str | None = None  # why the store in use cannot be read (unreachable, its package missing), if so

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CopyReport:
    source: str
    target: str
    copied: int  # blobs written to the target, each read back verified
    present: int  # blobs the target already held intact
    copied_bytes: int
    set_as_store: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def info(hub: Hub) -> StoreInfo:
    """What the database records and the store in use; a store that cannot be read is shown with why."""
    with hub._session() as s:
        recorded = s.scalar(select(RegistryRow.store_url).where(RegistryRow.id == 1))
    try:
        hub.store.check()
        identity, problem = hub.store.identity(), None
    except RegistryError as exc:
        identity, problem = None, str(exc)
    return StoreInfo(recorded, hub.store.url, hub.registry_id(), identity, problem)


def _target(hub: Hub, url: str, options: Mapping[str, Any] | None) -> tuple[str | None, stores.Store]:
    """The URL to record (None for `local`: each client's HOME/artifacts) and the store it names, reachable and
    bound to this registry (a store that records another registry, or records none and holds blobs this
    database does not reference, is refused)."""
    if url.strip() == stores.LOCAL:
        recorded, store = None, ArtifactStore(hub.home / "artifacts")
    else:
        recorded = stores.normalise(url)
        if recorded == stores.default_local(hub.home):
            recorded = None
        store = stores.open_store(recorded or stores.default_local(hub.home), options)
    store.check()
    db_id, owner = hub.registry_id(), store.identity()
    # another registry's store, or an old one's folder of blobs: taking it over would let gc delete them
    problem = hub.foreign_store_problem(store, db_id, owner) if owner != db_id else None
    if problem is not None:
        raise StoreMismatch(f"{problem}; nothing was changed")
    if owner is None:
        bound = store.bind(db_id)
        if bound != db_id:
            raise StoreMismatch(f"the artifact store {store.url} was just bound to another registry ({bound})")
    return recorded, store


def _referenced(hub: Hub, s: Any) -> dict[str, int | None]:
    """digest -> size of every blob the registry needs (versions not purged, backbones' files)."""
    wanted: dict[str, int | None] = {
        d: size for d, size in s.execute(select(VRow.digest, VRow.size).where(VRow.status != "purged"))
    }
    for digest in hub._backbone_file_digests(s):
        wanted.setdefault(digest, None)
    return wanted


def _copy(hub: Hub, target: stores.Store, wanted: Mapping[str, int | None]) -> tuple[int, int, int]:
    """Copy each wanted blob the target lacks (or holds damaged) from the hub's store; (copied, present, bytes).
    Each blob is read verified from the source and published verified in the target."""
    copied = present = nbytes = 0
    state = target.problems(dict(wanted)) if wanted else {}
    for digest in sorted(wanted):
        if state[digest] is None:
            present += 1
            continue
        data = hub.store.read(digest, f"sha256:{digest} in {hub.store.url}")
        if target.put(data) != digest:  # pragma: no cover - put returns the sha256 of what it stored
            raise ArtifactError(f"copying sha256:{digest} to {target.url} stored other bytes")
        copied, nbytes = copied + 1, nbytes + len(data)
    return copied, present, nbytes


def copy(hub: Hub, url: str, options: Mapping[str, Any] | None = None, *, set_as_store: bool = False) -> CopyReport:
    """Copy every blob the registry references from its store into the store at URL (``local`` for the
    client's HOME/artifacts), each one verified, and then check the whole target by reading every blob back.
    With set_as_store the registry then uses URL (:func:`set_store`, which copies any blob registered
    meanwhile)."""
    recorded, target = _target(hub, url, options)
    if target.url == hub.store.url:
        raise StoreMismatch(f"{target.url} is this registry's store already; nothing to copy")
    with hub._session() as s:
        wanted = _referenced(hub, s)
    copied, present, nbytes = _copy(hub, target, wanted)
    if set_as_store:
        more, _present, more_bytes = _switch(hub, recorded, target, copy_missing=True)
        copied, nbytes = copied + more, nbytes + more_bytes
        source = hub.store.url
        hub.store, hub.store_url = target, recorded
        return CopyReport(source, target.url, copied, present, nbytes, set_as_store)
    bad = {d: p for d, p in target.problems(wanted).items() if p is not None}  # every blob read back
    if bad:
        _digest, problem = next(iter(sorted(bad.items())))
        raise ArtifactError(f"{len(bad)} blob(s) did not verify in {target.url} after copying, e.g. {problem}")
    return CopyReport(hub.store.url, target.url, copied, present, nbytes, set_as_store)


def set_store(hub: Hub, url: str, options: Mapping[str, Any] | None = None) -> StoreInfo:
    """Make the store at URL the registry's (``local``: each client's HOME/artifacts). Refused, changing
    nothing, unless it holds every blob the registry references, intact: copy them first with :func:`copy`."""
    recorded, target = _target(hub, url, options)
    _switch(hub, recorded, target, copy_missing=False)
    hub.store, hub.store_url = target, recorded
    return info(hub)


def _switch(hub: Hub, recorded: str | None, target: stores.Store, *, copy_missing: bool) -> tuple[int, int, int]:
    with hub._session(write=True) as s:
        # FOR UPDATE: registrations commit wholly before this check (and are checked) or after the switch
        # (and are refused, see Hub._check_store)
        s.execute(select(RegistryRow.id).where(RegistryRow.id == 1).with_for_update())
        wanted = _referenced(hub, s)
        copied = present = nbytes = 0
        if copy_missing:
            copied, present, nbytes = _copy(hub, target, wanted)
        bad = {d: p for d, p in target.problems(wanted).items() if p is not None}
        if bad:
            _digest, problem = next(iter(sorted(bad.items())))
            raise ArtifactError(
                f"{target.url} lacks {len(bad)} of the registry's {len(wanted)} blob(s) ({problem}); nothing was "
                f"changed: copy them first with `adapter-hub store copy {recorded or stores.LOCAL} --set`"
            )
        s.execute(update(RegistryRow).where(RegistryRow.id == 1).values(store_url=recorded))
    return copied, present, nbytes
