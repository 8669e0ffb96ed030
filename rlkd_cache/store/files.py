"""Where a cache's files live: a local folder, or a prefix of any fsspec filesystem.

`folder(url, storage_options)` gives a `LocalFiles` for a path or a `file://` URL, and an
`ObjectFiles` for any other fsspec URL (`s3://bucket/prefix`, `gs://...`). `CacheDir` does all
its filesystem access through one of them; both offer the same few operations on the names in
one folder, and no name is ever a path (`CacheDir` checks names before it asks).

Writing is atomic either way: `writing(name)` yields a local temp file to fill, which appears
under `name` only complete. Locally that is temp + fsync + rename (`store/atomic.py`). An
object store has no rename, so the temp file is written on local disk and sent in one PUT (a
large one as a multipart upload, which the store makes visible only when it completes);
`create=True` writes only if no object has the name yet (S3's `If-None-Match: *`, fsspec's
`mode="create"`). A killed multipart upload leaves invisible parts, which
`remove_temp_files` aborts. The lock of an object folder is a lease object (`store/lease.py`).

Credentials and endpoints come the way fsspec and the SDKs take them (for S3: the environment,
`~/.aws`, `AWS_ENDPOINT_URL`; fsspec's own `FSSPEC_S3_*` variables and config files) or from
`storage_options` (fsspec keyword arguments by protocol, for example
`{"s3": {"endpoint_url": "http://..."}}`); they never enter a manifest or a fingerprint.
Reads from an object store retry transient errors with exponential backoff.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import lease, lock
from rlkd_cache.store.atomic import TEMP_GLOB, atomic_path, fault_point

log = logging.getLogger("rlkd.store")

StorageOptions = Mapping[str, Mapping[str, Any]]
"""fsspec keyword arguments by protocol: `{"s3": {"endpoint_url": ..., "anon": false}}`."""

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""The pip extra of rlkd (`rlkd[s3]`) that installs each protocol's filesystem."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False},
    "s3a": {"use_listings_cache": False},
}
"""rlkd's fsspec options, under the user's: listings are never cached, since other processes
(a second writer, a finishing one) change the folders rlkd reads."""

RETRIES = 5
"""Tries of a read from an object store before its error is final."""
BACKOFF_S = 0.5
"""Seconds before the first retry; doubled (with jitter) before each next one."""

T = TypeVar("T")


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a read may fail with and then succeed on retry: OS-level and timeout errors, and
    the connection errors of the S3 and HTTP clients that fsspec filesystems use (which
    they do not always turn into OSError)."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        found.append(ClientError)
    return tuple(found)


def folder(where: str | Path, storage_options: StorageOptions | None = None) -> Files:
    """The folder a path or URL names: `LocalFiles` for a path or `file://`, else
    `ObjectFiles` (raise `RlkdError` naming the pip extra when its filesystem is missing)."""
    text = str(where)
    if not is_remote(text):
        return LocalFiles(Path(text.split("://", 1)[-1]).expanduser())
    protocol = text.split("://", 1)[0].lower()
    import fsspec

    options = {**DEFAULTS.get(protocol, {}), **(storage_options or {}).get(protocol, {})}
    try:
        fs, path = fsspec.core.url_to_fs(text, **options)
    except ImportError:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'rlkd[{extra}]'" if extra else "install its fsspec implementation"
        raise RlkdError(f"{text}: no filesystem for {protocol}:// is installed ({hint})") from None
    except ValueError as e:
        raise RlkdError(f"{text}: not a URL fsspec knows ({e})") from None
    except TypeError as e:
        raise RlkdError(f"{text}: storage options {sorted(options)} not accepted ({e})") from None
    if hasattr(fs, "connect"):  # s3fs makes its client lazily: check the options now
        try:
            fs.connect()
        except (TypeError, ValueError) as e:
            raise RlkdError(
                f"{text}: storage options {sorted(options)} not accepted ({e})"
            ) from None
    return ObjectFiles(fs, path.rstrip("/"))


def is_remote(where: str | Path) -> bool:
    """True for a URL of a filesystem other than the local one."""
    text = str(where)
    return "://" in text and text.split("://", 1)[0].lower() not in ("file", "local")


class LocalFiles:
    """A local folder: atomic rename, fsync, an OS file lock."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def child(self, name: str) -> LocalFiles:
        return LocalFiles(self.path / name)

    def file(self, name: str) -> Path:
        return self.path / name

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def subfolders(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir())

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    def names(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.path.glob(pattern) if p.is_file())

    def size(self, name: str) -> int:
        return self.file(name).stat().st_size

    def sizes(self) -> dict[str, int]:
        if not self.path.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.path.iterdir() if p.is_file()}

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()

    def makedirs(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def writing(self, name: str, create: bool = False) -> Iterator[Path]:
        """A temp path in this folder, renamed over `name` when the block ends (with `create`:
        FileExistsError instead if `name` exists; the folder's lock keeps other rlkd writers
        out meanwhile)."""
        with atomic_path(self.file(name)) as tmp:
            yield tmp
            if create and self.file(name).exists():
                raise FileExistsError(self.file(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writing(name) as tmp:
            tmp.write_bytes(data)

    def remove(self, name: str) -> None:
        self.file(name).unlink(missing_ok=True)

    def remove_temp_files(self, names: Iterable[str] | None = None) -> None:
        if names is None:
            paths = list(self.path.glob(TEMP_GLOB))
        else:
            paths = [p for n in names for p in self.path.glob(f".{glob.escape(n)}.*.tmp")]
        for path in paths:
            path.unlink(missing_ok=True)

    def lock(self, name: str, wait_s: float) -> AbstractContextManager[None]:
        return lock.hold(self.file(name), wait_s)

    def holder(self, name: str) -> str | None:
        """Who holds the lock `name` now, or None."""
        return lock.holder_of(self.file(name))


class ObjectFiles:
    """A prefix of an fsspec filesystem without rename (S3, GCS, ...)."""

    remote = True

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        """The prefix as the filesystem names it (`bucket/prefix`, no protocol)."""

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def child(self, name: str) -> ObjectFiles:
        return ObjectFiles(self.fs, f"{self.path}/{name}")

    def file(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _listing(self) -> list[dict[str, Any]]:
        try:
            return self._retrying(lambda: self.fs.ls(self.path, detail=True, refresh=True))
        except FileNotFoundError:
            return []

    def is_dir(self) -> bool:
        return bool(self._listing())

    def subfolders(self) -> list[str]:
        return sorted(e["name"].rsplit("/", 1)[-1] for e in self._listing() if e["type"] != "file")

    def exists(self, name: str) -> bool:
        """True if an object has the name (`fs.isfile` would say False for an unreachable
        store too)."""
        try:
            return self._retrying(lambda: self.fs.info(self._key(name)))["type"] == "file"
        except FileNotFoundError:
            return False

    def names(self, pattern: str) -> list[str]:
        return sorted(n for n in self.sizes() if fnmatch.fnmatchcase(n, pattern))

    def size(self, name: str) -> int:
        return int(self._retrying(lambda: self.fs.info(self._key(name)))["size"])

    def sizes(self) -> dict[str, int]:
        return {
            e["name"].rsplit("/", 1)[-1]: int(e["size"])
            for e in self._listing()
            if e["type"] == "file"
        }

    def read_bytes(self, name: str) -> bytes:
        return self._retrying(lambda: self.fs.cat_file(self._key(name)))

    def makedirs(self) -> None:
        """Nothing to make: an object store has no folders (the bucket must exist)."""

    @contextmanager
    def writing(self, name: str, create: bool = False) -> Iterator[Path]:
        """A local temp file, PUT as the object `name` when the block ends (with `create`:
        only if no object has that name, else FileExistsError)."""
        with tempfile.TemporaryDirectory(prefix="rlkd-put-") as tmp:
            path = Path(tmp) / name
            yield path
            fault_point("before-rename", name)
            self.fs.put_file(str(path), self._key(name), mode="create" if create else "overwrite")
            fault_point("after-rename", name)

    def write_bytes(self, name: str, data: bytes) -> None:
        """`data` as the object `name`, in one PUT from memory (no local temp file)."""
        fault_point("before-rename", name)
        self.fs.pipe_file(self._key(name), data)
        fault_point("after-rename", name)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(name))

    def remove_temp_files(self, names: Iterable[str] | None = None) -> None:
        """Abort the multipart uploads under this prefix (or, with `names`, of those objects)
        that killed writes left (S3); the objects themselves are never partial."""
        if not hasattr(self.fs, "list_multipart_uploads"):
            return
        bucket, _, prefix = self.path.partition("/")
        keys = None if names is None else {f"{prefix}/{n}" for n in names}
        for upload in self.fs.list_multipart_uploads(bucket):
            key = upload["Key"]
            if key in keys if keys is not None else key.startswith(prefix + "/"):
                self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])

    def lock(self, name: str, wait_s: float) -> AbstractContextManager[None]:
        return lease.hold(self.fs, self._key(name), wait_s)

    def holder(self, name: str) -> str | None:
        """None: whether a lease is live is known only by watching it for a lease's time."""
        return None

    def _retrying(self, read: Callable[[], T]) -> T:
        """`read()`, retried on transient errors (`RETRIES` tries, exponential backoff with
        jitter); a missing object or a refused permission is final at once."""
        attempt = 1
        while True:
            try:
                return read()
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise
            except transient_errors() as e:
                if attempt == RETRIES:
                    raise RlkdError(f"{self.url}: {type(e).__name__}: {e} ({RETRIES} tries)") from e
                pause = BACKOFF_S * 2 ** (attempt - 1) * (1 + random.random())
                log.warning("%s: %s; retrying in %.1f s", self.url, e, pause)
                time.sleep(pause)
                attempt += 1


Files = LocalFiles | ObjectFiles
"""A cache's folder, local or on an object store."""
