"""The one owner of a cache directory: every name in it, and all filesystem access to it.

```
<cache dir>/
  plan.json             rows per shard, so a resumed run splits the same way
  responses.parquet     the teacher's generations (`--responses teacher`), saved before scoring
  shard-NNNNN.parquet   complete shards
  shard-NNNNN.parquet.json   each shard's record (sha256, size, stats), written with it
  .NAME.PID.tmp         a write in progress, or of a killed run: never read, deleted on resume
  .lock                 held by the run writing the cache (`store/lock.py`); never data
  manifest.json         written last: the cache is complete only when it exists
```

The writer, the reader, the tools, `cache.py`, `responses.py` and `eval/generate.py` go
through `CacheDir`; nothing outside `store/` builds a path inside a cache. Every write goes
through `store/atomic.py`. This is the seam where object storage (fsspec) plugs in: today a
cache directory is a local folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError, disk_full, is_disk_full
from rlkd_cache.store import lock
from rlkd_cache.store.atomic import TEMP_GLOB, atomic_path, write_json_atomic

NOT_CACHES = ("models",)
"""Folders of a cache root that are not caches (the converted default teacher)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class CacheDir:
    """One cache directory (complete or not): its file names, and reading and writing them."""

    LOCK = ".lock"
    """The lock file (`store/lock.py`): hidden, matched by no glob of data or temp files."""
    MANIFEST = "manifest.json"
    PLAN = "plan.json"
    RESPONSES = "responses.parquet"
    SHARD_GLOB = "shard-*.parquet"
    SHARD_NAME = re.compile(r"shard-([0-9]{5,})\.parquet")
    """What every shard name is, exactly: a manifest naming anything else (a path, `..`, a
    URL) is refused before any file is opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

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

    def file(self, name: str) -> Path:
        """Where the file `name` of this cache lives (for messages, and for benchmarks that
        time reading it)."""
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def is_complete(self) -> bool:
        return self.has(self.MANIFEST)

    def has_responses(self) -> bool:
        return self.has(self.RESPONSES)

    def is_started(self) -> bool:
        """True for an interrupted run's directory: a plan or shards, but no manifest yet."""
        return self.has(self.PLAN) or bool(self.complete_shards())

    def complete_shards(self) -> dict[int, str]:
        """Shard index -> name of every complete shard on disk (temp files are never listed)."""
        names = (p.name for p in sorted(self.path.glob(self.SHARD_GLOB)))
        return {i: name for name in names if (i := self.shard_index(name)) is not None}

    def size(self, name: str) -> int:
        return self.file(name).stat().st_size

    def sha256(self, name: str) -> str:
        return file_sha256(self.file(name))

    def create(self) -> None:
        """Make the directory (and the cache root) if it does not exist."""
        self.path.mkdir(parents=True, exist_ok=True)

    def locked(self, wait_s: float) -> AbstractContextManager[None]:
        """Hold this cache's lock (`store/lock.py`) for the block: while another process
        holds it, wait up to `wait_s` seconds, then fail naming it (0: at once)."""
        return lock.hold(self.file(self.LOCK), wait_s)

    def remove_temp_files(self) -> None:
        """Delete temp files left by killed writes: never complete, never trusted.

        All of them, under this cache's lock (taken here at once unless this process holds
        it, failing with the holder's name if another one does): every writer of a cache
        holds its lock, so while it is held here no live process writes in this directory
        and every temp file in it is a dead write's. The owner pid in a temp name would not
        tell as much: a killed run's pid is reused (in a container every run may get the same
        one), and the pids of a peer on another host sharing the directory are not ours to
        check."""
        with self.locked(wait_s=0):
            for stale in self.path.glob(TEMP_GLOB):
                stale.unlink()

    @contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A temp path to write the file `name` to; it appears under `name` only when the
        block ends without error (`atomic_path`). A full disk is one `RlkdError` naming it
        (`_room_for`)."""
        with self._room_for(name), atomic_path(self.file(name)) as tmp:
            yield tmp

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
            raise disk_full(name, self.path) from None

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file of this cache, its page checksums verified (where it has them:
        files written before they were are read unchecked)."""
        return pq.read_table(self.file(name), columns=columns, page_checksum_verification=True)

    def footer_metadata(self, name: str) -> dict[bytes, bytes]:
        """The key-value metadata of a Parquet file's footer (its data is not read)."""
        return pq.ParquetFile(self.file(name)).metadata.metadata or {}

    def read_record(self, index: int) -> Any:
        """The JSON value of shard `index`'s record, or None if it has none (or an unreadable
        one: its write never finished)."""
        try:
            return json.loads(self.file(self.record_name(index)).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def write_record(self, index: int, record: dict[str, Any]) -> None:
        name = self.record_name(index)
        with self._room_for(name):
            write_json_atomic(self.file(name), record)

    def remove_shard(self, index: int) -> None:
        """Delete shard `index` and its record (a damaged shard, to be written again)."""
        for name in (self.shard_name(index), self.record_name(index)):
            self.file(name).unlink(missing_ok=True)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest's JSON document; raise `RlkdError` naming the directory or the file
        when there is no cache, no manifest (an incomplete cache) or no valid JSON."""
        path = self.file(self.MANIFEST)
        if not self.path.is_dir():
            raise RlkdError(f"cache not found: {self.path} (expected a cache directory)")
        if not path.is_file():
            raise RlkdError(
                f"{self.path} is not a complete cache: it has no {self.MANIFEST} "
                "(an interrupted `rlkd cache` resumes when rerun with the same arguments)"
            )
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RlkdError(f"{path}: corrupt manifest, expected JSON ({e})") from None

    def write_manifest(self, document: dict[str, Any]) -> None:
        """Write the manifest, atomically: call it last, after every shard."""
        with self._room_for(self.MANIFEST):
            write_json_atomic(self.file(self.MANIFEST), document)

    def read_plan(self, fingerprint: str) -> list[int] | None:
        """Rows per shard as saved by an earlier run for `fingerprint`, else None."""
        path = self.file(self.PLAN)
        if not path.is_file():
            return None
        try:
            plan = json.loads(path.read_text())
            if plan.get("fingerprint") != fingerprint:
                return None
            return [int(n) for n in plan["shard_rows"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise RlkdError(f"{path}: corrupt shard plan ({e}); delete it and rerun") from None

    def write_plan(self, fingerprint: str, shard_rows: list[int]) -> None:
        with self._room_for(self.PLAN):
            write_json_atomic(
                self.file(self.PLAN), {"fingerprint": fingerprint, "shard_rows": shard_rows}
            )

    def read_responses(self, columns: list[str] | None = None) -> pa.Table:
        """The saved teacher generations (seq_id, prompt, response)."""
        return self.read_table(self.RESPONSES, columns)

    def write_responses(self, table: pa.Table) -> None:
        with self.writing(self.RESPONSES) as tmp:
            pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def cache_dirs(root: str | Path) -> Iterator[CacheDir]:
    """Every folder under a cache root that may be a cache (complete or not), by name."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder.name not in NOT_CACHES:
            yield CacheDir(folder)
