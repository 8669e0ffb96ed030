"""`rlkd train` under torchrun: 2 real CPU ranks (gloo), DDP and FSDP2, against one process.

The reference for "the same result" is a single process that runs the loop's own `one_step`
over the same GLOBAL batches: step n takes rank 0's and then rank 1's micro-batches of step
n, each rank's read exactly as a rank reads them (`CacheStream(rank=r, world_size=2)` through
`TokenBatcher`, `grad_accum` at a time, a rank that has run out contributing none, as the
empty padding batches contribute nothing). Same student, schedule and step count.

Tolerances (measured here on these 12 steps, lr 3e-3, AdamW, clip 1; both DDP and FSDP2):
the count of distilled positions of every step is equal; step 1 (same weights) gives the same
loss to 1e-6 relative; every step's loss within 1e-5 relative (measured <= 3e-7) and pre-clip
gradient norm within 1e-4 relative (measured <= 3e-6; 6e-5 with 256-token batches): the norm
is what sees the gradient's scale, which AdamW and clipping hide; final weights within 1e-6
of each tensor's norm (measured <= 3e-7) and 1e-4 per element (measured <= 1.7e-5: AdamW
moves an element whose gradient is a near-zero cancellation by up to ~lr); the held-out eval
within 1e-6 relative (measured <= 1e-7). The only difference is the order of float additions
(each rank's sum, then the all-reduce, vs one accumulation), which the top-k and soft-rank
selections of later steps amplify a little.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, shallow_copy
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig, TrainConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import Batch, TokenBatcher
from rlkd_cache.train.distributed import empty_batch
from rlkd_cache.train.evaluate import evaluate
from rlkd_cache.train.loop import Step, one_step, setup, train
from rlkd_cache.train.run_dir import prepare_run_dir
from rlkd_cache.train.step import StepSettings, micro_step, train_step
from rlkd_cache.train.stream import CacheStream

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    """A 48-row training cache in 3 shards, a 20-row eval cache, a 1-layer student and a
    copy of it with tied embeddings (its head is its embedding matrix)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("dist")
    common = {
        "model": str(tiny_teacher),
        "dataset": str(SAMPLE),
        "top_k": 16,
        "cache_root": str(root / "caches"),
        "positions": "response",
    }
    train_cache = run_cache(CacheConfig(split="train[:48]", num_shards_hint=3, **common), False)
    eval_cache = run_cache(CacheConfig(split="train[300:320]", **common), progress=False)
    student = shallow_copy(tiny_teacher, root / "student")
    tied = AutoModelForCausalLM.from_pretrained(student)
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.save_pretrained(root / "tied")
    AutoTokenizer.from_pretrained(student).save_pretrained(root / "tied")
    return {
        "cache": Path(train_cache),
        "eval": Path(eval_cache),
        "student": student,
        "tied": root / "tied",
        "root": root,
    }


def train_args(
    data: dict[str, Path], output: Path, *extra: str, student: str | None = "student"
) -> list[str]:
    """`rlkd train` flags of every run here: 12 optimizer steps of up to 2 x 2 micro-batches
    (the ranks' parts make 23 and 21 batches of <= 384 tokens)."""
    chosen = ["--student", str(data[student])] if student else []
    return [
        "train",
        "--cache", str(data["cache"]),
        *chosen,
        "--output", str(output),
        "--lr", "3e-3",
        "--batch-tokens", "384",
        "--grad-accum", "2",
        "--log-every", "1",
        "--save-every", "3",
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def torchrun(args: list[str], entry: tuple[str, ...] = ("-m", "rlkd_cli.main")) -> list[str]:
    """The command that runs `rlkd ARGS` (or `entry` ARGS) on RANKS local CPU ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(RANKS), *entry, *args,
    ]  # fmt: skip


def run_ok(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def metrics(output: Path, kind: str) -> list[dict[str, Any]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["kind"] == kind]


@pytest.fixture(scope="module")
def ddp_run(data) -> Path:
    out = data["root"] / "ddp"
    run_ok(torchrun(train_args(data, out, "--eval-cache", str(data["eval"]), "--eval-every", "4")))
    return out


@pytest.fixture(scope="module")
def fsdp_run(data) -> Path:
    """FSDP2 (it runs on CPU with gloo in torch 2.13) on the tied student: the root unit's
    gathered embedding is the head `distill_loss` applies."""
    out = data["root"] / "fsdp"
    extra = ("--parallel", "fsdp", "--eval-cache", str(data["eval"]), "--eval-every", "4")
    run_ok(torchrun(train_args(data, out, *extra, student="tied")))
    return out


def test_the_padding_micro_batch_gives_sum_0_count_0_and_zero_gradients(data):
    """What a rank that has run out trains on while another has data (`empty_batch`)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(data["student"], dtype=torch.float32)
    settings = StepSettings.of(TrainConfig())
    pad = empty_batch(Cache(data["cache"]).k)
    out = micro_step(student, pad, settings)
    assert float(out.sums.total.detach()) == 0.0 and int(out.sums.count) == 0
    parts = train_step(student, [pad], settings, torch.amp.GradScaler("cpu", enabled=False), 7)
    assert parts == {"kd": 0.0, "rank": 0.0, "ce": 0.0, "loss": 0.0, "positions": 7}
    for name, param in student.named_parameters():  # every one has a gradient: DDP needs it
        assert param.grad is not None and not param.grad.any(), name


def rank_steps(cfg: TrainConfig, rank: int) -> Iterator[list[Batch]]:
    """Rank `rank`'s micro-batches of each step, read as that rank reads them."""
    stream = CacheStream(
        Cache(cfg.cache),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        rank=rank,
        world_size=RANKS,
    )
    batches = TokenBatcher(stream, batch_tokens=cfg.batch_tokens).batches(cfg.epochs)
    while micro := list(itertools.islice(batches, cfg.grad_accum)):
        yield micro


def saved_config(run: Path) -> TrainConfig:
    """The `TrainConfig` of a run folder's config.json (its other keys, such as world_size and
    the parameter counts, left out)."""
    saved = json.loads((run / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in names})


def one_process(output: Path, tmp_path: Path) -> tuple[list[dict[str, float]], Any, dict]:
    """The single-process reference of the torchrun run in `output`: per-step figures, the
    final student and its held-out eval."""
    saved = json.loads((output / "config.json").read_text())
    assert saved["world_size"] == RANKS
    cfg = saved_config(output)
    steps = len(metrics(output, "train"))
    run = setup(dataclasses.replace(cfg, output=str(tmp_path / "ref"), max_steps=steps))
    figures = []
    groups = itertools.zip_longest(*(rank_steps(cfg, r) for r in range(RANKS)), fillvalue=[])
    for micro in (list(itertools.chain(*g)) for g in groups):
        positions = sum(b.n_positions for b in micro)
        parts, grad_norm = one_step(run, Step(micro, positions, sum(b.n_tokens for b in micro)))
        figures.append({**parts, "grad_norm": grad_norm})
    assert len(figures) == steps  # every rank's batches, no step more or less
    held_out = evaluate(
        run.model, Cache(cfg.eval_cache), run.settings, batch_tokens=cfg.batch_tokens
    )
    return figures, run.model, held_out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def assert_same_training(output: Path, tmp_path: Path) -> None:
    figures, student, held_out = one_process(output, tmp_path)
    logged = metrics(output, "train")
    assert [m["step"] for m in logged] == list(range(1, len(figures) + 1))  # rank 0 only
    assert rel(logged[0]["loss"], figures[0]["loss"]) < 1e-6
    for ours, theirs in zip(logged, figures, strict=True):
        assert ours["positions"] == theirs["positions"], ours["step"]
        assert rel(ours["loss"], theirs["loss"]) < 1e-5, ours["step"]
        assert rel(ours["grad_norm"], theirs["grad_norm"]) < 1e-4, ours["step"]
    final = load_file(output / "final" / "model.safetensors")
    reference = {k: v for k, v in student.state_dict().items() if k in final}
    assert final.keys() == reference.keys()
    for name, weight in reference.items():
        assert (final[name] - weight).norm() <= 1e-6 * weight.norm(), name
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-4, msg=name)
    evaluated = metrics(output, "eval")[-1]
    assert evaluated["positions"] == held_out["positions"]
    for name in ("kl", "top1", "loss"):
        assert rel(evaluated[name], held_out[name]) < 1e-6, name


@pytest.mark.slow
def test_ddp_equals_one_process_over_the_same_global_batches(ddp_run, tmp_path):
    assert_same_training(ddp_run, tmp_path)
    cfg = saved_config(ddp_run)
    steps = [sum(1 for _ in rank_steps(cfg, rank)) for rank in range(RANKS)]
    assert steps == [12, 11]  # uneven parts (23 and 21 batches): rank 1 pads steps 11 and 12
    total = Cache(cfg.cache).manifest["totals"]["positions"]
    assert sum(m["positions"] for m in metrics(ddp_run, "train")) == total  # no row dropped


@pytest.mark.slow
def test_fsdp2_with_tied_embeddings_equals_one_process(fsdp_run, tmp_path):
    assert_same_training(fsdp_run, tmp_path)
    assert sorted(p.name for p in (fsdp_run / "checkpoints" / "step-00000012").iterdir()) == [
        "sharded",
        "state.pt",
        "trainer.json",
    ]
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")  # plain transformers
    assert final.lm_head.weight is final.model.embed_tokens.weight


def descendants(pid: int) -> Iterator[int]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            yield child
            yield from descendants(child)


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank`."""
    for pid in descendants(launcher):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_job_and_the_same_command_resumes(ddp_run, data, tmp_path):
    out = tmp_path / "killed"
    extra = ("--eval-cache", str(data["eval"]), "--eval-every", "4")
    command = torchrun(train_args(data, out, *extra))  # ddp_run's command, another --output
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(command, env=ENV, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "checkpoints").glob("step-*"))) >= 2:  # step 6 saved
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun took the other rank down
    assert not (out / "final").exists()
    resumed = run_ok(command)
    assert "resuming from" in resumed.stderr
    assert_same_weights(ddp_run, out)
    assert {m["step"] for m in metrics(out, "train")} == set(range(1, 13))


@pytest.mark.slow
def test_fsdp2_resumes_from_a_sharded_checkpoint_to_the_same_weights(fsdp_run, data, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(fsdp_run, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    killed_save = out / "checkpoints" / ".step-00000012.sharded.tmp"
    (killed_save / "sharded").mkdir(parents=True)  # what a job killed while saving leaves
    extra = ("--parallel", "fsdp", "--eval-cache", str(data["eval"]), "--eval-every", "4")
    resumed = run_ok(torchrun(train_args(data, out, *extra, student="tied")))  # fsdp_run's
    assert "resuming from" in resumed.stderr and "step-00000009" in resumed.stderr
    assert not killed_save.exists()
    assert_same_weights(fsdp_run, out)


def assert_same_weights(a: Path, b: Path) -> None:
    wa = load_file(a / "final" / "model.safetensors")
    wb = load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The `rlkd: error:` line every rank printed (the same one), after a failed job."""
    assert done.returncode != 0
    ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert not ranks, done.stderr[-4000:]  # no rank's traceback (torchrun prints its own)
    lines = {line for line in done.stderr.splitlines() if line.startswith("rlkd: error: ")}
    assert len(lines) == 1, done.stderr[-4000:]
    return lines.pop()


@pytest.mark.slow
def test_a_one_process_run_is_not_resumed_by_two_ranks(data, tmp_path):
    out = tmp_path / "one"
    cfg = TrainConfig(
        cache=str(data["cache"]),
        student=str(data["student"]),
        output=str(out),
        lr=3e-3,
        batch_tokens=384,
        grad_accum=2,
        log_every=1,
        save_every=3,
        device="cpu",
        max_steps=3,
    )
    train(cfg, progress=False)
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    command = torchrun(train_args(data, out, "--max-steps", "3"))
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    line = one_error_line(done)
    assert "was trained by 1 rank(s) and this job has 2" in line, line
    checkpoint = out / "checkpoints" / "step-00000003"
    again = dataclasses.replace(cfg, output=str(tmp_path / "new"), resume=str(checkpoint))
    with pytest.raises(RlkdError, match=f"--resume {checkpoint} was trained by 1 rank"):
        prepare_run_dir(again, world_size=2)  # what rank 0 of that job runs first


@pytest.mark.slow
def test_ranks_with_different_students_are_refused(data, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "from rlkd_cli.main import main\n"
        "students = os.environ['STUDENTS'].split(os.pathsep)\n"
        "sys.argv += ['--student', students[int(os.environ['RANK'])]]\n"
        "main()\n"
    )
    command = torchrun(train_args(data, tmp_path / "run", student=None), (str(launcher),))
    env = {**ENV, "STUDENTS": os.pathsep.join([str(data["student"]), str(data["tied"])])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    line = one_error_line(done)
    assert "rank 1 and rank 0 differ in student weights" in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was written
