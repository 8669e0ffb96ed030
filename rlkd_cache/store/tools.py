"""What `rlkd inspect`, `verify`, `ls` and `export` do, as library functions (`copy` is in
`store/copy.py`).

Every one takes a local folder or an fsspec URL (`store/files.py`), with `storage_options`
for the filesystem.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.atomic import atomic_path
from rlkd_cache.store.files import StorageOptions
from rlkd_cache.store.fingerprint import fingerprint
from rlkd_cache.store.layout import CacheDir, cache_dirs
from rlkd_cache.store.manifest import DIGEST_KEY, ShardEntry
from rlkd_cache.store.reader import Cache
from rlkd_cache.store.writer import STATS_KEY

log = logging.getLogger("rlkd.store")

EXPORT_SCHEMA = pa.schema(
    [
        ("seq_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("positions", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("target_logprobs", pa.list_(pa.float32())),
    ]
)


def summary(cache: Cache) -> dict[str, Any]:
    """The facts `rlkd inspect` shows."""
    m = cache.info
    totals = m.totals
    return {
        "path": str(cache.layout),
        "fingerprint": m.fingerprint,
        "teacher": m.teacher.name,
        "teacher_sha256": m.teacher.sha256,
        "tokenizer_sha256": m.tokenizer.sha256,
        "dataset": m.dataset.get("source"),
        "split": m.dataset.get("split"),
        "rows_as": m.dataset.get("shape"),
        "template": m.dataset.get("template"),
        "positions_mode": m.config.get("positions"),
        "backend": m.backend.name,
        "k": m.k,
        "vocab_size": m.vocab_size,
        "max_logprob_error": m.max_logprob_error,
        "shards": totals.shards,
        "rows": totals.rows,
        "positions": totals.positions,
        "tokens": totals.tokens,
        "bytes": totals.bytes,
        "bytes_per_position": round(totals.bytes_per_position, 2),
        "mean_topk_mass": round(totals.mean_topk_mass, 4),
        "skipped_rows": m.skipped,
        "truncated_rows": m.truncated,
        "created": m.created,
    }


def verify(path: str | Path, storage_options: StorageOptions | None = None) -> list[str]:
    """Problems found in a cache (empty if it is sound): the manifest against its digest
    (`Cache` refuses a mismatch; a manifest without one is a warning), its identity and the
    directory name; each shard's checksum, size, footer stats and decoding (each shard read
    once)."""
    cache = Cache(path, storage_options)
    layout = cache.layout
    problems = manifest_problems(cache)
    for index, entry in enumerate(cache.info.shards):
        shard = layout.file(entry.name)
        try:
            data = cache.shard_bytes(index, verify=False)
        except RlkdError as e:  # missing, or unreadable after retries
            problems.append(str(e))
            continue
        if len(data) != entry.bytes:
            problems.append(f"{shard}: {len(data)} bytes, manifest says {entry.bytes}")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            problems.append(f"{shard}: sha256 differs from the manifest (corrupt)")
            continue
        try:
            cache.read_shard(index, verify=False, data=data)
            problems += footer_problems(layout, entry, data)
        except RlkdError as e:
            problems.append(str(e))
    return problems


def manifest_problems(cache: Cache) -> list[str]:
    """What is wrong with a cache's manifest as a whole: a fingerprint that is not its
    identity's or not the directory's, no shards, totals that are not its shards' sums."""
    manifest = cache.layout.file(CacheDir.MANIFEST)
    info = cache.info
    if DIGEST_KEY not in cache.manifest:
        log.warning("warning: %s: no digest (written by an older rlkd): not checked", manifest)
    problems = []
    if fingerprint(info.identity) != info.fingerprint:
        problems.append(f"{manifest}: the fingerprint is not the sha256 of its identity")
    if not cache.layout.name.endswith(info.fingerprint[:16]):
        problems.append(
            f"{manifest}: fingerprint {info.fingerprint[:16]}... is not the directory's "
            f"({cache.layout.name})"
        )
    if not info.shards:
        problems.append(f"{manifest}: no shards")
    if cache.manifest.get("totals") != asdict(info.totals):
        problems.append(f"{manifest}: totals differ from the sums over its shards")
    return problems


def footer_problems(layout: CacheDir, entry: ShardEntry, data: bytes) -> list[str]:
    """Where a shard's footer stats (written with it; `data` is its bytes) differ from its
    manifest entry."""
    shard = layout.file(entry.name)
    try:
        stats = json.loads((pq.ParquetFile(io.BytesIO(data)).metadata.metadata or {})[STATS_KEY])
        written = {key: stats[key] for key in ("rows", "positions", "tokens", "topk_mass_sum")}
    except (KeyError, TypeError, ValueError) as e:
        return [f"{shard}: footer stats missing or corrupt ({e})"]
    differ = [key for key, value in written.items() if getattr(entry, key) != value]
    return [f"{shard}: {', '.join(differ)} differ from the footer's stats"] if differ else []


def list_caches(root: str | Path, storage_options: StorageOptions | None = None) -> list[str]:
    """One line per cache directory under `root` (complete or not)."""
    lines = []
    for layout in cache_dirs(root, storage_options):
        if layout.is_complete():
            try:
                s = summary(Cache(layout.files))
            except RlkdError as e:
                lines.append(f"{layout}  unreadable: {e}")
                continue
            lines.append(
                f"{layout}  teacher={s['teacher']} "
                f"data={Path(str(s['dataset'])).name}:{s['split']} "
                f"k={s['k']} rows={s['rows']} positions={s['positions']} "
                f"size={s['bytes'] / 2**20:.1f}MiB ({s['bytes_per_position']} B/pos)"
            )
        elif layout.is_started():
            done = len(layout.complete_shards())
            lines.append(
                f"{layout}  incomplete ({done} shards written; rerun `rlkd cache` to resume)"
            )
    return lines


def export(path: str | Path, out: str | Path, storage_options: StorageOptions | None = None) -> int:
    """Write the decoded cache as plain Parquet (EXPORT_SCHEMA) to the local file `out`;
    return the row count."""
    cache = Cache(path, storage_options)
    rows = 0
    with (
        atomic_path(Path(out)) as tmp,
        pq.ParquetWriter(tmp, EXPORT_SCHEMA, compression="zstd") as writer,
    ):
        for block in cache.blocks():
            writer.write_table(export_table(block))
            rows += len(block)
    return rows


def export_table(block: codec.Block) -> pa.Table:
    """A decoded block in the plain form of EXPORT_SCHEMA."""
    k = block.k
    n = int(block.pos_off[-1])
    inner = np.arange(n + 1, dtype=np.int32) * k
    outer = block.pos_off.astype(np.int32)
    arrays = [
        pa.array(block.seq_ids, pa.string()),
        pa.ListArray.from_arrays(
            pa.array(block.tok_off.astype(np.int32)), pa.array(block.input_ids)
        ),
        pa.ListArray.from_arrays(pa.array(outer), pa.array(block.positions)),
        pa.ListArray.from_arrays(
            pa.array(outer),
            pa.ListArray.from_arrays(pa.array(inner), pa.array(block.topk_ids.ravel())),
        ),
        pa.ListArray.from_arrays(
            pa.array(outer),
            pa.ListArray.from_arrays(pa.array(inner), pa.array(block.topk_logprobs.ravel())),
        ),
        pa.ListArray.from_arrays(pa.array(outer), pa.array(block.target_logprobs)),
    ]
    return pa.Table.from_arrays(arrays, schema=EXPORT_SCHEMA)


def render(info: dict[str, Any]) -> str:
    """Aligned `key: value` lines."""
    width = max(len(k) for k in info)
    return "\n".join(
        f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict) else v}" for k, v in info.items()
    )
