"""The one owner of a cache directory: every name in it, and all filesystem access to it.

```
<cache dir>/
  plan.json             the shard plan (`plan.py`): the rows of each shard, so a resumed run,
                        every worker and every Ray replica split the same way
  responses.parquet     the teacher's generations (`--responses teacher`), saved before scoring
  shard-NNNNN.parquet   complete shards
  shard-NNNNN.parquet.json   each shard's record (sha256, size, stats), written with it
  .NAME.PID.tmp         a write in progress, or of a killed run: never read, deleted on resume
  .lock                 held by the run writing the cache (`store/lock.py`, `store/lease.py`)
  .lock.worker-I-of-N   held by job-array worker I while it writes its shards
  manifest.json         written last: the cache is complete only when it exists
```

The writer, the reader, the tools, `cache.py`, `responses.py` and `eval/generate.py` go
through `CacheDir`; nothing outside `store/` builds a path inside a cache. A cache directory
is a local folder or a prefix of an object store (any fsspec URL: `store/files.py` does the
filesystem access for both); every write is atomic (`store/atomic.py` locally, one PUT on an
object store, where no temp file is ever visible). Shards and the manifest are written only
if absent: on an object store that is what keeps two writers from disagreeing (see
`store/lease.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError, disk_full, is_disk_full
from rlkd_cache.store import lease
from rlkd_cache.store.atomic import write_json
from rlkd_cache.store.files import Files, StorageOptions, folder

NOT_CACHES = ("models",)
"""Folders of a cache root that are not caches (the converted default teacher)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class CacheDir:
    """One cache directory (complete or not), local or on an object store: its file names,
    and reading and writing them."""

    LOCK = ".lock"
    """The lock (`store/lock.py`, `store/lease.py`): hidden, matched by no glob of data or
    temp files."""
    MANIFEST = "manifest.json"
    PLAN = "plan.json"
    PROBE = "probe.json"
    """A served teacher's behavioural probe, saved by the first run (`cache.same_teacher`)."""
    RESPONSES = "responses.parquet"
    SHARD_GLOB = "shard-*.parquet"
    SHARD_NAME = re.compile(r"shard-([0-9]{5,})\.parquet")
    """What every shard name is, exactly: a manifest naming anything else (a path, `..`, a
    URL) is refused before any file is opened."""

    def __init__(
        self, where: str | Path | Files, storage_options: StorageOptions | None = None
    ) -> None:
        self.files = where if not isinstance(where, (str, Path)) else folder(where, storage_options)

    @property
    def path(self) -> Path | str:
        """The local folder, or the URL of the object-store prefix."""
        return self.files.path if not self.files.remote else self.files.url

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def remote(self) -> bool:
        return self.files.remote

    def __str__(self) -> str:
        return self.files.url

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:05d}.parquet"

    @classmethod
    def shard_index(cls, name: str) -> int | None:
        """The index in a shard's file name (exactly `shard_name(index)`), or None for any
        other name."""
        match = cls.SHARD_NAME.fullmatch(name)
        index = int(match.group(1)) if match else None
        return index if index is not None and cls.shard_name(index) == name else None

    @classmethod
    def record_name(cls, index: int) -> str:
        """The record of shard `index`: its sha256, size and stats, written with it."""
        return cls.shard_name(index) + ".json"

    def file(self, name: str) -> Path | str:
        """Where the file `name` of this cache lives: a local path, or a URL (for messages,
        and for benchmarks that time reading it)."""
        return self.files.file(name)

    def has(self, name: str) -> bool:
        return self.files.exists(name)

    def is_complete(self) -> bool:
        return self.has(self.MANIFEST)

    def has_responses(self) -> bool:
        return self.has(self.RESPONSES)

    def is_started(self) -> bool:
        """True for an interrupted run's directory: a plan or shards, but no manifest yet."""
        return self.has(self.PLAN) or bool(self.complete_shards())

    def complete_shards(self) -> dict[int, str]:
        """Shard index -> name of every complete shard (temp files are never listed)."""
        names = self.files.names(self.SHARD_GLOB)
        return {i: name for name in names if (i := self.shard_index(name)) is not None}

    def size(self, name: str) -> int:
        return self.files.size(name)

    def sizes(self) -> dict[str, int]:
        """The size of every file in this directory (one listing on an object store)."""
        return self.files.sizes()

    def read_bytes(self, name: str) -> bytes:
        """The whole file `name` (on an object store: one GET, retried when transient)."""
        return self.files.read_bytes(name)

    def sha256(self, name: str) -> str:
        if not self.remote:
            return file_sha256(self.files.file(name))  # type: ignore[arg-type]
        return hashlib.sha256(self.read_bytes(name)).hexdigest()

    def create(self) -> None:
        """Make the directory (and the cache root) if it does not exist (on an object store
        there is nothing to make)."""
        self.files.makedirs()

    def locked(
        self, wait_s: float, worker: tuple[int, int] | None = None
    ) -> AbstractContextManager[None]:
        """Hold this cache's lock for the block: while another process holds it, wait up to
        `wait_s` seconds, then fail naming it (0: at once). A local flock (`store/lock.py`)
        or an object-store lease (`store/lease.py`). With `worker` (index, count): the lock
        of that job-array worker only (`worker_lock`), which its peers do not take."""
        name = self.LOCK if worker is None else self.worker_lock(*worker)
        return self.files.lock(name, wait_s)

    @classmethod
    def worker_lock(cls, index: int, count: int) -> str:
        """The lock of job-array worker `index` of `count`: it owns shards index, index +
        count, ... (`plan.ShardPlan.owned`) and their temp files."""
        return f"{cls.LOCK}.worker-{index}-of-{count}"

    def check_no_workers(self) -> None:
        """Raise `RlkdError` if a job-array worker is writing this cache now (a local lock
        only: a lease on an object store cannot be told live without waiting a lease)."""
        for name in self.files.names(f"{self.LOCK}.worker-*"):
            who = self.files.holder(name)
            if who is not None:
                worker = name.removeprefix(f"{self.LOCK}.worker-").replace("-of-", " of ")
                raise RlkdError(
                    f"{self}: job-array worker {worker} is still writing this cache ({who}): "
                    "wait for the workers to end, then run --finalize"
                )

    def remove_temp_files(self, shards: Iterable[int] | None = None) -> None:
        """Delete temp files left by killed writes (on an object store: abort their multipart
        uploads): never complete, never trusted.

        All of them (`shards` None) under this cache's lock (taken here at once unless this
        process holds it, failing with the holder's name if another one does): every writer
        of a whole cache holds its lock, so while it is held here no live process writes in
        this directory and every temp file in it is a dead write's. The owner pid in a temp
        name would not tell as much: a killed run's pid is reused (in a container every run
        may get the same one), and the pids of a peer on another host sharing the directory
        are not ours to check. With `shards`, only the temp files of those shards and their
        records: a job-array worker's, which holds its own lock (`worker_lock`) while its
        peers write theirs."""
        if shards is None:
            with self.locked(wait_s=0):
                self._fence()
                self.files.remove_temp_files()
            return
        self._fence()
        names = [n for i in shards for n in (self.shard_name(i), self.record_name(i))]
        self.files.remove_temp_files(names)

    def _fence(self) -> None:
        """Before any change on an object store: raise if this process's lease on this cache
        was lost to another process (`lease.check`); a local flock cannot be lost."""
        if self.remote:
            lease.check(self.files.path)  # type: ignore[arg-type]

    @contextmanager
    def writing(self, name: str, create: bool = False) -> Iterator[Path]:
        """A local temp path to write the file `name` to; it appears under `name` only when
        the block ends without error. With `create`, only if no file has that name yet
        (else FileExistsError). A full disk is one `RlkdError` naming it (`_room_for`)."""
        self._fence()
        with self._room_for(name), self.files.writing(name, create) as tmp:
            yield tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the file `name` with `data`, atomically (on an object store: one PUT from
        memory)."""
        self._fence()
        with self._room_for(name):
            self.files.write_bytes(name, data)

    @contextmanager
    def _room_for(self, name: str) -> Iterator[None]:
        """Around a write of the file `name`: a full disk or quota becomes one `RlkdError`
        naming the file and this directory (`errors.disk_full`); the atomic write left
        nothing behind, so the rerun it asks for resumes."""
        try:
            yield
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise disk_full(name, str(self)) from None

    def _write_json(self, name: str, value: Any, create: bool = False) -> None:
        """`value` as indented, key-sorted JSON (and a newline), atomically."""
        with self.writing(name, create) as tmp:
            write_json(tmp, value)

    def _read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file of this cache, its page checksums verified (where it has them:
        files written before they were are read unchecked)."""
        return table_of(self.read_bytes(name), columns)

    def read_record(self, index: int) -> Any:
        """The JSON value of shard `index`'s record, or None if it has none (or an unreadable
        one: its write never finished)."""
        try:
            return self._read_json(self.record_name(index))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def write_record(self, index: int, record: dict[str, Any]) -> None:
        self._write_json(self.record_name(index), record)

    def remove_shard(self, index: int) -> None:
        """Delete shard `index` and its record (a damaged shard, to be written again)."""
        self._fence()
        for name in (self.shard_name(index), self.record_name(index)):
            self.files.remove(name)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest's JSON document; raise `RlkdError` naming the directory or the file
        when there is no cache, no manifest (an incomplete cache) or no valid JSON."""
        path = self.file(self.MANIFEST)
        if not self.has(self.MANIFEST):
            if not self.files.is_dir():
                raise RlkdError(f"cache not found: {self} (expected a cache directory)")
            raise RlkdError(
                f"{self} is not a complete cache: it has no {self.MANIFEST} "
                "(an interrupted `rlkd cache` resumes when rerun with the same arguments)"
            )
        try:
            return self._read_json(self.MANIFEST)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RlkdError(f"{path}: corrupt manifest, expected JSON ({e})") from None

    def write_manifest(self, document: dict[str, Any], create: bool = False) -> None:
        """Write the manifest, atomically: call it last, after every shard. With `create`,
        only if there is none yet (else FileExistsError)."""
        self._write_json(self.MANIFEST, document, create)

    def read_plan(self) -> Any:
        """The saved shard plan's JSON document (`plan.ShardPlan`), or None if there is none;
        `RlkdError` naming the file if it is not JSON."""
        if not self.has(self.PLAN):
            return None
        try:
            return self._read_json(self.PLAN)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RlkdError(
                f"{self.file(self.PLAN)}: corrupt shard plan ({e}); delete it and rerun"
            ) from None

    def write_plan(self, document: dict[str, Any], create: bool = False) -> None:
        """Save the shard plan; with `create`, only if there is none yet (else
        FileExistsError)."""
        self._write_json(self.PLAN, document, create)

    def read_probe(self) -> Any:
        """The saved probe of a served teacher's answers, or None if there is none."""
        if not self.has(self.PROBE):
            return None
        try:
            return self._read_json(self.PROBE)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            where = self.file(self.PROBE)
            raise RlkdError(f"{where}: corrupt probe ({e}); delete it and rerun") from None

    def write_probe(self, document: dict[str, Any], create: bool = False) -> None:
        """Save the probe; with `create`, only if there is none yet (else FileExistsError)."""
        self._write_json(self.PROBE, document, create)

    def read_responses(self, columns: list[str] | None = None) -> pa.Table:
        """The saved teacher generations (seq_id, prompt, response)."""
        return self.read_table(self.RESPONSES, columns)

    def write_responses(self, table: pa.Table) -> None:
        with self.writing(self.RESPONSES) as tmp:
            pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def table_of(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's table from its bytes, page checksums verified where it has them."""
    return pq.read_table(io.BytesIO(data), columns=columns, page_checksum_verification=True)


def cache_dirs(
    root: str | Path, storage_options: StorageOptions | None = None
) -> Iterator[CacheDir]:
    """Every folder under a cache root that may be a cache (complete or not), by name."""
    files = folder(root, storage_options)
    for name in files.subfolders():
        if name not in NOT_CACHES:
            yield CacheDir(files.child(name))
