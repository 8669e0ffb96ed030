"""What `rlkd inspect`, `verify`, `ls` and `export` do, as library functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.atomic import atomic_path
from rlkd_cache.store.layout import cache_dirs
from rlkd_cache.store.reader import Cache

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
        "path": str(cache.dir),
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


def verify(path: str | Path) -> list[str]:
    """Problems found in a cache (empty if it is sound): checksums, sizes, decoding."""
    cache = Cache(path)
    layout = cache.layout
    problems = []
    for index, entry in enumerate(cache.info.shards):
        shard = layout.file(entry.name)
        if not layout.has(entry.name):
            problems.append(f"{shard}: missing")
            continue
        size = layout.size(entry.name)
        if size != entry.bytes:
            problems.append(f"{shard}: {size} bytes, manifest says {entry.bytes}")
        if layout.sha256(entry.name) != entry.sha256:
            problems.append(f"{shard}: sha256 differs from the manifest (corrupt)")
            continue
        try:
            cache.read_shard(index, verify=False)
        except RlkdError as e:
            problems.append(str(e))
    return problems


def list_caches(root: str | Path) -> list[str]:
    """One line per cache directory under `root` (complete or not)."""
    lines = []
    for layout in cache_dirs(root):
        if layout.is_complete():
            try:
                s = summary(Cache(layout.path))
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


def export(path: str | Path, out: str | Path) -> int:
    """Write the decoded cache as plain Parquet (EXPORT_SCHEMA); return the row count."""
    cache = Cache(path)
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
