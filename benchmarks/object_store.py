"""Object-store benchmark: reading a cache from S3 while training, and `rlkd copy` to S3.

Starts a real S3-compatible server on loopback (moto's server mode, as the tests do; or give
`--endpoint` of another), builds a k=20 cache of the embedded default teacher over the first
`--rows` rows of the bundled sample (under the cache root's `bench-object-store/`, once),
tiles its rows into `--shards` shards of the default size (262,144 positions, ~5 MB: what
`rlkd cache` writes; `bench-object-store-tiled/`), and measures, in this one process, side
by side, rounds interleaved with the order rotated:

- loader: distilled positions per second that `rlkd train`'s reader (`CacheStream` +
  `TokenBatcher`) delivers as ready tensors, from local disk, from S3 with the default
  prefetch (2 shards) and from S3 without prefetch; every read sha256-checked and decoded;
- train: positions per second that `rlkd train`'s step (`train_step` + `optimizer_step`,
  default loss) consumes on the demo's 4-layer student at the demo's 2,048-token batches;
  the goal is loader (S3) >= 20x train;
- copy: MB/s of `rlkd copy` (read, sha256 check, PUT each shard, manifest last) of the cache
  to a fresh S3 prefix, next to a plain s3fs `put` of the same files.

Loopback S3 (moto, a Python server) is slower than a real store's per-request throughput but
has no network latency; the figures bound rlkd's own overhead, not a data centre's.

    python benchmarks/object_store.py [--rows 120] [--shards 4] [--rounds 3] [--epochs 1]
        [--train-steps 4] [--endpoint URL]

Prints human-readable lines and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import moto_server  # noqa: E402  (the tests' server fixture)
from rlkd_cache.cache import run_cache  # noqa: E402
from rlkd_cache.config import CacheConfig, TrainConfig, default_cache_root  # noqa: E402
from rlkd_cache.default_teacher import default_teacher  # noqa: E402
from rlkd_cache.plan import POSITIONS_PER_SHARD  # noqa: E402
from rlkd_cache.store import codec  # noqa: E402
from rlkd_cache.store.copy import copy  # noqa: E402
from rlkd_cache.store.layout import CacheDir  # noqa: E402
from rlkd_cache.store.manifest import Manifest  # noqa: E402
from rlkd_cache.store.reader import Cache, split_rows  # noqa: E402
from rlkd_cache.store.writer import CacheWriter  # noqa: E402
from rlkd_cache.train.batching import TokenBatcher  # noqa: E402
from rlkd_cache.train.step import StepSettings, optimizer_step, train_step  # noqa: E402
from rlkd_cache.train.stream import CacheStream  # noqa: E402
from rlkd_cache.train.student_init import shallow_student  # noqa: E402

GOAL_RATIO = 20.0
DEMO_LAYERS = [0, 10, 20, 29]


def tiled_cache(small: Cache, root: Path, shards: int) -> Path:
    """A cache of `shards` shards of about `POSITIONS_PER_SHARD` positions each (the default
    shard size), made of `small`'s rows repeated, each repetition with its token ids relabelled
    by a random permutation of the vocabulary (so zstd finds no repeats and a shard takes the
    bytes a real one does), with `small`'s manifest otherwise (same name under `root`): real
    shard sizes without hours of teacher time."""
    folder = root / small.layout.name
    if (folder / CacheDir.MANIFEST).is_file():
        return folder
    rows = [row for block in small.blocks() for row in split_rows(block)]
    per_shard = math.ceil(POSITIONS_PER_SHARD / sum(len(r.positions) for r in rows))
    manifest = Manifest.from_json(small.manifest, Path(str(small.layout)))
    rng = np.random.default_rng(0)
    with CacheWriter(CacheDir(folder), small.info.logprob_step) as writer:
        for index in range(shards):
            perms = [rng.permutation(small.vocab_size).astype(np.int32) for _ in range(per_shard)]
            tiled = [(p, r) for p in perms for r in rows]
            block = codec.Block.from_sequences(
                [f"{r.seq_id}.{index}.{i}" for i, (_, r) in enumerate(tiled)],
                [p[r.input_ids] for p, r in tiled],
                [r.positions for _, r in tiled],
                [p[r.topk_ids] for p, r in tiled],
                [r.topk_logprobs for _, r in tiled],
                [r.target_logprobs for _, r in tiled],
            )
            writer.submit(index, block)
        writer.finish(dataclasses.replace(manifest, shards=()))
    return folder


def loader_rate(cache: Cache, prefetch: int, epochs: int, batch_tokens: int) -> float:
    """Positions per second of the reader + batcher over `epochs` epochs."""
    stream = CacheStream(cache, seed=0, prefetch=prefetch)
    batcher = TokenBatcher(stream, batch_tokens=batch_tokens)
    positions, t0 = 0, time.perf_counter()
    for batch in batcher.batches(epochs=epochs):
        positions += batch.n_positions
    return positions / (time.perf_counter() - t0)


def train_rate(cache: Cache, student: Path, steps: int, batch_tokens: int) -> float:
    """Positions per second of `rlkd train`'s step (after one warmup step)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    cfg = TrainConfig(cache="x", student="x", output="x")
    settings = StepSettings.of(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batcher = TokenBatcher(CacheStream(cache, seed=0), batch_tokens=batch_tokens)
    batches = [b for _, b in zip(range(steps + 1), batcher.batches(None), strict=False)]
    positions, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, [batch], settings, scaler)
        optimizer_step(model, optimizer, scaler, None, cfg.clip)
        if i:  # the first step is warmup
            seconds += time.perf_counter() - t0
            positions += batch.n_positions
    return positions / seconds


def copy_rates(local: Path, fs: Any, bucket: str, rounds: int) -> dict[str, list[float]]:
    """MB/s of `rlkd copy` and of a plain s3fs put of the same files, interleaved."""
    layout = Cache(local).layout
    names = [entry.name for entry in Cache(local).info.shards] + [CacheDir.MANIFEST]
    files = [Path(layout.file(name)) for name in names]  # what `rlkd copy` sends
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    rates: dict[str, list[float]] = {"rlkd copy": [], "s3fs put": []}
    for r in range(rounds):
        order = ["rlkd copy", "s3fs put"][:: 1 if r % 2 == 0 else -1]
        for name in order:
            prefix = f"{bucket}/copy-{r}-{name.split()[0]}"
            t0 = time.perf_counter()
            if name == "rlkd copy":
                copy(local, f"s3://{prefix}", progress=False)
            else:
                fs.put([str(p) for p in files], f"{prefix}/{local.name}/")
            rates[name].append(megabytes / (time.perf_counter() - t0))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--shards", type=int, default=4, help="of the default size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint instead of moto")
    parser.add_argument("--cache-root", default=default_cache_root(), help="for the teacher")
    args = parser.parse_args()
    torch.set_num_threads(2)

    teacher = default_teacher(args.cache_root)
    work = Path(tempfile.mkdtemp(prefix="rlkd-bench-s3-"))
    cfg = CacheConfig(
        model=str(teacher),
        cache_root=str(Path(args.cache_root) / "bench-object-store"),
        top_k=20,
        split=f"train[:{args.rows}]",
    )
    small = Cache(run_cache(cfg, progress=False))
    local = tiled_cache(small, Path(args.cache_root) / "bench-object-store-tiled", args.shards)
    student = shallow_student(teacher, DEMO_LAYERS, work / "student")
    server = contextlib.nullcontext() if args.endpoint else moto_server()
    with server:
        import s3fs

        options = {"endpoint_url": args.endpoint} if args.endpoint else {}
        fs = s3fs.S3FileSystem(use_listings_cache=False, **options)
        bucket = f"rlkd-bench-{int(time.time())}"
        fs.mkdir(bucket)
        storage = {"s3": options}
        remote_url = copy(local, f"s3://{bucket}/caches", storage, progress=False)
        local_cache, remote = Cache(local), Cache(str(remote_url), storage)
        t = local_cache.info.totals
        print(
            f"cache {local}: {t.rows} rows, {t.positions} positions, {t.shards} shards, "
            f"{t.bytes / 1e6:.2f} MB"
        )
        variants = {
            "local": (local_cache, 2),
            "s3": (remote, 2),
            "s3, no prefetch": (remote, 0),
        }
        loader: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            names = list(variants)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                cache, prefetch = variants[name]
                rate = loader_rate(cache, prefetch, args.epochs, args.batch_tokens)
                loader[name].append(rate)
        trained = train_rate(remote, student, args.train_steps, args.batch_tokens)
        copies = copy_rates(local, fs, bucket, args.rounds)

    med = {name: statistics.median(rates) for name, rates in loader.items()}
    for name, rate in med.items():
        print(f"loader {name:16s} {rate:12,.0f} positions/s (median of {args.rounds})")
    print(f"train step (demo student, {args.batch_tokens} tokens) {trained:10,.0f} positions/s")
    ratio = med["s3"] / trained
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    print(f"loader from S3 / train step = {ratio:.1f}x ({verdict} the {GOAL_RATIO:.0f}x goal)")
    print(
        f"loader S3 / local = {med['s3'] / med['local']:.2f}; "
        f"S3 prefetch 2 / none = {med['s3'] / med['s3, no prefetch']:.2f}"
    )
    cmed = {name: statistics.median(rates) for name, rates in copies.items()}
    for name, rate in cmed.items():
        print(f"{name:10s} {rate:8.2f} MB/s (median of {args.rounds})")
    print(f"rlkd copy / s3fs put = {cmed['rlkd copy'] / cmed['s3fs put']:.2f}")
    print(
        json.dumps(
            {
                "benchmark": "object_store",
                "loader_positions_per_s": {k: round(v) for k, v in med.items()},
                "train_positions_per_s": round(trained),
                "s3_loader_over_train": round(ratio, 2),
                "s3_over_local": round(med["s3"] / med["local"], 3),
                "prefetch_speedup": round(med["s3"] / med["s3, no prefetch"], 3),
                "copy_mb_per_s": {k: round(v, 2) for k, v in cmed.items()},
                "copy_over_put": round(cmed["rlkd copy"] / cmed["s3fs put"], 3),
                "goal_ratio": GOAL_RATIO,
                "meets_goal": ratio >= GOAL_RATIO,
                "rows": t.rows,
                "shards": t.shards,
                "positions": t.positions,
                "rounds": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
