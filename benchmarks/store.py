"""Store benchmark: bytes per position, largest log-prob error, encode and decode speed.

Runs the embedded default teacher (SmolLM2-135M-Instruct, fp32, transformers backend) once
over the bundled sample (chat-rendered prompt + response, every position distilled) at k=64,
then for k in {5, 20, 64} writes one shard with our codec and one with the naive baseline
(Parquet list<int32> ids + list<float16> log-probs, zstd), side by side in this run.
Decode is measured from disk to numpy arrays on one core (pyarrow limited to one thread),
through the reader's path (`decode_shard`: page checksums and content CRC checked).

    python benchmarks/store.py [--rows 360] [--cache-root DIR]

Prints a line per k and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rlkd_cache.cache import to_block
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import load_rows, prepare
from rlkd_cache.default_teacher import default_teacher
from rlkd_cache.store import codec
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import decode_shard
from rlkd_cache.store.writer import write_shard
from rlkd_cache.teacher.hf import HFTeacher
from rlkd_cache.train.batching import plan_window

FIELDS = codec.ARRAYS


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def naive_bytes(block: codec.Block) -> tuple[int, float]:
    """Size and decode seconds of the naive layout: ids list<int32>, log-probs list<float16>."""
    n, k = block.topk_ids.shape
    offs = pa.array((block.pos_off * k).astype(np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(
                pa.array(block.tok_off.astype(np.int32)), pa.array(block.input_ids)
            ),
            "topk_ids": pa.ListArray.from_arrays(offs, pa.array(block.topk_ids.ravel())),
            "topk_logprobs": pa.ListArray.from_arrays(
                offs, pa.array(block.topk_logprobs.ravel().astype(np.float16))
            ),
            "target_logprobs": pa.ListArray.from_arrays(
                pa.array(block.pos_off.astype(np.int32)),
                pa.array(block.target_logprobs.astype(np.float16)),
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()

    def decode():
        t = pq.read_table(io.BytesIO(data))
        t.column("topk_ids").combine_chunks().values.to_numpy().reshape(n, k)
        t.column("topk_logprobs").combine_chunks().values.to_numpy().astype(np.float32)

    return len(data), best_of(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=360)
    parser.add_argument("--cache-root", default=CacheConfig().cache_root)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model = default_teacher(args.cache_root)
    from transformers import AutoTokenizer

    cfg = CacheConfig(model=str(model), split=f"train[:{args.rows}]", top_k=64)
    prepared = prepare(load_rows(None, cfg.split), AutoTokenizer.from_pretrained(model), cfg)
    saved = Path(args.cache_root) / f"bench-store-teacher-{args.rows}.npz"
    if saved.is_file():  # the teacher's fp32 output from an earlier run of this benchmark
        z = np.load(saved)
        full = codec.Block([s.seq_id for s in prepared.sequences], *(z[f] for f in FIELDS))
        teacher_s = float(z["teacher_s"])
    else:
        teacher = HFTeacher(model)
        outputs = {}
        lengths = [len(s.input_ids) for s in prepared.sequences]
        t0 = time.perf_counter()
        for batch in plan_window(np.array(lengths), 4096):
            seqs = [prepared.sequences[i] for i in batch]
            for i, out in zip(batch, teacher.score(seqs, 64), strict=True):
                outputs[i] = out
        teacher_s = time.perf_counter() - t0
        full = to_block(prepared, range(len(prepared.sequences)), outputs)
        np.savez(saved, teacher_s=teacher_s, **{f: getattr(full, f) for f in FIELDS})
    positions = int(full.pos_off[-1])
    print(f"teacher: {positions} positions from {len(full)} rows in {teacher_s:.0f} s")

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        layout = CacheDir(tmp)
        for k in (5, 20, 64):
            block = codec.Block(
                full.seq_ids,
                full.input_ids,
                full.tok_off,
                full.positions,
                full.pos_off,
                np.ascontiguousarray(full.topk_ids[:, :k]),
                np.ascontiguousarray(full.topk_logprobs[:, :k]),
                full.target_logprobs,
            )
            encode_s = best_of(partial(write_shard, layout, k, block, cfg.logprob_step), repeats=2)
            name = layout.shard_name(k)
            size = layout.size(name)
            decoded = decode_shard(layout, name)  # page checksums and content CRC checked
            decode_s = best_of(partial(decode_shard, layout, name))
            assert np.array_equal(decoded.topk_ids, block.topk_ids)
            err = max(
                np.abs(decoded.topk_logprobs - block.topk_logprobs).max(),
                np.abs(decoded.target_logprobs - block.target_logprobs).max(),
            )
            naive_size, naive_decode_s = naive_bytes(block)
            results[k] = {
                "bytes_per_position": round(size / positions, 2),
                "naive_bytes_per_position": round(naive_size / positions, 2),
                "size_ratio_vs_naive": round(size / naive_size, 3),
                "max_logprob_error": float(err),
                "encode_positions_per_s": round(positions / encode_s),
                "decode_positions_per_s": round(positions / decode_s),
                "naive_decode_positions_per_s": round(positions / naive_decode_s),
            }
            r = results[k]
            print(
                f"k={k:3d}: {r['bytes_per_position']:6.2f} B/pos "
                f"(naive {r['naive_bytes_per_position']:6.2f}, x{r['size_ratio_vs_naive']}), "
                f"max err {err:.5f} nat, encode {r['encode_positions_per_s']:,} pos/s, "
                f"decode {r['decode_positions_per_s']:,} pos/s "
                f"(naive {r['naive_decode_positions_per_s']:,})"
            )
    print(
        json.dumps(
            {
                "benchmark": "store",
                "teacher": model.name,
                "positions": positions,
                "rows": len(full),
                "logprob_step": cfg.logprob_step,
                "goal_k20_bytes_per_position_max": 40,
                "goal_decode_positions_per_s_min": 1_000_000,
                "results": {f"k{k}": v for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
