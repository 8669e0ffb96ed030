"""Atomic, resumable shard writing.

`CacheWriter` is a context manager over one cache directory (`CacheDir`). Each shard is
encoded and written in a background thread (so the teacher keeps running) through
`CacheDir.writing`: it exists under its final name, `shard-NNNNN.parquet`, only when
complete. Entering deletes the temp files a killed run left; `resume` takes over the
complete shards it left (their stats read back from their footers) and says which they are.
The manifest is written last, by `finish`.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rlkd_cache.store import codec
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.manifest import Manifest, ShardEntry

STATS_KEY = b"rlkd.stats"


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

    def __init__(self, layout: CacheDir, step: float, zstd_level: int = 19):
        self.layout = layout
        self.step = step
        self.level = zstd_level
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[int, Future[ShardEntry]]] = []
        self._written: dict[int, ShardEntry] = {}

    def __enter__(self) -> CacheWriter:
        self.layout.create()
        self.layout.remove_temp_files()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlkd-writer")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            self.drain()

    def resume(self) -> list[int]:
        """Take over the complete shards an interrupted run left; return their indices."""
        found = self.layout.complete_shards()
        for index, name in found.items():
            stats = json.loads(self.layout.footer_metadata(name)[STATS_KEY])
            self._written[index] = _entry(self.layout, name, stats)
        return sorted(found)

    def submit(self, index: int, block: codec.Block) -> None:
        """Encode and write shard `index` in the background; re-raise earlier failures."""
        assert self._pool is not None
        self.drain(wait=False)
        future = self._pool.submit(write_shard, self.layout, index, block, self.step, self.level)
        self._pending.append((index, future))

    def drain(self, wait: bool = True) -> None:
        """Collect finished writes (all of them if `wait`), re-raising their errors here."""
        still = []
        for index, future in self._pending:
            if wait or future.done():
                self._written[index] = future.result()
            else:
                still.append((index, future))
        self._pending = still

    def finish(self, manifest: Manifest) -> Manifest:
        """`manifest` with the shards written, after writing it, last and atomically."""
        self.drain()
        shards = tuple(self._written[i] for i in sorted(self._written))
        done = dataclasses.replace(manifest, shards=shards)
        self.layout.write_manifest(done.to_json())
        return done


def write_shard(
    layout: CacheDir, index: int, block: codec.Block, step: float, level: int = 19
) -> ShardEntry:
    """Encode `block` and write it atomically as shard `index` of `layout`."""
    table = codec.encode(block, step)
    stats = {
        "index": index,
        "rows": len(block),
        "positions": int(block.pos_off[-1]),
        "tokens": int(block.tok_off[-1]),
        "topk_mass_sum": float(np.exp(block.topk_logprobs.astype(np.float64)).sum()),
    }
    metadata = dict(table.schema.metadata or {})
    metadata[STATS_KEY] = json.dumps(stats).encode()
    name = layout.shard_name(index)
    schema = table.schema.remove_metadata()
    with layout.writing(name) as tmp, pq.ParquetWriter(tmp, schema, **parquet_options(level)) as w:
        w.write_table(table.replace_schema_metadata(None), row_group_size=len(block) or 1)
        w.add_key_value_metadata(metadata)
    return _entry(layout, name, stats)


def _entry(layout: CacheDir, name: str, stats: dict[str, Any]) -> ShardEntry:
    """The manifest entry of a complete shard, from the stats in its footer."""
    return ShardEntry(
        name=name,
        rows=stats["rows"],
        positions=stats["positions"],
        tokens=stats["tokens"],
        bytes=layout.size(name),
        sha256=layout.sha256(name),
        topk_mass_sum=stats["topk_mass_sum"],
    )
