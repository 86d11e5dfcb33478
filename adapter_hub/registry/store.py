"""Content-addressed artifact store: artifacts/sha256/ab/cdef…, written atomically, read verified.

The store never modifies a blob once written (another user may own it); gc's notion of "in use" lives in
the database (versions and pending uploads), not in file times. The store records the id of the registry
it belongs to in ``artifacts/REGISTRY``, so it is never collected or written against another database."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import ArtifactError, StorageFull

_HEX = re.compile(r"[0-9a-f]+")

_CHUNK = 1 << 20
IDENTITY_FILE = "REGISTRY"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked(data: bytes, digest: str, what: str, where: str) -> bytes:
    """``data`` when it hashes to ``digest``; otherwise the one-line error for the artifact of ``what`` at ``where``
    (every store reads a blob, then this)."""
    actual = sha256_hex(data)
    if actual != digest:
        raise ArtifactError(f"artifact of {what} is corrupt: expected sha256:{digest}, found sha256:{actual} ({where})")
    return data


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full(exc: OSError, where: Path) -> StorageFull:
    reason = os.strerror(exc.errno or 0)
    return StorageFull(f"the filesystem holding {where} is full ({reason}); nothing was registered")


class ArtifactStore:
    """The local store: a folder (each client's HOME/artifacts by default, or a shared one named by its path).
    Object stores live in object_store.py; stores.py picks one from a URL."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.blobs_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def check(self) -> None:
        """A folder is created on first write: nothing to check before."""

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def path(self, digest: str) -> Path:
        """Where the blob of ``digest`` (64 lowercase hex digits) lives. A digest comes from a database row,
        which anyone who can write a shared registry may edit: anything else is refused, never a path."""
        if not _HEX.fullmatch(digest or "") or len(digest) != 64:
            raise ArtifactError(f"{digest!r:.80} is not a sha256 digest: no artifact is read or written for it")
        return self.blobs_dir / digest[:2] / digest[2:]

    def temp_path(self, token: str) -> Path:
        """Where the upload with this token (hex, from a database row) writes its bytes before publishing them."""
        if not _HEX.fullmatch(token or "") or len(token) > 64:
            raise ArtifactError(f"upload token {token!r:.80} is not hex: no temporary file is named after it")
        return self.tmp_dir / f"{token}.part"

    # -- identity ------------------------------------------------------------------------------------

    def identity(self) -> str | None:
        """The id of the registry this store belongs to, None for a store that records none yet."""
        try:
            text = (self.root / IDENTITY_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ArtifactError(f"cannot read {self.root / IDENTITY_FILE}: {exc.strerror}") from None
        return text or None

    def bind(self, registry_id: str) -> str:
        """Record `registry_id` as the store's owner unless one is recorded already, and return the owner now
        recorded: the file is created exclusively (linked into place), so of two registries binding a new
        store at once exactly one wins and the other sees it."""
        target = self.root / IDENTITY_FILE
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{IDENTITY_FILE}.{uuid.uuid4().hex}"
            tmp.write_text(registry_id + "\n")
            try:
                os.chmod(tmp, 0o444)
                os.link(tmp, target)  # fails if the file exists: never replaces another owner
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _full(exc, self.root) from None
            raise ArtifactError(f"cannot write {target}: {exc.strerror}") from None
        return self.identity() or registry_id

    def has_blobs(self) -> bool:
        return next(self.digests(), None) is not None

    # -- writing and reading -------------------------------------------------------------------------

    def put(self, data: bytes, token: str | None = None) -> str:
        """Store `data` under its sha256 and return the digest; durable on disk when this returns.

        The bytes go to the upload's temp file (named by `token`), are fsynced and renamed over the final
        name, so a reader sees nothing or the whole blob. Two processes storing the same content both
        rename a complete copy onto the same name, which is safe. An intact blob already present is left
        exactly as it is: it may belong to another user, and nothing needs to change it."""
        digest = sha256_hex(data)
        final = self.path(digest)
        try:
            if final.is_file() and self._digest_of(final) == digest:
                return digest
        except OSError as exc:
            raise ArtifactError(f"cannot read the stored blob {final}: {exc.strerror or exc}") from None
        tmp = self.temp_path(token or uuid.uuid4().hex)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            self._discard(tmp)
            if exc.errno in _FULL:
                raise _full(exc, self.root) from None
            if isinstance(exc, FileNotFoundError):
                raise  # the temp file was collected: the caller's upload expired (see Hub.register)
            raise ArtifactError(f"cannot write artifact to {self.root}: {exc.strerror or exc}") from None
        except BaseException:
            self._discard(tmp)
            raise
        return digest

    def read(self, digest: str, what: str) -> bytes:
        """The blob's bytes, checked against its digest; `what` names it (a ref) in the error."""
        path = self.path(digest)
        try:
            # a regular file only: a blob replaced by a link to /dev/zero or a FIFO would be read without end
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ArtifactError(f"the artifact of {what} ({path}) is not a regular file")
                data = fh.read()
        except FileNotFoundError:
            raise ArtifactError(f"artifact of {what} is missing: sha256:{digest} ({path})") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read the artifact of {what} ({path}): {exc.strerror}") from None
        return checked(data, digest, what, str(path))

    def problem(self, digest: str, size: int | None = None) -> str | None:
        """None when the blob is present and intact, else what is wrong with it."""
        path = self.path(digest)
        if not path.is_file():
            return f"missing blob sha256:{digest}"
        if size is not None and path.stat().st_size != size:
            return f"blob sha256:{digest} has {path.stat().st_size} bytes, expected {size}"
        try:
            actual = self._digest_of(path)
        except OSError as exc:
            return f"unreadable blob sha256:{digest}: {exc.strerror}"
        if actual != digest:
            return f"corrupt blob: expected sha256:{digest}, found sha256:{actual}"
        return None

    def problems(self, wanted: Mapping[str, int | None]) -> dict[str, str | None]:
        """:meth:`problem` of each digest (with its recorded size, or None)."""
        return {digest: self.problem(digest, size) for digest, size in wanted.items()}

    # -- listing and collecting ----------------------------------------------------------------------

    def digests(self) -> Iterator[tuple[str, Path]]:
        if not self.blobs_dir.is_dir():
            return
        for sub in sorted(self.blobs_dir.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for blob in sorted(sub.iterdir()):
                    yield sub.name + blob.name, blob

    def temp_files(self) -> Iterator[tuple[str, Path]]:
        """(token, path) of every temp file: the token is the upload's that wrote it."""
        if self.tmp_dir.is_dir():
            for path in sorted(self.tmp_dir.iterdir()):
                yield path.name.split(".", 1)[0], path

    @staticmethod
    def age_s(path: Path) -> float:
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def size_of(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    @staticmethod
    def remove(path: Path) -> int:
        """Delete a file and return its size; 0 when it is gone already or this user may not delete it
        (another user's file in a shared folder: it stays, and gc goes on)."""
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return 0
        return size

    @staticmethod
    def _discard(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

    @staticmethod
    def _digest_of(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
