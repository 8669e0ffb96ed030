"""A served teacher: `rlkd cache --backend server` on a real vLLM server against `--backend
vllm` in this machine's process, and the cost of parsing prompt log-prob JSON.

1. throughput: the real `rlkd cache` command (a fresh cache root per run) over the first
   `--rows` rows of the bundled sample in `--shards` shards at `--top-k`, rounds interleaved:
   - `--backend vllm` (the engine in the command's own process tree, eager mode),
   - `--backend server --concurrency C` for C in 1, 4, 16, against one `vllm serve` of the
     same teacher (eager, fp32) that this script started and keeps running.
   Reported: the scoring's tokens per second after the first shard (rlkd's "scored ..." log
   line; the first shard carries the in-process engine's start), and each server arm's ratio
   to the in-process one. Goal: >= 0.8 at the best concurrency. The server and the command
   share this machine's cores, as the in-process engine and its command do.
2. per position: one request at a time for a `--parse-tokens` token sequence at k = 1, 20
   and 64 (the round trip: mostly the server's work), and the client's share of a response
   at k = 20 and 64, timed over repeats: `parse_completion` (msgspec's typed decoding and
   the row rule: what rlkd runs) next to the standard library's `json.loads` of the same
   body alone, in microseconds per position, and the in-process backend's time per token
   from part 1.

    python benchmarks/served_teacher.py [--teacher tiny|smollm2] [--rows 160] [--shards 4]
        [--rounds 2] [--top-k 20]

`--teacher tiny` is the tests' 2-layer Llama (where HTTP and JSON weigh most); `smollm2` is
the embedded default teacher (SmolLM2-135M). Prints lines and, last, one JSON object.
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

from conftest import SAMPLE, VLLMServer, build_llama, build_tokenizer, free_port  # noqa: E402

RLKD = [sys.executable, "-m", "rlkd_cli.main"]
STEADY = re.compile(r"scored: \d+ shards, \d+ tokens in [\d.]+ s, (\d+) tokens/s \((\d+) tokens/s")
CONCURRENCY = (1, 4, 16)


def teacher_folder(which: str, work: Path) -> Path:
    if which == "tiny":
        return build_llama(work / "tiny", build_tokenizer())
    from rlkd_cache.default_teacher import default_teacher

    return default_teacher(Path.home() / ".cache" / "rlkd")


def steady_rate(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(tokens/s after the first shard, tokens/s of the whole scoring) of one `rlkd cache`."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    found = STEADY.search(proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return float(found.group(2)), float(found.group(1))


def throughput(teacher: Path, url: str, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    base = [
        *RLKD, "cache", "--model", str(teacher), "--dataset", str(SAMPLE),
        "--split", f"train[:{opts.rows}]", "--top-k", str(opts.top_k),
        "--num-shards-hint", str(opts.shards), "--no-progress",
    ]  # fmt: skip
    arms = {"vllm": ["--backend", "vllm", "--vllm-engine-kwargs", '{"enforce_eager": true}']}
    for c in CONCURRENCY:
        arms[f"server c{c}"] = ["--backend", "server", "--server-url", url, "--concurrency", str(c)]
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for r in range(opts.rounds):
        for name, more in arms.items():
            root = tempfile.mkdtemp(dir=work, prefix="root-")
            rates[name].append(steady_rate([*base, *more, "--cache-root", root], env))
            print(f"round {r + 1}: {name}: {rates[name][-1][0]:.0f} tok/s", flush=True)
    steady = {name: statistics.median(s for s, _ in v) for name, v in rates.items()}
    whole = {name: statistics.median(w for _, w in v) for name, v in rates.items()}
    return {
        "tokens_per_s_after_first_shard": steady,
        "tokens_per_s_whole_scoring": whole,
        "server_over_vllm": {n: steady[n] / steady["vllm"] for n in steady if n != "vllm"},
    }


def parsing(teacher: Path, url: str, tokens: int, repeats: int) -> dict[str, Any]:
    import httpx
    import numpy as np

    from rlkd_cache.data import Sequence
    from rlkd_cache.teacher.server import parse_completion, request_body

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    text = "\n".join(r["prompt"] + "\n" + r["response"] for r in rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    seq = Sequence("p", np.asarray(ids, dtype=np.int32), np.arange(len(ids) - 1))
    out: dict[str, Any] = {}
    per = 1e6 / len(seq.positions)
    for k in (1, 20, 64):  # one request at a time: the server's time per position, by k
        body = request_body("teacher", ids, k)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            content = httpx.post(f"{url}/completions", json=body, timeout=600).content
            walls.append(time.perf_counter() - t0)
        us = out[f"request_us_per_position_k{k}"] = statistics.median(walls) * per
        print(f"k={k}: one request {us:.1f} us/position", flush=True)
    for k in (20, 64):  # the client's share: decoding and the row rule, on one real body
        body = request_body("teacher", ids, k)
        content = httpx.post(f"{url}/completions", json=body, timeout=600).content
        stdlib, ours = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            json.loads(content)  # the plain decoder, for comparison: not used by rlkd
            t1 = time.perf_counter()
            parse_completion(content, seq, k, len(tokenizer), url)  # what rlkd runs
            stdlib.append(t1 - t0)
            ours.append(time.perf_counter() - t1)
        out[f"k{k}"] = {
            "body_bytes": len(content),
            "bytes_per_position": len(content) / len(seq.positions),
            "json_loads_us_per_position": statistics.median(stdlib) * per,
            "parse_completion_us_per_position": statistics.median(ours) * per,
        }
        print(f"k={k}: {out[f'k{k}']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--parse-tokens", type=int, default=512)
    parser.add_argument("--parse-repeats", type=int, default=20)
    parser.add_argument("--skip-throughput", action="store_true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlkd-served-") as tmp:
        work = Path(tmp)
        teacher = teacher_folder(opts.teacher, work)
        server = VLLMServer(teacher, free_port(), work / "vllm.log", "--max-logprobs", "64")
        try:
            server.wait_ready()
            result: dict[str, Any] = {"teacher": opts.teacher, "rows": opts.rows, "k": opts.top_k}
            if not opts.skip_throughput:
                result["throughput"] = throughput(teacher, server.url, opts, work)
                vllm = result["throughput"]["tokens_per_s_after_first_shard"]["vllm"]
                result["vllm_us_per_token"] = 1e6 / vllm
            result["parsing"] = parsing(teacher, server.url, opts.parse_tokens, opts.parse_repeats)
        finally:
            server.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
