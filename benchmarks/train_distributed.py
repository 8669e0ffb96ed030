"""Training on 2 ranks vs 1: optimizer steps/s at the same global batch, and FSDP2 vs DDP memory.

Three jobs over the same cache and student (the train-step benchmark's: a k=20 cache of the
default teacher over the bundled sample, and a student of its layers `--layers`), each
running `rlkd train`'s own loop functions (`loop.setup`, `loop.step_batches`,
`loop.one_step`: reading, batching, forward, backward, gradient sync, clip, AdamW):
- one: 1 process x 1 thread, `grad_accum` = 2 x `--grad-accum` (the global batch);
- ddp: `torchrun --nproc_per_node 2`, 1 thread per rank, `--grad-accum` each, DDP;
- fsdp: the same with `--parallel fsdp` (FSDP2).
So every optimizer step trains on 2 x `--grad-accum` micro-batches of `--batch-tokens` in all
three (not the same rows: one process reads the whole cache in its order, a rank its half;
tokens/s is printed beside steps/s for that reason). Time: the median wall time of an
optimizer step on rank 0 over `--steps` steps after `--warmup` (data included; the ranks
synchronize every step). Scaling efficiency = (2-rank steps/s) / (1-rank steps/s): ideal 2.0
(each rank does half the work).
Memory per rank (the largest over the ranks): CPU: peak resident memory (VmHWM, reset after
setup) during the steps minus the resident memory after imports and process-group start, so
weights, gradients, AdamW state and the step's activations; with glibc's mmap threshold at
1 MiB so freed large tensors leave RSS. CUDA: max_memory_allocated during the steps. The
FSDP2 / DDP ratio is the memory FSDP2 saves on this student (ideal for 2 ranks: about 0.5 of
the state, plus the gathered embeddings/head and one layer).

Prints one line per job, then the two figures; LAST, one JSON object.

    python benchmarks/train_distributed.py [--cache-root DIR] [--batch-tokens 1024]
        [--grad-accum 1] [--steps 4] [--warmup 1] [--layers 0,6,12,18,24,29] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.config import CacheConfig, TrainConfig
from rlkd_cache.train.distributed import init_world
from rlkd_cache.train.loop import one_step, setup, step_batches

MIB = 2**20
JOBS = ("one", "ddp", "fsdp")


def train_step_benchmark() -> Any:
    """benchmarks/train_step.py as a module: its cache and student are this benchmark's."""
    path = Path(__file__).with_name("train_step.py")
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(next(s for s in status if s.startswith("VmHWM:")).split()[1]) * 1024


def child(args: argparse.Namespace) -> None:
    """One job's rank: the loop's own setup and steps, timed; rank 0 prints a JSON line."""
    torch.set_num_threads(1)
    world = init_world(args.device)
    cuda = world.device.type == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes()
    ranks = 1 if args.child == "one" else world.size
    cfg = TrainConfig(
        cache=args.cache,
        student=args.student,
        output=args.output,
        max_steps=args.warmup + args.steps,
        batch_tokens=args.batch_tokens,
        grad_accum=args.grad_accum * (2 // ranks),
        device=args.device,
        parallel="fsdp" if args.child == "fsdp" else "ddp",
    )
    run = setup(cfg, world)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    seconds, tokens = [], []
    steps = step_batches(run)
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        step = next(steps)
        one_step(run, step)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        tokens.append(step.tokens)
    peak = torch.cuda.max_memory_allocated() if cuda else hwm_bytes()
    memory = max(world.gather((peak - baseline) / MIB))
    if world.is_main:
        measured = seconds[args.warmup :]
        print(
            json.dumps(
                {
                    "median_s": statistics.median(measured),
                    "tokens_per_s": sum(tokens[args.warmup :]) / sum(measured),
                    "tokens_per_step": statistics.mean(tokens[args.warmup :]),
                    "memory_mib": memory,
                    "ranks": world.size,
                    "grad_accum": cfg.grad_accum,
                }
            )
        )
    world.close()


def launch(
    job: str, args: argparse.Namespace, cache: Path, student: Path, out: str
) -> dict[str, float]:
    """Run one job (a process, or a 2-rank torchrun) into run folder `out`; its JSON line."""
    own = [
        __file__, "--child", job, "--cache", str(cache), "--student", str(student),
        "--output", out,
        "--batch-tokens", str(args.batch_tokens), "--grad-accum", str(args.grad_accum),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
    ]  # fmt: skip
    if job == "one":
        command = [sys.executable, *own]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*torchrun, "--nproc_per_node", "2", *own]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"job {job} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-root", default=CacheConfig().cache_root)
    parser.add_argument("--rows", type=int, default=120, help="sample rows to cache")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument(
        "--layers",
        type=lambda s: [int(i) for i in s.split(",")],
        default=[0, 6, 12, 18, 24, 29],
        help="teacher layers kept by the student",
    )
    parser.add_argument("--child", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    start = time.perf_counter()
    bench = train_step_benchmark()
    shared = argparse.Namespace(
        cache_root=args.cache_root, rows=args.rows, student_config="shallow", layers=args.layers
    )
    cache, _, student = bench.prepare(shared)
    with tempfile.TemporaryDirectory(prefix="rlkd-bench-dist-") as runs:
        results = {job: launch(job, args, cache, student, f"{runs}/{job}") for job in JOBS}
    global_batch = 2 * args.grad_accum
    print(
        f"student {student}, {args.device}; global batch {global_batch} micro-batches of <= "
        f"{args.batch_tokens} tokens; {args.steps} steps after {args.warmup}"
    )
    for job, r in results.items():
        print(
            f"{job:>5}: {r['ranks']} rank(s) x 1 thread, grad_accum {r['grad_accum']}: "
            f"{1 / r['median_s']:.3f} steps/s ({r['median_s']:.2f} s/step, "
            f"{r['tokens_per_step']:,.0f} tokens/step, {r['tokens_per_s']:,.0f} tokens/s)  "
            f"memory per rank {r['memory_mib']:,.0f} MiB"
        )
    one = results["one"]["median_s"]
    scaling = {job: one / results[job]["median_s"] for job in ("ddp", "fsdp")}
    ratio = results["fsdp"]["memory_mib"] / results["ddp"]["memory_mib"]
    print(
        f"scaling efficiency 2 ranks / 1 rank (ideal 2.0): ddp {scaling['ddp']:.2f}, fsdp "
        f"{scaling['fsdp']:.2f}; FSDP2 / DDP memory per rank {ratio:.2f}"
    )
    summary = {
        "benchmark": "train_distributed",
        "device": args.device,
        "student": f"layers {args.layers}",
        "batch_tokens": args.batch_tokens,
        "global_batch_micro_batches": global_batch,
        "steps": args.steps,
        **{f"{job}_steps_per_s": round(1 / r["median_s"], 4) for job, r in results.items()},
        **{f"{job}_tokens_per_s": round(r["tokens_per_s"]) for job, r in results.items()},
        **{f"{job}_memory_mib": round(r["memory_mib"], 1) for job, r in results.items()},
        "ddp_scaling": round(scaling["ddp"], 3),
        "fsdp_scaling": round(scaling["fsdp"], 3),
        "scaling_ideal": 2.0,
        "fsdp_over_ddp_memory": round(ratio, 3),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
