"""Teacher throughput: the full `rlkd cache` path vs a bare loop of the same backend.

For each backend (vllm, hf, or both): start it once (engine start timed on its own), warm
it up, then time on the same token sequences
  - bare:  the backend library alone, batch by batch over the same token-budget batches
           (vLLM: `llm.generate(prompts, SamplingParams(prompt_logprobs=k, max_tokens=1))`;
           transformers: forward + log_softmax + topk),
  - cache: `run_cache` end to end (load and tokenize the data, score, encode, write shards
           and manifest) with the already-started backend; the default teacher is converted
           and hashed beforehand, so neither one-time step is timed.
Passes alternate (bare, cache, per backend, per round) for `--repeat` rounds and each keeps
its best, which filters out other processes' bursts on a shared machine. Prints readable
lines, then one JSON object as the last line. Goal: cache/bare >= 0.90.

    python benchmarks/cache_throughput.py --backend both --rows 48 --k 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ROOT = "/tmp/rlkdroot"


def cpu_seconds() -> float:
    """CPU time used so far by this process and its live children (vLLM's engine and
    worker processes): tokens per CPU-second is a figure other processes disturb little."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    try:
        import psutil  # a vLLM dependency; without it only this process is counted
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def bare_vllm(teacher: Any, batches: list[list[list[int]]], k: int) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(prompt_logprobs=k, max_tokens=1)
    for batch in batches:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
        teacher.llm.generate(prompts, params, use_tqdm=False)


def bare_hf(teacher: Any, batches: list[list[list[int]]], k: int) -> None:
    import torch

    with torch.inference_mode():
        for batch in batches:
            longest = max(len(ids) for ids in batch)
            ids = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros_like(ids)
            for b, seq in enumerate(batch):
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            logits = teacher.model(
                input_ids=ids.to(teacher.device), attention_mask=mask.to(teacher.device)
            ).logits  # (B, T, V)
            torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # (B, T, k)


@dataclass
class Run:
    """One backend under test: its started teacher, config, inputs and best figures."""

    backend: str
    teacher: Any
    cfg: Any
    batches: list[list[list[int]]]
    tokens: int
    start_s: float
    best_bare: float = 0.0
    best_cache: float = 0.0
    best_cache_per_cpu_s: float = 0.0


def start(backend: str, args: argparse.Namespace, model: Path) -> Run:
    import numpy as np
    from transformers import AutoTokenizer

    from rlkd_cache.config import CacheConfig
    from rlkd_cache.data import load_rows, prepare
    from rlkd_cache.store.fingerprint import folder_sha256
    from rlkd_cache.teacher.select import make_backend
    from rlkd_cache.train.batching import plan_window

    root = Path(tempfile.mkdtemp(prefix=f"rlkd-bench-{backend}-"))
    cfg = CacheConfig(
        model=str(model),
        split=f"train[:{args.rows}]",
        top_k=args.k,
        backend=backend,
        batch_tokens=args.batch_tokens,
        dtype=args.dtype,
        cache_root=str(root),
        vllm_engine_kwargs=json.loads(args.vllm_engine_kwargs),
    )
    folder_sha256(model, root / ".hash-memo.json")  # one-time teacher hash, not timed
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    seqs = prepare(load_rows(None, cfg.split), tokenizer, cfg).sequences
    lengths = [len(s.input_ids) for s in seqs]
    batches = [
        [seqs[i].input_ids.tolist() for i in b]
        for b in plan_window(np.array(lengths), cfg.batch_tokens)
    ]
    t0 = time.perf_counter()
    teacher = make_backend(backend, model, cfg)
    start_s = time.perf_counter() - t0
    run = Run(backend, teacher, cfg, batches, sum(lengths), start_s)
    bare_pass(run, warm_up=True)  # first-request costs are not throughput
    print(f"{backend}: started in {start_s:.1f} s ({teacher.version()})", flush=True)
    return run


def bare_pass(run: Run, warm_up: bool = False) -> float:
    bare = bare_vllm if run.backend == "vllm" else bare_hf
    t0 = time.perf_counter()
    bare(run.teacher, run.batches[:1] if warm_up else run.batches, run.cfg.top_k)
    return run.tokens / (time.perf_counter() - t0)


def cache_pass(run: Run) -> tuple[float, float]:
    """(tokens per second, tokens per CPU-second) of one `run_cache`."""
    import rlkd_cache.cache as pipeline

    root = Path(run.cfg.cache_root)
    for cache_dir in root.glob("*-k*"):
        shutil.rmtree(cache_dir)
    pipeline.make_backend = lambda name, path, cfg: run.teacher  # reuse the started engine
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    pipeline.run_cache(run.cfg, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return run.tokens / wall, run.tokens / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["vllm", "hf", "both"], default="both")
    parser.add_argument("--model", help="HF model folder [the embedded default teacher]")
    parser.add_argument("--cache-root", default=DEFAULT_ROOT, help="holds the default teacher")
    parser.add_argument("--rows", type=int, default=48, help="first rows of the bundled sample")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; best one kept")
    parser.add_argument("--vllm-engine-kwargs", default="{}", help="JSON object for vllm.LLM")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import torch

    from rlkd_cache.default_teacher import default_teacher

    model = Path(args.model) if args.model else default_teacher(args.cache_root)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"model {model}, k={args.k}, rows={args.rows}, {args.dtype}, device {device}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or 'unknown'}), load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    runs = [
        start(b, args, model)
        for b in (["hf", "vllm"] if args.backend == "both" else [args.backend])
    ]
    for i in range(args.repeat):
        for run in runs:
            bare, (cache, per_cpu) = bare_pass(run), cache_pass(run)
            run.best_bare, run.best_cache = max(run.best_bare, bare), max(run.best_cache, cache)
            run.best_cache_per_cpu_s = max(run.best_cache_per_cpu_s, per_cpu)
            print(
                f"round {i + 1} {run.backend}: bare {bare:,.0f} tok/s, rlkd cache {cache:,.0f} "
                f"tok/s ({per_cpu:,.0f} tok per CPU-second)",
                flush=True,
            )
    results = []
    for run in runs:
        ratio = run.best_cache / run.best_bare
        print(
            f"{run.backend}: engine start {run.start_s:.1f} s; best bare {run.best_bare:,.0f} "
            f"tok/s; best rlkd cache {run.best_cache:,.0f} tok/s; ratio {ratio:.3f} "
            f"({run.tokens} tokens in {len(run.batches)} batches)"
        )
        results.append(
            {
                "backend": run.backend,
                "version": run.teacher.version(),
                "engine_start_s": round(run.start_s, 1),
                "bare_tok_s": round(run.best_bare, 1),
                "cache_tok_s": round(run.best_cache, 1),
                "ratio": round(ratio, 3),
                "cache_tok_per_cpu_s": round(run.best_cache_per_cpu_s, 1),
                "tokens": run.tokens,
                "batches": len(run.batches),
            }
        )
        if hasattr(run.teacher, "close"):
            run.teacher.close()
        shutil.rmtree(run.cfg.cache_root, ignore_errors=True)
    summary: dict[str, Any] = {
        "model": model.name,
        "k": args.k,
        "rows": args.rows,
        "dtype": args.dtype,
        "device": device,
        "load_average_end": round(os.getloadavg()[0], 1),
        "vllm_engine_kwargs": json.loads(args.vllm_engine_kwargs),
        "results": results,
    }
    if len(results) == 2:
        summary["vllm_over_hf_cache_tok_s"] = round(
            results[1]["cache_tok_s"] / results[0]["cache_tok_s"], 3
        )
        print(f"vLLM / transformers, rlkd cache tok/s: {summary['vllm_over_hf_cache_tok_s']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
