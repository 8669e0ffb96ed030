"""Loader benchmark: distilled positions per second that the reader delivers as ready tensors.

Builds (or reuses: caches are content-addressed) a cache of the embedded default teacher
(SmolLM2-135M-Instruct) over the first rows of the bundled sample at k=20, then times
`CacheStream` + `TokenBatcher` over several epochs: every shard read, sha256-checked and
decoded, rows shuffled, bucketed, and collated into `Batch` tensors, in this one process.
The training step must consume positions at most 1/20 as fast (issue 4's goal); pass its
figure with `--train-positions-per-s` to print the ratio.

    python benchmarks/loader.py [--cache-root DIR] [--rows 120] [--epochs 20]
        [--batch-tokens 4096] [--train-positions-per-s X]

Prints human-readable lines and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import TokenBatcher
from rlkd_cache.train.stream import CacheStream

GOAL_RATIO = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-root", default=CacheConfig().cache_root)
    parser.add_argument("--rows", type=int, default=120, help="sample rows to cache")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--train-positions-per-s", type=float, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    cfg = CacheConfig(cache_root=args.cache_root, top_k=args.top_k, split=f"train[:{args.rows}]")
    cache = Cache(run_cache(cfg, progress=False))
    totals = cache.info.totals
    print(
        f"cache {cache.layout} ({time.perf_counter() - started:.1f} s to build or find): "
        f"{totals.rows} rows, {totals.positions} positions, {totals.shards} shard(s), "
        f"k={cache.k}"
    )

    stream = CacheStream(cache, seed=0)
    batcher = TokenBatcher(stream, batch_tokens=args.batch_tokens)
    positions = tokens = batches = 0
    t0 = time.perf_counter()
    for batch in batcher.batches(epochs=args.epochs):
        positions += batch.n_positions
        tokens += batch.n_tokens
        batches += 1
    seconds = time.perf_counter() - t0
    rate = positions / seconds
    print(
        f"{args.epochs} epochs, {batches} batches of <= {args.batch_tokens} tokens: "
        f"{positions} positions in {seconds:.3f} s = {rate:,.0f} positions/s "
        f"({tokens / seconds:,.0f} tokens/s, {1e3 * seconds / batches:.2f} ms/batch)"
    )
    plain = TokenBatcher(
        CacheStream(cache, seed=0), batch_tokens=args.batch_tokens, bucketing=False
    )
    for _ in plain.batches(epochs=1):
        pass
    print(
        f"padding fraction {batcher.padding.fraction():.4f} with length bucketing, "
        f"{plain.padding.fraction():.4f} without"
    )
    result = {
        "benchmark": "loader",
        "positions_per_s": round(rate),
        "tokens_per_s": round(tokens / seconds),
        "padding_fraction": round(batcher.padding.fraction(), 4),
        "padding_fraction_no_bucketing": round(plain.padding.fraction(), 4),
        "batch_tokens": args.batch_tokens,
        "k": cache.k,
        "epochs": args.epochs,
        "batches": batches,
        "positions": positions,
        "seconds": round(seconds, 3),
        "cache_positions": totals.positions,
        "cache_shards": totals.shards,
    }
    if args.train_positions_per_s:
        ratio = rate / args.train_positions_per_s
        verdict = "meets" if ratio >= GOAL_RATIO else "misses"
        print(f"loader / train step = {ratio:.1f}x ({verdict} the {GOAL_RATIO:.0f}x goal)")
        result["train_positions_per_s"] = args.train_positions_per_s
        result["loader_over_train"] = round(ratio, 2)
        result["goal_ratio"] = GOAL_RATIO
        result["meets_goal"] = ratio >= GOAL_RATIO
    print(json.dumps(result))


if __name__ == "__main__":
    main()
