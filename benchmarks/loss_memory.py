"""Peak memory of the chunked vs the plain distillation loss, forward + backward.

Shapes of a SmolLM2-135M student: 2048 positions, vocab 49,152, hidden 576; a top-20 cache;
the default `LossConfig` (FKL with tail bucket + RLKD ranking, rank_k 15). Each variant runs in
a fresh subprocess so that neither sees the other's allocations.

- CPU: peak RSS growth, `ru_maxrss` after the step minus the resident size just before it
  (inputs, LM head and imports are in the baseline; the weight's gradient is not). The child
  runs with glibc's mmap threshold pinned at 1 MiB (`MALLOC_MMAP_THRESHOLD_`), so freed large
  tensors go back to the OS and RSS follows live memory instead of the allocator's heap.
- CUDA: `torch.cuda.max_memory_allocated` minus the memory allocated just before the step.

Goal: chunked peak <= 1/4 of plain. Prints one line per variant, then, as the LAST line, one
JSON object with the figures.

    python benchmarks/loss_memory.py [--device cpu|cuda] [--chunk-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Literal

import torch

from rlkd_cache.losses.chunked import LossConfig, TeacherTopK, distill_loss, distill_loss_reference

LENGTH, VOCAB, HIDDEN, TOP_K = 2048, 49_152, 576, 20
GOAL_RATIO_MAX = 0.25
MIB = 2**20

Variant = Literal["plain", "chunked"]
"""Which loss a child process measures: all logits at once, or chunked with recomputation."""


def make_teacher(device: torch.device) -> TeacherTopK:
    """A synthetic top-20 cache without ever building an (N, V) tensor.

    Ids are distinct within a row (a random offset plus a stride of 997, 20 * 997 < V);
    log-probs are sorted and leave a tail mass; the actual token lies outside the top-k.
    """
    offset = torch.randint(0, VOCAB, (LENGTH, 1), device=device)  # (N, 1)
    ids = (offset + 997 * torch.arange(TOP_K, device=device)) % VOCAB  # (N, k)
    full = (torch.randn(LENGTH, TOP_K + 1, device=device) * 2).log_softmax(-1)  # (N, k+1)
    logprobs = full.sort(-1, descending=True).values[:, :TOP_K]  # (N, k)
    return TeacherTopK(
        topk_ids=ids,
        topk_logprobs=logprobs,
        target_ids=(ids[:, -1] + 1) % VOCAB,  # (N,) next to the last top-k id: outside K
        target_logprobs=logprobs[:, -1] - 1.0,  # (N,)
    )


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(variant: Variant, device: torch.device, chunk_size: int) -> dict[str, float]:
    """Run one forward + backward of `variant` and return its peak growth (MiB) and seconds."""
    torch.manual_seed(0)
    hidden = torch.randn(LENGTH, HIDDEN, device=device, requires_grad=True)  # (N, H)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * HIDDEN**-0.5).requires_grad_()  # (V, H)
    teacher = make_teacher(device)
    cfg = LossConfig()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = current_rss_bytes()
    start = time.perf_counter()
    if variant == "plain":
        sums = distill_loss_reference(hidden, weight, None, teacher, None, cfg)
    else:
        sums = distill_loss(hidden, weight, None, teacher, None, cfg, chunk_size=chunk_size)
    sums.total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seconds = time.perf_counter() - start
    return {"peak_mib": (peak - baseline) / MIB, "seconds": seconds, "loss": sums.total.item()}


def run_child(variant: Variant, device: str, chunk_size: int) -> dict[str, float]:
    """Measure one variant in a fresh interpreter; return what it printed as JSON."""
    command = [sys.executable, __file__, "--device", device, "--chunk-size", str(chunk_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    done = subprocess.run(
        [*command, "--child", variant], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, torch.device(args.device), args.chunk_size)))
        return

    results = {
        variant: run_child(variant, args.device, args.chunk_size)
        for variant in ("plain", "chunked")
    }
    for variant, result in results.items():
        print(
            f"{variant:>7}: peak +{result['peak_mib']:8.1f} MiB  "
            f"{result['seconds']:6.2f} s  loss sum {result['loss']:.2f}"
        )
    ratio = results["chunked"]["peak_mib"] / results["plain"]["peak_mib"]
    summary = {
        "benchmark": "loss_memory",
        "device": args.device,
        "length": LENGTH,
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "top_k": TOP_K,
        "chunk_size": args.chunk_size,
        "plain_peak_mib": round(results["plain"]["peak_mib"], 1),
        "chunked_peak_mib": round(results["chunked"]["peak_mib"], 1),
        "ratio": round(ratio, 4),
        "goal_ratio_max": GOAL_RATIO_MAX,
        "goal_met": ratio <= GOAL_RATIO_MAX,
        "plain_seconds": round(results["plain"]["seconds"], 2),
        "chunked_seconds": round(results["chunked"]["seconds"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
