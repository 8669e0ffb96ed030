"""Atomic, resumable shard writing.

`CacheWriter` is a context manager over one cache directory (`CacheDir`). Each shard is
encoded and written in a background thread (so the teacher keeps running) through
`CacheDir.writing`: it exists under its final name, `shard-NNNNN.parquet`, only when
complete, and only after its record (`CacheDir.record_name`: the sha256 and size of the
bytes written, and the stats) is on disk. Entering deletes the temp files a killed run left;
`resume` takes over the complete shards it left that match their records, and has the rest
redone. The manifest, written last by `finish`, carries the recorded hashes.

Shards and the manifest are written only where no file has their name (`CacheDir.writing`
with `create`): a shard that appeared meanwhile (another writer of the same cache on an
object store, whose lease this run outlived) is adopted as it is, its sha256 taken from its
bytes, so the manifest lists what the store holds; a manifest that appeared meanwhile is the
cache, complete, and is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.layout import CacheDir, file_sha256
from rlkd_cache.store.manifest import Manifest, ShardEntry

log = logging.getLogger("rlkd.store")

STATS_KEY = b"rlkd.stats"


def parquet_options(level: int) -> dict[str, Any]:
    """Writer options: zstd, byte-stream-split integers, one big page per column chunk
    (zstd finds more to share), a CRC-32 per page (checked on every read), no Arrow schema
    blob and no statistics in the footer."""
    return {
        "compression": "zstd",
        "compression_level": level,
        "use_dictionary": ["seq_id"],
        "column_encoding": {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in codec.INT_COLUMNS},
        "data_page_size": 64 << 20,
        "store_schema": False,
        "write_statistics": False,
        "write_page_checksum": True,
    }


class CacheWriter:
    """Writes the shards and, last, the manifest of one cache directory."""

    def __init__(
        self,
        layout: CacheDir,
        step: float,
        zstd_level: int = 19,
        owned: Sequence[int] | None = None,
    ):
        self.layout = layout
        self.step = step
        self.level = zstd_level
        self.owned = owned
        """The shards this writer writes (a job-array worker's); None: all of them."""
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[int, Future[ShardEntry]]] = []
        self._written: dict[int, ShardEntry] = {}

    def __enter__(self) -> CacheWriter:
        """Make the directory and delete the temp files killed writes left there (of the owned
        shards only, for a job-array worker); for a whole cache that takes the cache's lock,
        so it fails, naming the holder, while another process writes here
        (`CacheDir.remove_temp_files`; `run_cache` already holds the lock)."""
        self.layout.create()
        self.layout.remove_temp_files(self.owned)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlkd-writer")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            self.drain()

    def resume(self, shard_rows: Sequence[int]) -> list[int]:
        """Take over the complete shards an interrupted run left, for the plan that gives
        shard i `shard_rows[i]` rows; return their indices. A shard beyond the plan is
        ignored, and one that does not match its record (or has none) is deleted, to be
        redone: both with a warning naming the file. A job-array worker looks at its own
        shards only."""
        owned = None if self.owned is None else set(self.owned)
        for index, name in self.layout.complete_shards().items():
            if owned is not None and index not in owned:
                continue
            path = self.layout.file(name)
            if index >= len(shard_rows):
                log.warning(
                    "warning: %s: not in the shard plan (%d shards): ignored", path, len(shard_rows)
                )
                continue
            entry, problem = recorded(self.layout, index, shard_rows[index])
            if entry is None:
                log.warning("warning: %s: %s; redoing it", path, problem)
                self.layout.remove_shard(index)
                continue
            self._written[index] = entry
        return sorted(self._written)

    def submit(self, index: int, block: codec.Block) -> None:
        """Encode and write shard `index` in the background, after the write before it is done
        (so at most one shard waits in memory while the teacher scores the next, however slow
        the store); re-raise earlier failures."""
        assert self._pool is not None
        self.drain()
        future = self._pool.submit(write_shard, self.layout, index, block, self.step, self.level)
        self._pending.append((index, future))

    def take(self, index: int, entry: ShardEntry) -> None:
        """Count shard `index` as written by another process of this run (a Ray replica)."""
        self._written[index] = entry

    def drain(self) -> None:
        """Wait for the pending writes, re-raising their errors here."""
        for index, future in self._pending:
            self._written[index] = future.result()
        self._pending = []

    def finish(self, manifest: Manifest) -> Manifest:
        """`manifest` with the shards written, after writing it, last and atomically."""
        self.drain()
        shards = tuple(self._written[i] for i in sorted(self._written))
        done = dataclasses.replace(manifest, shards=shards)
        try:
            self.layout.write_manifest(done.to_json(), create=True)
        except FileExistsError:
            log.info("%s was completed by another run meanwhile: keeping its manifest", self.layout)
            path = self.layout.file(CacheDir.MANIFEST)
            return Manifest.from_json(self.layout.read_manifest(), path)
        return done


def recorded(
    layout: CacheDir, index: int, rows: int, data: bytes | None = None
) -> tuple[ShardEntry | None, str]:
    """Shard `index`'s manifest entry from its record, if the shard (its bytes `data` when
    the caller has read them) matches it and holds `rows` rows; else None and what is wrong.
    What a resumed run and `--finalize` trust a written shard by."""
    name = layout.shard_name(index)
    try:
        entry = ShardEntry.from_json(layout.read_record(index))
    except (KeyError, TypeError):
        return None, "no complete record of its sha256 (its write did not finish)"
    if entry.name != name or entry.rows != rows:
        return None, f"its record is not of {name} with {rows} rows (another shard plan)"
    actual = layout.sha256(name) if data is None else hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        return None, "its sha256 differs from the one recorded when it was written (damaged)"
    return entry, ""


def write_shard(
    layout: CacheDir, index: int, block: codec.Block, step: float, level: int = 19
) -> ShardEntry:
    """Encode `block` and write it atomically as shard `index` of `layout`, its record first:
    the shard appears under its name only once its record is on disk."""
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
    try:
        with layout.writing(name, create=True) as tmp:
            with pq.ParquetWriter(tmp, schema, **parquet_options(level)) as w:
                w.write_table(table.replace_schema_metadata(None), row_group_size=len(block) or 1)
                w.add_key_value_metadata(metadata)
            entry = _entry(name, stats, tmp.stat().st_size, file_sha256(tmp))
            layout.write_record(index, dataclasses.asdict(entry))
    except FileExistsError:
        entry = _adopt(layout, index, stats)
    return entry


def _entry(name: str, stats: dict[str, Any], size: int, sha256: str) -> ShardEntry:
    return ShardEntry(
        name=name,
        rows=stats["rows"],
        positions=stats["positions"],
        tokens=stats["tokens"],
        bytes=size,
        sha256=sha256,
        topk_mass_sum=stats["topk_mass_sum"],
    )


def _adopt(layout: CacheDir, index: int, stats: dict[str, Any]) -> ShardEntry:
    """The entry of shard `index` as another writer of this cache wrote it meanwhile (its
    record rewritten to match), after checking it holds the rows this one would have."""
    name = layout.shard_name(index)
    data = layout.read_bytes(name)
    try:
        theirs = json.loads(pq.ParquetFile(io.BytesIO(data)).metadata.metadata[STATS_KEY])
    except Exception as e:  # pyarrow raises several types for damaged files
        raise RlkdError(f"{layout.file(name)}: written by another run, unreadable ({e})") from None
    keys = ("rows", "positions", "tokens")
    if [theirs.get(k) for k in keys] != [stats[k] for k in keys]:
        raise RlkdError(
            f"{layout.file(name)}: written meanwhile by another run with other rows "
            f"({theirs.get('rows')} rows, this run has {stats['rows']}): two runs with "
            "different inputs share this cache directory"
        )
    entry = _entry(name, theirs, len(data), hashlib.sha256(data).hexdigest())
    layout.write_record(index, dataclasses.asdict(entry))
    log.warning("warning: %s was written by another run meanwhile: kept as it is", name)
    return entry
