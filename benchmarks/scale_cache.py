"""Caching at scale: `rlkd cache --ray` against one process, and peak memory at 10x the data.

Everything runs the real `rlkd cache` command (a fresh cache root per run, so every run
scores every shard), side by side in one invocation, rounds interleaved:

1. throughput: the embedded default teacher (SmolLM2-135M, converted once) over the first
   `--rows` rows of the bundled sample in `--shards` shards, as
   - one process with one thread (`OMP_NUM_THREADS=1`),
   - `--ray --replicas 1` (a local Ray started by rlkd; one CPU and one thread per replica),
   - `--ray --replicas 2`.
   Reported: tokens per second of the whole command (Ray's start included) and of its scoring
   phase (rlkd's log lines: "scored ..." / "Ray: ..."; both include the teacher's load), and
   their ratios to the single process. Goals: replicas 1 / single >= 0.9; replicas 2 / 1 is
   the scaling on this machine (2 cores: at most 2x, less when anything else runs).
2. peak RSS (the child's `ru_maxrss` from `wait4`) of `rlkd cache` with the tiny test teacher
   on `--rss-rows` rows and on 10x as many (the sample's rows repeated with fresh ids), next
   to the in-memory tokenization the cache stage did before it streamed (`data.prepare`, in a
   child of its own). Goal: the 10x run needs <= 1.2x the memory.

    python benchmarks/scale_cache.py [--rows 120] [--shards 8] [--rounds 2] [--rss-rows 3000]

Prints human-readable lines and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import SAMPLE, build_llama, build_tokenizer  # noqa: E402  (the tests' tiny models)
from rlkd_cache.default_teacher import default_teacher  # noqa: E402

RLKD = [sys.executable, "-m", "rlkd_cli.main"]
SCORED = re.compile(
    r"(?:scored|Ray): \d+ shards, (\d+) tokens in ([\d.]+) s, \d+ tokens/s \((\d+) tokens/s after"
)


def run(args: list[str], env: dict[str, str]) -> tuple[float, int, str, str]:
    """Run a command; its wall seconds, peak RSS (bytes), stderr and last stdout line (for
    `rlkd cache`, the cache directory). Fails loudly."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        out.seek(0)
        text, last = err.read(), (out.read().splitlines() or [""])[-1]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{text[-3000:]}")
    return wall, usage.ru_maxrss * 1024, text, last


def throughput(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    teacher = default_teacher(work / "home")
    base = [
        *RLKD,
        "cache",
        "--model",
        str(teacher),
        "--dataset",
        str(SAMPLE),
        "--split",
        f"train[:{args.rows}]",
        "--num-shards-hint",
        str(args.shards),
        "--no-progress",
    ]
    arms = {
        "single": [],
        "ray_1": ["--ray", "--replicas", "1"],
        "ray_2": ["--ray", "--replicas", "2"],
    }
    caches: dict[str, str] = {}
    walls: dict[str, list[float]] = {a: [] for a in arms}
    scoring: dict[str, list[float]] = {a: [] for a in arms}
    steady: dict[str, list[float]] = {a: [] for a in arms}
    tokens = 0
    for round_ in range(args.rounds):
        order = list(arms)[round_ % len(arms) :] + list(arms)[: round_ % len(arms)]
        for arm in order:
            root = work / f"{arm}-{round_}"
            wall, _, log, caches[arm] = run([*base, *arms[arm], "--cache-root", str(root)], env)
            found = SCORED.search(log)
            if found is None:
                raise SystemExit(f"{arm}: no scoring line in its log:\n{log[-2000:]}")
            tokens = int(found.group(1))
            walls[arm].append(wall)
            scoring[arm].append(float(found.group(2)))
            steady[arm].append(float(found.group(3)))
            print(
                f"round {round_} {arm}: {wall:.1f} s wall, scoring {found.group(2)} s, "
                f"{found.group(3)} tokens/s after the first shard",
                flush=True,
            )
    two_threads = ["--cache-root", str(work / "single-2-threads")]
    *_, caches["single_2_threads"] = run([*base, *two_threads], {**env, "OMP_NUM_THREADS": "2"})
    wall = {a: statistics.median(v) for a, v in walls.items()}
    score = {a: statistics.median(v) for a, v in scoring.items()}
    after = {a: statistics.median(v) for a, v in steady.items()}
    return {
        "tokens": tokens,
        "wall_s": wall,
        "scoring_s": score,
        "tokens_per_s_wall": {a: tokens / s for a, s in wall.items()},
        "tokens_per_s_scoring": {a: tokens / s for a, s in score.items()},
        "ray1_over_single_wall": wall["single"] / wall["ray_1"],
        "ray1_over_single_scoring": score["single"] / score["ray_1"],
        "ray2_over_ray1_wall": wall["ray_1"] / wall["ray_2"],
        "ray2_over_ray1_scoring": score["ray_1"] / score["ray_2"],
        "tokens_per_s_after_first_shard": after,
        "ray1_over_single_after_first_shard": after["ray_1"] / after["single"],
        "ray2_over_ray1_after_first_shard": after["ray_2"] / after["ray_1"],
        "same_as_single": {a: same(caches["single"], m, work) for a, m in caches.items()},
    }


def same(a: str, b: str, work: Path) -> dict[str, Any]:
    """How two caches differ: directory name, shard sha256s, and in their exports, top-k ids
    and stored log-probs (in quantization steps)."""
    import numpy as np
    import pyarrow.parquet as pq

    from rlkd_cache.store.reader import Cache
    from rlkd_cache.store.tools import export

    cols = {}
    for label, path in (("a", a), ("b", b)):
        out = work / f"export-{label}-{abs(hash(path))}.parquet"
        export(path, out)
        table = pq.read_table(out)
        cols[label] = {
            c: np.concatenate([np.asarray(x).ravel() for x in table[c].to_pylist()])
            for c in ("topk_ids", "topk_logprobs", "target_logprobs")
        }
    step = Cache(a).info.logprob_step
    shas = [[s.sha256 for s in Cache(path).info.shards] for path in (a, b)]
    return {
        "same_name": Path(a).name == Path(b).name,
        "same_shard_sha256": shas[0] == shas[1],
        "topk_ids_differing": int((cols["a"]["topk_ids"] != cols["b"]["topk_ids"]).sum()),
        "values": int(cols["a"]["topk_ids"].size),
        "max_logprob_diff_steps": max(
            float(np.abs(cols["a"][c] - cols["b"][c]).max()) / step
            for c in ("topk_logprobs", "target_logprobs")
        ),
    }


def dataset(rows: int, path: Path) -> Path:
    """`rows` prompt/response rows: the sample's, repeated with fresh ids."""
    sample = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    with path.open("w") as out:
        for i in range(rows):
            row = dict(sample[i % len(sample)])
            row["id"] = f"r{i}"
            out.write(json.dumps(row) + "\n")
    return path


IN_MEMORY = """
import sys
from transformers import AutoTokenizer
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import load_rows, prepare
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prepared = prepare(load_rows(sys.argv[2], "train"), tokenizer, CacheConfig())
print(len(prepared.sequences))
"""


def peak_memory(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    teacher = build_llama(work / "tiny-teacher", build_tokenizer())
    out: dict[str, Any] = {}
    for label, rows in (("1x", args.rss_rows), ("10x", 10 * args.rss_rows)):
        data = dataset(rows, work / f"rows-{rows}.jsonl")
        run_env = {**env, "HF_DATASETS_CACHE": str(work / f"datasets-{label}")}
        cache = [
            *RLKD,
            "cache",
            "--model",
            str(teacher),
            "--dataset",
            str(data),
            "--top-k",
            "8",
            "--no-progress",
            "--cache-root",
            str(work / f"rss-{label}"),
        ]
        _, rss, *_ = run(cache, run_env)
        _, old, *_ = run([sys.executable, "-c", IN_MEMORY, str(teacher), str(data)], run_env)
        out[label] = {
            "rows": rows,
            "rlkd_cache_rss_mib": rss / 2**20,
            "in_memory_rss_mib": old / 2**20,
        }
        print(
            f"{label} ({rows} rows): rlkd cache peak RSS {rss / 2**20:.0f} MiB; "
            f"in-memory tokenization alone {old / 2**20:.0f} MiB",
            flush=True,
        )
    out["rlkd_cache_10x_over_1x"] = (
        out["10x"]["rlkd_cache_rss_mib"] / out["1x"]["rlkd_cache_rss_mib"]
    )
    out["in_memory_10x_over_1x"] = out["10x"]["in_memory_rss_mib"] / out["1x"]["in_memory_rss_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rss-rows", type=int, default=3000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result: dict[str, Any] = {"rows": args.rows, "shards": args.shards, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="rlkd-bench-scale-") as tmp:
        work = Path(tmp)
        if not args.skip_memory:
            m = result["memory"] = peak_memory(args, work, env)
            print(
                f"peak RSS 10x / 1x: rlkd cache {m['rlkd_cache_10x_over_1x']:.2f} "
                f"(goal <= 1.2), in-memory tokenization {m['in_memory_10x_over_1x']:.2f}",
                flush=True,
            )
        if not args.skip_throughput:
            t = result["throughput"] = throughput(args, work, env)
            rate = t["tokens_per_s_wall"]
            print(
                f"{t['tokens']} tokens; tokens/s (whole command) single {rate['single']:.0f}, "
                f"ray 1 {rate['ray_1']:.0f}, ray 2 {rate['ray_2']:.0f}\n"
                f"ray 1 / single: {t['ray1_over_single_wall']:.2f} whole command, "
                f"{t['ray1_over_single_scoring']:.2f} scoring (goal >= 0.9); "
                f"ray 2 / ray 1: {t['ray2_over_ray1_wall']:.2f} whole command, "
                f"{t['ray2_over_ray1_scoring']:.2f} scoring\n"
                "after the first shard: ray 1 / single "
                f"{t['ray1_over_single_after_first_shard']:.2f}, ray 2 / ray 1 "
                f"{t['ray2_over_ray1_after_first_shard']:.2f}",
                flush=True,
            )
            for arm, diff in t["same_as_single"].items():
                print(f"{arm} vs single (1 thread): {diff}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
