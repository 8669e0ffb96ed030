"""What `rlkd inspect`, `verify`, `ls` and `export` do, as library functions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.manifest import MANIFEST, file_sha256
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
    m = cache.manifest
    totals = m["totals"]
    return {
        "path": str(cache.dir),
        "fingerprint": m.get("fingerprint"),
        "teacher": m.get("teacher", {}).get("name"),
        "teacher_sha256": m.get("teacher", {}).get("sha256"),
        "tokenizer_sha256": m["tokenizer"].get("sha256"),
        "dataset": m.get("dataset", {}).get("source"),
        "split": m.get("dataset", {}).get("split"),
        "rows_as": m.get("dataset", {}).get("shape"),
        "template": m.get("dataset", {}).get("template"),
        "positions_mode": m.get("config", {}).get("positions"),
        "backend": m.get("backend", {}).get("name"),
        "k": m["k"],
        "vocab_size": m["vocab_size"],
        "max_logprob_error": m.get("max_logprob_error"),
        "shards": totals["shards"],
        "rows": totals["rows"],
        "positions": totals["positions"],
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "bytes_per_position": round(totals["bytes_per_position"], 2),
        "mean_topk_mass": round(totals["mean_topk_mass"], 4),
        "skipped_rows": m.get("skipped", {}),
        "truncated_rows": m.get("truncated", 0),
        "created": m.get("created"),
    }


def verify(path: str | Path) -> list[str]:
    """Problems found in a cache (empty if it is sound): checksums, sizes, decoding."""
    cache = Cache(path)
    problems = []
    for index, entry in enumerate(cache.shards):
        shard = cache.dir / entry["name"]
        if not shard.is_file():
            problems.append(f"{shard}: missing")
            continue
        if shard.stat().st_size != entry["bytes"]:
            problems.append(
                f"{shard}: {shard.stat().st_size} bytes, manifest says {entry['bytes']}"
            )
        if file_sha256(shard) != entry["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest (corrupt)")
            continue
        try:
            cache.read_shard(index, verify=False)
        except RlkdError as e:
            problems.append(str(e))
    return problems


def list_caches(root: str | Path) -> list[str]:
    """One line per cache directory under `root` (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    lines = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "models"):
        if (folder / MANIFEST).is_file():
            try:
                s = summary(Cache(folder))
            except RlkdError as e:
                lines.append(f"{folder}  unreadable: {e}")
                continue
            lines.append(
                f"{folder}  teacher={s['teacher']} "
                f"data={Path(str(s['dataset'])).name}:{s['split']} "
                f"k={s['k']} rows={s['rows']} positions={s['positions']} "
                f"size={s['bytes'] / 2**20:.1f}MiB ({s['bytes_per_position']} B/pos)"
            )
        elif any(folder.glob("shard-*.parquet")) or (folder / "plan.json").exists():
            done = len(list(folder.glob("shard-*.parquet")))
            lines.append(
                f"{folder}  incomplete ({done} shards written; rerun `rlkd cache` to resume)"
            )
    return lines


def export(path: str | Path, out: str | Path) -> int:
    """Write the decoded cache as plain Parquet (EXPORT_SCHEMA); return the row count."""
    cache = Cache(path)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, EXPORT_SCHEMA, compression="zstd") as writer:
        for block in cache.blocks():
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
                    pa.ListArray.from_arrays(
                        pa.array(inner), pa.array(block.topk_logprobs.ravel())
                    ),
                ),
                pa.ListArray.from_arrays(pa.array(outer), pa.array(block.target_logprobs)),
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=EXPORT_SCHEMA))
            rows += len(block)
    tmp.replace(out)
    return rows


def render(info: dict[str, Any]) -> str:
    """Aligned `key: value` lines."""
    width = max(len(k) for k in info)
    return "\n".join(
        f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict) else v}" for k, v in info.items()
    )
