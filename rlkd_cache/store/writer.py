"""Atomic, resumable shard writing.

`CacheWriter` is a context manager over one cache directory. Each shard is encoded and
written in a background thread (so the teacher keeps running) to a temp file, fsynced and
renamed to `shard-NNNNN.parquet`: a shard exists under its final name only when complete.
A killed run leaves only temp files, which the next run deletes; complete shards are kept and
their stats read back from their footers. The manifest is written last, by `finish`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rlkd_cache.store import codec
from rlkd_cache.store.manifest import MANIFEST, file_sha256, fsync_dir, write_json_atomic

STATS_KEY = b"rlkd.stats"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    if name.startswith("shard-") and name.endswith(".parquet") and name[6:-8].isdigit():
        return int(name[6:-8])
    return None


def parquet_options(level: int) -> dict[str, Any]:
    """Writer options: zstd, byte-stream-split integers, one big page per column chunk
    (zstd finds more to share), no Arrow schema blob and no statistics in the footer."""
    return {
        "compression": "zstd",
        "compression_level": level,
        "use_dictionary": ["seq_id"],
        "column_encoding": {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in codec.INT_COLUMNS},
        "data_page_size": 64 << 20,
        "store_schema": False,
        "write_statistics": False,
    }


class CacheWriter:
    """Writes the shards and, last, the manifest of one cache directory."""

    def __init__(self, cache_dir: Path, step: float, zstd_level: int = 19):
        self.dir = Path(cache_dir)
        self.step = step
        self.level = zstd_level
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[dict[str, Any]]] = []
        self.written: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> CacheWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()  # left by a killed run: never complete, never trusted
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlkd-writer")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            self.drain()

    def existing(self) -> dict[int, dict[str, Any]]:
        """Complete shards already on disk (from an interrupted run), with their stats."""
        found = {}
        for path in sorted(self.dir.glob("shard-*.parquet")):
            index = shard_index(path.name)
            if index is None:
                continue
            meta = pq.ParquetFile(path).metadata.metadata or {}
            stats = json.loads(meta[STATS_KEY])
            found[index] = {
                **stats,
                "name": path.name,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        return found

    def submit(self, index: int, block: codec.Block) -> None:
        """Encode and write shard `index` in the background; re-raise earlier failures."""
        assert self._pool is not None
        self.drain(wait=False)
        self._pending.append(self._pool.submit(self._write, index, block))

    def drain(self, wait: bool = True) -> None:
        """Collect finished writes (all of them if `wait`), re-raising their errors here."""
        still = []
        for future in self._pending:
            if wait or future.done():
                info = future.result()
                self.written[info["index"]] = info
            else:
                still.append(future)
        self._pending = still

    def _write(self, index: int, block: codec.Block) -> dict[str, Any]:
        return write_shard(self.dir / shard_name(index), index, block, self.step, self.level)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Add the shard list and totals to `manifest` and write it, last and atomically."""
        self.drain()
        shards = [self.written[i] for i in sorted(self.written)]
        positions = sum(s["positions"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        manifest["shards"] = [{k: v for k, v in s.items() if k != "index"} for s in shards]
        manifest["totals"] = {
            "shards": len(shards),
            "rows": sum(s["rows"] for s in shards),
            "positions": positions,
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": size,
            "bytes_per_position": size / max(positions, 1),
            "mean_topk_mass": sum(s["topk_mass_sum"] for s in shards) / max(positions, 1),
        }
        write_json_atomic(self.dir / MANIFEST, manifest)
        return manifest


def write_shard(
    final: Path, index: int, block: codec.Block, step: float, level: int = 19
) -> dict[str, Any]:
    """Encode `block` and write it atomically as `final` (temp file, fsync, rename)."""
    table = codec.encode(block, step)
    mass = float(np.exp(block.topk_logprobs.astype(np.float64)).sum())
    stats = {
        "index": index,
        "rows": len(block),
        "positions": int(block.pos_off[-1]),
        "tokens": int(block.tok_off[-1]),
        "topk_mass_sum": mass,
    }
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    metadata = dict(table.schema.metadata or {})
    metadata[STATS_KEY] = json.dumps(stats).encode()
    with pq.ParquetWriter(tmp, table.schema.remove_metadata(), **parquet_options(level)) as w:
        w.write_table(table.replace_schema_metadata(None), row_group_size=len(block) or 1)
        w.add_key_value_metadata(metadata)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)
    fsync_dir(final.parent)
    return {
        **stats,
        "name": final.name,
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
    }
