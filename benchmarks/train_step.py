"""Training-step benchmark: plain SFT vs cached KD (what `rlkd train` does) vs online KD.

One optimizer step = forward + backward + clip + AdamW step, on the same student and the same
batches (the first `--batches` token-budget batches of a k=20 cache of the default teacher,
SmolLM2-135M-Instruct, over the bundled sample; built or reused, caches are content-addressed):

- sft: CE on the distilled positions the usual way: the HF forward builds the full (B, T, V)
  logits and its loss (labels -100 elsewhere) is backpropagated;
- cached: `rlkd train`'s own step, imported from `rlkd_cache.train.step` (`train_step` +
  `optimizer_step`) with the trainer's default loss (forward KL with the tail bucket + RLKD
  rank, L = KD + rank / 2): chunked LM head (its matmuls in bf16 under `--precision bf16`),
  loss scaler as the trainer sets it, backward of total / count;
- online: the teacher (fp32, no grad) run on every batch, then forward KL of the student's
  full softmax to the teacher's at the distilled positions (HF forwards, full logits).

The student is the teacher's layers `--layers` (`shallow_student`), or with
`--student-config 1b` a random-init Llama-3.2-1B-shaped model with the teacher's vocabulary.

Time: all three variants in this one process, sharing one student and one AdamW (timing does
not depend on the weights), interleaved step by step with the order rotated every round,
after `--warmup` steps of each; the figure is the median step over `--rounds` x `--batches`
steps (the time goal is read on the ratio of medians; the median of the per-step ratios
cached / sft, same batch back to back, is printed as a check against drifting load).
tokens/s and positions/s are sums over the measured steps / their total time. On a shared
CPU, `--threads 1` gives steadier figures than two threads that wait on each other.
Memory: each variant in a fresh subprocess, after one warmup step (AdamW state allocated):
- CPU: `state` = resident memory then minus that after imports and batches (weights, AdamW
  state, the teacher for online); `step` = peak RSS (VmHWM, reset through
  /proc/self/clear_refs) during the measured steps minus the resident memory before them. The
  child runs with glibc's mmap threshold pinned at 1 MiB (`MALLOC_MMAP_THRESHOLD_`) so freed
  large tensors return to the OS and RSS follows live memory. Linux only.
- CUDA: `state` = `memory_allocated` before the steps, `step` = `max_memory_allocated`
  during them minus `state`.
The memory goal is checked on `step` (`state` is the same for sft and cached by construction);
`peak` = state + step is printed too.

`--losses authors,dcg,...` also times `rlkd train`'s step with other loss settings (names of
`LOSSES`: a preset or one changed field), interleaved with the others, as `cached:NAME`, and
prints each one's step time over the default's and over sft's (the ranking variants must keep
cached / sft within the time goal).

Goals (issue 4): cached step time <= 1.10x sft's; cached peak memory <= 1.10x sft's; online
>= 2x slower than cached. Prints one line per variant and, LAST, one JSON object.

    python benchmarks/train_step.py [--cache-root DIR] [--batch-tokens 2048] [--batches 4]
        [--rounds 3] [--device cpu|cuda] [--precision fp32|bf16] [--student-config shallow|1b]
        [--threads N] [--skip-memory] [--losses authors,dcg,midpoint]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig, TrainConfig
from rlkd_cache.default_teacher import default_teacher
from rlkd_cache.losses.chunked import PRESETS
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import Batch, TokenBatcher
from rlkd_cache.train.step import StepSettings, autocast_for, optimizer_step, train_step
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student_init import shallow_student

Variant = Literal["sft", "cached", "online"]
"""Which training step: plain SFT (CE), cached KD (`rlkd train`), online KD (teacher run)."""
VARIANTS: tuple[Variant, ...] = ("sft", "cached", "online")
GOAL_TIME_MAX = 1.10
GOAL_MEMORY_MAX = 1.10
GOAL_ONLINE_MIN = 2.0
MIB = 2**20
TRAIN = TrainConfig()
LOSSES: dict[str, dict[str, Any]] = {
    "authors": PRESETS["authors"],
    "flat": {"rank_weighting": "flat"},
    "dcg": {"rank_weighting": "dcg"},
    "uniform_tail": {"rank_guess": "uniform_tail"},
    "midpoint": {"rank_guess": "midpoint"},
    "extrapolate": {"rank_guess": "extrapolate"},
}
"""Loss settings `--losses` can time against the default: a preset or one changed field."""


def llama_1b_config(vocab_size: int) -> LlamaConfig:
    """Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8 heads, tied head), our vocab."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """(cache, teacher folder, shallow student folder or None for the 1b student), made once."""
    teacher = default_teacher(args.cache_root)
    cfg = CacheConfig(cache_root=args.cache_root, top_k=20, split=f"train[:{args.rows}]")
    cache = Path(run_cache(cfg, progress=False))
    if args.student_config == "1b":
        return cache, teacher, None
    name = "bench-train-step-student-" + "-".join(str(i) for i in args.layers)
    student = Path(args.cache_root) / "models" / name
    if not (student / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=student.parent))
        shallow_student(teacher, args.layers, tmp).rename(student)
    return cache, teacher, student


def load_batches(cache: Path, batch_tokens: int, count: int) -> list[Batch]:
    """The first `count` batches of epoch 0 (seed 0), as `rlkd train` would see them."""
    batcher = TokenBatcher(CacheStream(Cache(cache), seed=0), batch_tokens=batch_tokens)
    batches = [b for _, b in zip(range(count), batcher.batches(1), strict=False)]
    if len(batches) < count:
        raise SystemExit(f"the cache {cache} gives only {len(batches)} batches")
    return batches


def load_student(args: argparse.Namespace, student: Path | None, device: torch.device) -> Any:
    """The student in fp32 (as `rlkd train` loads it), in train mode."""
    torch.manual_seed(0)
    if student is None:
        with device:  # initialised where it trains: no fp32 copy of 1B weights on the host
            model = LlamaForCausalLM(llama_1b_config(args.vocab_size))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).train()


def load_teacher(teacher: Path, device: torch.device) -> Any:
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).eval().requires_grad_(False)


class Steps:
    """The three training steps over one student and one AdamW, as `rlkd train` sets them up.

    `cached` is `rlkd train`'s own step (`train/step.py`): `train_step` over the step's one
    micro-batch, then `optimizer_step`, with the trainer's default loss settings. The other
    two variants share `optimizer_step` (clip + AdamW)."""

    def __init__(self, model: Any, teacher: Any | None, args: argparse.Namespace):
        self.model = model
        self.teacher = teacher
        self.device = next(model.parameters()).device
        self.autocast = autocast_for(args.precision, self.device)
        cfg = dataclasses.replace(TRAIN, precision=args.precision, chunk_size=args.chunk_size)
        self.settings = StepSettings.of(cfg)  # the trainer's default loss
        self.variants = {  # cached:NAME -> the step's settings with that loss
            f"cached:{name}": StepSettings.of(dataclasses.replace(cfg, **LOSSES[name]))
            for name in args.losses
        }
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=TRAIN.lr, weight_decay=TRAIN.weight_decay
        )

    def run(self, variant: str, batch: Batch) -> None:
        if variant == "cached":
            train_step(self.model, [batch], self.settings, self.scaler)
        elif variant in self.variants:
            train_step(self.model, [batch], self.variants[variant], self.scaler)
        else:
            {"sft": self.sft, "online": self.online}[variant](batch)
        optimizer_step(self.model, self.optimizer, self.scaler, None, TRAIN.clip)

    def sft(self, batch: Batch) -> None:
        """CE on the distilled positions through the model's own loss: full (B, T, V) logits."""
        labels = torch.full_like(batch.input_ids, -100)  # (B, T); HF shifts them left by one
        labels[batch.row, batch.pos + 1] = batch.target_ids
        with self.autocast():
            out = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
            )
        out.loss.backward()

    def online(self, batch: Batch) -> None:
        """Forward KL(teacher || student) on full softmaxes at the distilled positions."""
        assert self.teacher is not None
        with torch.no_grad():
            out = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            log_p = out.logits[batch.row, batch.pos].float().log_softmax(-1)  # (N, V)
            del out
        with self.autocast():
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits  # (B, T, V)
        log_q = logits[batch.row, batch.pos].float().log_softmax(-1)  # (N, V)
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        (self.settings.losses.kd_weight * kd / batch.n_positions).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """Peak resident size since the last `reset_hwm` (Linux VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(s for s in status if s.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def setup(args: argparse.Namespace, variants: tuple[Variant, ...]) -> tuple[Steps, list[Batch]]:
    device = torch.device(args.device)
    cache, teacher_dir, student_dir = prepare(args)
    batches = [b.to(device) for b in load_batches(cache, args.batch_tokens, args.batches)]
    model = load_student(args, student_dir, device)
    teacher = load_teacher(teacher_dir, device) if "online" in variants else None
    return Steps(model, teacher, args), batches


def measure_memory(variant: Variant, args: argparse.Namespace) -> dict[str, float]:
    """One variant's memory in this (fresh) process; see the module docstring."""
    device = torch.device(args.device)
    cache, _, _ = prepare(args)
    load_batches(cache, args.batch_tokens, args.batches)  # imports and first-use allocations
    runtime = rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated()
    steps, batches = setup(args, (variant,))
    steps.run(variant, batches[0])  # AdamW state, kernels and caches set up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        reset_hwm()
    for batch in batches:
        steps.run(variant, batch)
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else hwm_bytes()
    return {"state_mib": (before - runtime) / MIB, "step_mib": (peak - before) / MIB}


def run_child(variant: Variant) -> dict[str, float]:
    """`measure_memory(variant)` in a fresh interpreter with the same arguments."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    command = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"memory child {variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_time(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """All variants interleaved step by step in this process; median seconds and rates."""
    steps, batches = setup(args, VARIANTS)
    device = steps.device
    timed = [*VARIANTS, *steps.variants]
    for variant in timed:
        for _ in range(args.warmup):
            steps.run(variant, batches[0])
    seconds: dict[str, list[float]] = {v: [] for v in timed}
    for r in range(args.rounds):
        for b, batch in enumerate(batches):
            turn = r * len(batches) + b
            for i in range(len(timed)):
                variant = timed[(turn + i) % len(timed)]  # rotate who goes first
                sync(device)
                start = time.perf_counter()
                steps.run(variant, batch)
                sync(device)
                seconds[variant].append(time.perf_counter() - start)
    tokens = args.rounds * sum(b.n_tokens for b in batches)
    positions = args.rounds * sum(b.n_positions for b in batches)
    result: dict[str, dict[str, float]] = {
        v: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "tokens_per_s": tokens / sum(s),
            "positions_per_s": positions / sum(s),
        }
        for v, s in seconds.items()
    }
    # The same batch in the same round, run back to back: less exposed to load that drifts.
    paired = [c / s for c, s in zip(seconds["cached"], seconds["sft"], strict=True)]
    result["cached"]["paired_over_sft"] = statistics.median(paired)
    return result


def steps_of(timing: dict[str, dict[str, float]]) -> list[str]:
    """The `--losses` variants among the timed ones (`cached:NAME`)."""
    return [v for v in timing if v.startswith("cached:")]


def met(ok: bool) -> str:
    return "meets" if ok else "misses"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-root", default=CacheConfig().cache_root)
    parser.add_argument("--rows", type=int, default=120, help="sample rows to cache")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the batches")
    parser.add_argument("--chunk-size", type=int, default=TRAIN.chunk_size)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--student-config", choices=["shallow", "1b"], default="shallow")
    parser.add_argument(
        "--layers",
        type=lambda s: [int(i) for i in s.split(",")],
        default=[0, 6, 12, 18, 24, 29],
        help="teacher layers kept by the shallow student",
    )
    parser.add_argument("--vocab-size", type=int, default=49_152, help="1b student's vocab")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument(
        "--losses",
        type=lambda s: [name for name in s.split(",") if name],
        default=[],
        help=f"loss settings to time against the default, from {sorted(LOSSES)}",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure_memory(args.child, args)))
        return
    start = time.perf_counter()
    cache, _, student = prepare(args)
    batches = load_batches(cache, args.batch_tokens, args.batches)
    print(
        f"student {student or '1b (random init)'}, {args.device} {args.precision}; "
        f"{len(batches)} batches of <= {args.batch_tokens} tokens "
        f"({sum(b.n_positions for b in batches)} positions) from {cache}"
    )
    memory = {} if args.skip_memory else {v: run_child(v) for v in VARIANTS}
    timing = measure_time(args)
    for v in VARIANTS:
        t = timing[v]
        line = (
            f"{v:>7}: {1e3 * t['median_s']:8.1f} ms/step (min {1e3 * t['min_s']:.0f}, max "
            f"{1e3 * t['max_s']:.0f})  {t['tokens_per_s']:8,.0f} tokens/s  "
            f"{t['positions_per_s']:8,.0f} positions/s"
        )
        if memory:
            m = memory[v]
            line += (
                f"  memory: step +{m['step_mib']:7.1f} MiB over state {m['state_mib']:7.1f} "
                f"MiB (peak {m['state_mib'] + m['step_mib']:7.1f})"
            )
        print(line)
    time_ratio = timing["cached"]["median_s"] / timing["sft"]["median_s"]
    online_ratio = timing["online"]["median_s"] / timing["cached"]["median_s"]
    print(
        f"cached / sft step time {time_ratio:.3f} (median of paired steps "
        f"{timing['cached']['paired_over_sft']:.3f}): {met(time_ratio <= GOAL_TIME_MAX)} the "
        f"<= {GOAL_TIME_MAX} goal; online / cached {online_ratio:.2f}: "
        f"{met(online_ratio >= GOAL_ONLINE_MIN)} the >= {GOAL_ONLINE_MIN} goal"
    )
    for variant in steps_of(timing):
        t = timing[variant]
        over_default = t["median_s"] / timing["cached"]["median_s"]
        over_sft = t["median_s"] / timing["sft"]["median_s"]
        print(
            f"{variant}: {1e3 * t['median_s']:.1f} ms/step, {over_default:.3f}x the default's "
            f"step, {over_sft:.3f}x sft's: {met(over_sft <= GOAL_TIME_MAX)} the "
            f"<= {GOAL_TIME_MAX} goal"
        )
    summary: dict[str, Any] = {
        "benchmark": "train_step",
        "device": args.device,
        "precision": args.precision,
        "student": args.student_config if student is None else f"layers {args.layers}",
        "batch_tokens": args.batch_tokens,
        "batches": args.batches,
        "steps_per_variant": args.rounds * args.batches,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        **{f"{v}_ms": round(1e3 * timing[v]["median_s"], 1) for v in VARIANTS},
        **{f"{v}_tokens_per_s": round(timing[v]["tokens_per_s"]) for v in VARIANTS},
        **{f"{v}_positions_per_s": round(timing[v]["positions_per_s"]) for v in VARIANTS},
        "cached_over_sft_time": round(time_ratio, 3),
        "cached_over_sft_time_paired": round(timing["cached"]["paired_over_sft"], 3),
        "online_over_cached_time": round(online_ratio, 3),
        "goal_time_max": GOAL_TIME_MAX,
        "goal_time_met": time_ratio <= GOAL_TIME_MAX,
        "goal_online_min": GOAL_ONLINE_MIN,
        "goal_online_met": online_ratio >= GOAL_ONLINE_MIN,
        **{
            f"{v}_over_cached_time": round(timing[v]["median_s"] / timing["cached"]["median_s"], 3)
            for v in steps_of(timing)
        },
        **{
            f"{v}_over_sft_time": round(timing[v]["median_s"] / timing["sft"]["median_s"], 3)
            for v in steps_of(timing)
        },
    }
    if memory:
        memory_ratio = memory["cached"]["step_mib"] / memory["sft"]["step_mib"]
        peak = {v: m["state_mib"] + m["step_mib"] for v, m in memory.items()}
        print(
            f"cached / sft step memory {memory_ratio:.3f} (peak {peak['cached'] / peak['sft']:.3f})"
            f": {met(memory_ratio <= GOAL_MEMORY_MAX)} the <= {GOAL_MEMORY_MAX} goal"
        )
        summary.update(
            {
                **{f"{v}_step_mib": round(memory[v]["step_mib"], 1) for v in VARIANTS},
                **{f"{v}_peak_mib": round(peak[v], 1) for v in VARIANTS},
                "cached_over_sft_step_memory": round(memory_ratio, 3),
                "cached_over_sft_peak_memory": round(peak["cached"] / peak["sft"], 3),
                "goal_memory_max": GOAL_MEMORY_MAX,
                "goal_memory_met": memory_ratio <= GOAL_MEMORY_MAX,
            }
        )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
