"""Content-addressed artifact store: artifacts/sha256/ab/cdef…, written atomically, read verified."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ArtifactError

_CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"

    def path(self, digest: str) -> Path:
        return self.blobs_dir / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        """Store `data` under its sha256 and return the digest; durable on disk when this returns.

        The bytes go to a unique temp file that is fsynced and then renamed over the final name, so a
        reader sees nothing or the whole blob. Two processes storing the same content both rename a
        complete copy onto the same name, which is safe. A blob already present is kept (and touched,
        so that `gc`'s grace period protects it until the caller's row is committed)."""
        digest = sha256_hex(data)
        final = self.path(digest)
        if final.exists() and self._digest_of(final) == digest:
            os.utime(final)
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{digest[:16]}.{os.getpid()}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return digest

    def read(self, digest: str, what: str) -> bytes:
        """The blob's bytes, checked against its digest; `what` names it (a ref) in the error."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"artifact of {what} is missing: sha256:{digest} ({path})") from None
        actual = sha256_hex(data)
        if actual != digest:
            raise ArtifactError(
                f"artifact of {what} is corrupt: expected sha256:{digest}, found sha256:{actual} ({path})"
            )
        return data

    def problem(self, digest: str, size: int | None = None) -> str | None:
        """None when the blob is present and intact, else what is wrong with it."""
        path = self.path(digest)
        if not path.is_file():
            return f"missing blob sha256:{digest}"
        if size is not None and path.stat().st_size != size:
            return f"blob sha256:{digest} has {path.stat().st_size} bytes, expected {size}"
        actual = self._digest_of(path)
        if actual != digest:
            return f"corrupt blob: expected sha256:{digest}, found sha256:{actual}"
        return None

    def digests(self) -> Iterator[tuple[str, Path]]:
        if not self.blobs_dir.is_dir():
            return
        for sub in sorted(self.blobs_dir.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for blob in sorted(sub.iterdir()):
                    yield sub.name + blob.name, blob

    def temp_files(self) -> Iterator[Path]:
        if self.tmp_dir.is_dir():
            yield from sorted(self.tmp_dir.iterdir())

    @staticmethod
    def age_s(path: Path) -> float:
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def remove(path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    @staticmethod
    def _digest_of(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
