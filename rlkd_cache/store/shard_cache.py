"""A size-bounded local copy of shards read from a remote cache (`--local-cache DIR`).

Shards are kept by their sha256 (`DIR/<sha256>.parquet`), so one copy serves every cache,
epoch and student on the machine that lists those bytes, and a name can never point at other
content: a kept file is hashed again when read, and dropped if it differs. Writes are atomic
(`store/atomic.py`); when the folder holds more than `max_bytes`, the least recently used
files go (a hit refreshes a file's time). Several processes may share the folder: the worst a
race does is evict a file another one then reads again from the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from rlkd_cache.store.atomic import atomic_path

log = logging.getLogger("rlkd.store")

SHA256 = re.compile(r"[0-9a-f]{64}")


class ShardCache:
    """Verified shard bytes on local disk, by sha256, at most `max_bytes` in all."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.folder / f"{sha256}.parquet"

    def get(self, sha256: str) -> bytes | None:
        """The kept bytes with this sha256, or None (none kept, or damaged: then dropped)."""
        path = self._file(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("warning: %s: damaged copy in the local cache: dropped", path)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep `data` (whose sha256 the caller checked), then evict down to `max_bytes`."""
        if len(data) > self.max_bytes:
            return
        with atomic_path(self._file(sha256)) as tmp:
            tmp.write_bytes(data)
        self._evict()

    def _evict(self) -> None:
        kept = []
        for path in self.folder.glob("*.parquet"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            kept.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
