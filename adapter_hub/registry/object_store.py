"""Content-addressed artifacts in an object store (any fsspec URL; S3 through s3fs is the tested one).

The layout is the local store's: ``URL/sha256/ab/cdef…`` for blobs, ``URL/tmp/TOKEN.part`` for uploads in
flight, ``URL/REGISTRY`` for the id of the registry the store belongs to. The guarantees are the local store's
too, with the object store's own means:

- write-then-publish: an upload goes to its temporary key (named by the registration's upload token, so gc
  knows whose it is), is checked (size and an ETag equal to the MD5; else read back and hashed), then
  copied server-side to its final key, which is checked the same way before the temporary key goes. A reader
  never sees a partial object (an object store publishes a PUT or COPY whole), and a blob key only ever holds
  the bytes whose sha256 names it. An intact object already present is left as it is.
- every read is hashed and compared with the digest; ``problems`` checks many objects with batched reads.
- gc's age of an object is its last-modified time on the server.
- the identity object is created with a conditional put (If-None-Match), so of two registries binding a new
  store at once exactly one wins.

Every failure of the store (unreachable endpoint, missing bucket, refused credentials) is an ArtifactError of
one line naming the store's URL, never a credential."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from .errors import ArtifactError
from .store import IDENTITY_FILE, checked, sha256_hex

_HEX = re.compile(r"[0-9a-f]+")
_MD5 = re.compile(r"[0-9a-f]{32}")
# `problems` reads objects side by side, in batches of at most this many objects and bytes: a verify or a copy of
# large adapters never holds GBs; an object of unknown or larger size is read alone
_BATCH = 32
_BATCH_BYTES = 256 * 2**20
# Defaults for S3 (any of them can be overridden with --store-option): a dead endpoint is reported after a few
# seconds instead of botocore's minutes of retries.
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _etag(response: Any) -> str | None:
    """The MD5 in a store's answer (an ETag of 32 hex digits: a single-part upload or copy), else None."""
    etag = str(response.get("ETag") or "").strip('"').lower() if isinstance(response, dict) else ""
    return etag if _MD5.fullmatch(etag) else None


def _batches(keys: list[str], sizes: list[int | None]) -> Iterator[list[str]]:
    """KEYS in consecutive batches of at most _BATCH objects and _BATCH_BYTES bytes (by their recorded SIZES)."""
    batch: list[str] = []
    total = 0
    for key, size in zip(keys, sizes, strict=True):
        cost = _BATCH_BYTES if size is None else size
        if batch and (len(batch) == _BATCH or total + cost > _BATCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(key)
        total += cost
    if batch:
        yield batch


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ObjectStore:
    """The artifact store at an fsspec URL (normalised: ``scheme://bucket/prefix``)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.protocol, _, rest = url.partition("://")
        self.base = rest.strip("/")
        self.bucket = self.base.split("/", 1)[0]
        try:
            import fsspec

            cls = fsspec.get_filesystem_class(self.protocol)
        except ImportError as exc:
            package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
            name = package.get(self.protocol, getattr(exc, "name", None) or "its fsspec package")
            raise ArtifactError(
                f"artifact store {url} needs the {name} package, which is not installed (pip install {name}"
                + (", or adapter-hub[s3]" if name == "s3fs" else "")
                + ")"
            ) from None
        except ValueError:
            raise ArtifactError(f"artifact store {url}: no filesystem is known for {self.protocol}://") from None
        # No listings cache: another machine adds and removes objects, and a cached listing would answer an
        # existence check of put() ("already present") from the past.
        opts = _merge({"use_listings_cache": False}, dict(options or {}))
        if self.protocol in ("s3", "s3a"):
            opts = _merge(_S3_DEFAULTS, opts)
        try:
            self.fs = cls(skip_instance_cache=True, **opts)
        except TypeError as exc:
            raise ArtifactError(f"artifact store {url}: a store option was refused ({_one_line(exc)})") from None
        except Exception as exc:
            raise ArtifactError(f"artifact store {url}: cannot set it up ({_one_line(exc)})") from None

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # -- keys ------------------------------------------------------------------------------------------

    def key(self, digest: str) -> str:
        """The object key of the blob of ``digest`` (64 lowercase hex digits, from a database row: anything else
        is refused, never a key)."""
        if not _HEX.fullmatch(digest or "") or len(digest) != 64:
            raise ArtifactError(f"{digest!r:.80} is not a sha256 digest: no artifact is read or written for it")
        return f"{self.base}/sha256/{digest[:2]}/{digest[2:]}"

    def temp_key(self, token: str) -> str:
        if not _HEX.fullmatch(token or "") or len(token) > 64:
            raise ArtifactError(f"upload token {token!r:.80} is not hex: no temporary object is named after it")
        return f"{self.base}/tmp/{token}.part"

    def _where(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def _fail(self, doing: str, exc: BaseException) -> ArtifactError:
        if isinstance(exc, PermissionError):
            reason = f"access denied ({_one_line(exc)}); check the credentials (AWS_* variables, ~/.aws)"
        else:
            reason = _one_line(exc)
        return ArtifactError(f"artifact store {self.url}: cannot {doing}: {reason}")

    # -- identity --------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise an ArtifactError of one line unless the bucket answers (reachable, exists, credentials accepted)."""
        try:
            self.fs.info(self.bucket)
        except FileNotFoundError:
            raise ArtifactError(f"artifact store {self.url}: bucket {self.bucket!r} does not exist") from None
        except Exception as exc:
            raise self._fail("reach the bucket", exc) from None

    def identity(self) -> str | None:
        try:
            text = self.fs.cat_file(f"{self.base}/{IDENTITY_FILE}").decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(f"read {IDENTITY_FILE}", exc) from None
        return text or None

    def bind(self, registry_id: str) -> str:
        """Record `registry_id` as the store's owner unless one is recorded already; the owner now recorded."""
        target = f"{self.base}/{IDENTITY_FILE}"
        try:
            try:
                self.fs.pipe_file(target, (registry_id + "\n").encode(), mode="create")
            except TypeError:  # a filesystem without conditional writes: check, then write
                if self.identity() is None:
                    self.fs.pipe_file(target, (registry_id + "\n").encode())
        except (FileExistsError, OSError) as exc:
            # a precondition that failed: another registry created the object first
            if not (isinstance(exc, FileExistsError) or "condition" in str(exc).lower()):
                raise self._fail(f"write {IDENTITY_FILE}", exc) from None
        except Exception as exc:
            raise self._fail(f"write {IDENTITY_FILE}", exc) from None
        return self.identity() or registry_id

    def has_blobs(self) -> bool:
        return next(self.digests(), None) is not None

    def has(self, digest: str) -> bool:
        try:
            return bool(self.fs.exists(self.key(digest)))
        except ArtifactError:
            raise
        except Exception as exc:
            raise self._fail("list blobs", exc) from None

    # -- writing and reading ---------------------------------------------------------------------------

    def _holds(self, key: str, data: bytes, digest: str, md5: str) -> bool:
        """Whether the object at KEY holds exactly DATA: its size, then its ETag when that is the MD5 of the bytes
        (a single-part upload or copy), else the sha256 of the bytes read back: an ETag that is not the MD5 proves
        nothing either way (SSE-KMS and SSE-C buckets, multipart uploads, servers with ETags of their own)."""
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return False
        if info.get("size") != len(data):
            return False
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
        if etag == md5:
            return True
        try:
            return sha256_hex(self.fs.cat_file(key)) == digest
        except FileNotFoundError:
            return False

    def put(self, data: bytes, token: str | None = None) -> str:
        """Store `data` under its sha256 and return the digest; the object is published and checked when this
        returns. A FileNotFoundError means the temporary object was removed under it (gc expired the upload:
        see Hub.register), which the caller answers by starting over."""
        import uuid

        digest = sha256_hex(data)
        final = self.key(digest)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            if self._holds(final, data, digest, md5):
                return digest  # already present and intact: left as it is
        except Exception as exc:
            raise self._fail("read the stored blob", exc) from None
        tmp = self.temp_key(token or uuid.uuid4().hex)
        try:
            try:
                response = self.fs.pipe_file(tmp, data)
            except FileNotFoundError:
                raise ArtifactError(f"artifact store {self.url}: bucket {self.bucket!r} does not exist") from None
            if _etag(response) != md5 and not self._holds(tmp, data, digest, md5):
                raise ArtifactError(
                    f"artifact store {self.url}: the upload of sha256:{digest} did not arrive intact; nothing was "
                    "registered"
                )
            if self._copy(tmp, final) != md5 and not self._holds(final, data, digest, md5):
                raise ArtifactError(
                    f"artifact store {self.url}: sha256:{digest} was not published intact; nothing was registered"
                )
        except (ArtifactError, FileNotFoundError):
            self._discard(tmp)
            raise
        except Exception as exc:
            self._discard(tmp)
            raise self._fail(f"write sha256:{digest}", exc) from None
        except BaseException:
            self._discard(tmp)
            raise
        self._discard(tmp)
        return digest

    def _copy(self, source: str, target: str) -> str | None:
        """Copy an object server-side; the new object's MD5 ETag when the store reports one. FileNotFoundError
        when the source is gone. On S3 one CopyObject call, whose answer carries the ETag (s3fs's own copy first
        asks for the source's size)."""
        call, split = getattr(self.fs, "call_s3", None), getattr(self.fs, "split_path", None)
        if call is None or split is None:
            self.fs.copy(source, target)
            return None
        (b1, k1, _v1), (b2, k2, _v2) = split(source), split(target)
        response = call("copy_object", Bucket=b2, Key=k2, CopySource={"Bucket": b1, "Key": k1})
        self.fs.invalidate_cache(target)
        return _etag(response.get("CopyObjectResult") if isinstance(response, dict) else None)

    def read(self, digest: str, what: str) -> bytes:
        """The blob's bytes, checked against its digest; `what` names it (a ref) in the error."""
        key = self.key(digest)
        try:
            data = self.fs.cat_file(key)
        except FileNotFoundError:
            raise ArtifactError(f"artifact of {what} is missing: sha256:{digest} ({self._where(key)})") from None
        except Exception as exc:
            raise self._fail(f"read the artifact of {what}", exc) from None
        return checked(data, digest, what, self._where(key))

    def problem(self, digest: str, size: int | None = None) -> str | None:
        return self.problems({digest: size})[digest]

    def problems(self, wanted: Mapping[str, int | None]) -> dict[str, str | None]:
        """For each digest (with its recorded size, or None): None when its blob is present and intact, else what
        is wrong. Reads run in batches side by side; an unreachable store is an ArtifactError, not a problem."""
        keys = {self.key(d): d for d in wanted}
        found: dict[str, str | None] = {}
        for batch in _batches(list(keys), [wanted[d] for d in keys.values()]):
            try:
                blobs = self.fs.cat(batch, on_error="return")
            except Exception as exc:
                raise self._fail("read blobs", exc) from None
            if not isinstance(blobs, dict):  # a single path comes back as bytes
                blobs = {batch[0]: blobs}
            for key in batch:
                digest, data = keys[key], blobs.get(key, blobs.get(self._where(key)))
                found[digest] = self._judge(digest, wanted[digest], data)
        return found

    def _judge(self, digest: str, size: int | None, data: Any) -> str | None:
        if isinstance(data, FileNotFoundError) or data is None:
            return f"missing blob sha256:{digest}"
        if isinstance(data, BaseException):
            raise self._fail(f"read sha256:{digest}", data)
        if size is not None and len(data) != size:
            return f"blob sha256:{digest} has {len(data)} bytes, expected {size}"
        actual = sha256_hex(data)
        if actual != digest:
            return f"corrupt blob: expected sha256:{digest}, found sha256:{actual}"
        return None

    # -- listing and collecting ------------------------------------------------------------------------

    def _listing(self, folder: str) -> dict[str, dict[str, Any]]:
        try:
            found = self.fs.find(f"{self.base}/{folder}", detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._fail(f"list {folder}/", exc) from None
        return {k: v for k, v in sorted(found.items()) if v.get("type", "file") == "file"}

    def digests(self) -> Iterator[tuple[str, dict[str, Any]]]:
        prefix = f"{self.base}/sha256/"
        for key, info in self._listing("sha256").items():
            rest = key.split("://", 1)[-1][len(prefix) :]
            sub, _, name = rest.partition("/")
            if len(sub) == 2 and name and "/" not in name:
                yield sub + name, info

    def temp_files(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, info in self._listing("tmp").items():
            yield key.rsplit("/", 1)[-1].split(".", 1)[0], info

    def age_s(self, entry: Mapping[str, Any]) -> float:
        """Seconds since the object was last modified, by the server's clock as its listing reports it."""
        stamp = next((entry[k] for k in ("LastModified", "last_modified", "updated", "mtime") if entry.get(k)), None)
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if isinstance(stamp, datetime):
            return time.time() - stamp.timestamp()
        if isinstance(stamp, int | float):
            return time.time() - float(stamp)
        return 0.0  # unknown age: never old enough to collect

    @staticmethod
    def size_of(entry: Mapping[str, Any]) -> int:
        return int(entry.get("size") or 0)

    def remove(self, entry: Mapping[str, Any]) -> int:
        """Delete an object and return its size; 0 when it is gone already or may not be deleted."""
        try:
            self.fs.rm_file(entry["name"])
        except Exception:
            return 0
        return self.size_of(entry)

    def _discard(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.rm_file(key)
