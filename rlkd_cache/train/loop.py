"""`rlkd train`: stream a cache and train a student with KL + the RLKD ranking loss.

No teacher in memory: the cache supplies the teacher's top-k per position. `train` sets up a
`Run` (student, reader, optimizer, schedule, loss scaler, resumed from a checkpoint when
there is one), then loops over optimizer steps: each takes `grad_accum` token-budget
micro-batches through `step.train_step` (every loss sum divided once by the step's count of
distilled positions) and `step.optimizer_step` (clip, `--optimizer`, schedule), then logs,
evaluates and saves as configured. Metrics go to `metrics.jsonl` and TensorBoard; checkpoints
(model, optimizer, schedule, scaler, RNG, reader position) make a killed run resumable to the
same weights; the final student is saved with `save_pretrained` in `final/`. With `--lora-r`
the student is wrapped by peft and only its adapters train, are checkpointed and saved
(`lora.py`).

Under torchrun (2+ ranks; `distributed.py`) every rank runs this loop on its own part of the
cache, with the student wrapped in DDP or FSDP2 (`--parallel`). Each optimizer step, every
rank takes up to `grad_accum` micro-batches from its part; the ranks all-reduce how many
they took and their counts of distilled positions (before any backward), a rank with fewer
pads with empty micro-batches (loss sum 0, count 0) to the step's most, and `train_step`
divides by the global count: the step is the one-process step over the union of the ranks'
micro-batches. The run ends when the steps are done or no rank has a batch left, so no rank
waits on a collective that another will never join. Rank 0 writes config.json (with
`world_size`), metrics.jsonl, TensorBoard and final/, all with global figures; checkpoints
hold every rank's reader position and RNG (`dist_checkpoint.py`). See docs/scale.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from rlkd_cache.config import TrainConfig, flag, pick_device, saved, validated
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache
from rlkd_cache.train import lora
from rlkd_cache.train.batching import Batch, TokenBatcher
from rlkd_cache.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rlkd_cache.train.dist_checkpoint import full_state, load_weights, rank_state, save_ranks
from rlkd_cache.train.distributed import (
    World,
    cache_identity,
    empty_batch,
    init_world,
    student_checksum,
    unwrap,
    wrap,
)
from rlkd_cache.train.evaluate import evaluate
from rlkd_cache.train.run_dir import lr_factor, prepare_run_dir, run_lock
from rlkd_cache.train.step import (
    PARTS,
    NonFiniteLoss,
    StepSettings,
    autocast_for,
    optimizer_step,
    train_step,
)
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import check_compatible, load_student

log = logging.getLogger("rlkd.train")


@dataclass
class Run:
    """A training run's live state: what the loop advances and a checkpoint saves."""

    cfg: TrainConfig
    folder: Path
    device: torch.device
    model: Any
    """The student, or under torchrun its DDP / FSDP2 wrapper (`distributed.wrap`)."""
    tokenizer: Any
    settings: StepSettings
    batcher: TokenBatcher
    """This rank's batches (its own part of the cache)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int
    epochs: int | None
    eval_cache: Cache | None
    world: World
    step: int = 0
    last_good: Path | None = None
    """The newest checkpoint written or resumed from (named when a loss turns non-finite)."""
    metrics: IO[str] | None = None
    board: Any = None
    tokens_seen: int = 0
    """Real tokens trained on since this process started, all ranks."""
    started: float = field(default_factory=time.time)

    @property
    def student(self) -> Any:
        """The student itself (the model inside the wrapper under torchrun)."""
        return unwrap(self.model)

    def record(self, kind: str, values: dict[str, Any]) -> None:
        """One line of `metrics.jsonl` and the numeric values in TensorBoard, at this step
        (rank 0 only: the values are the job's global figures)."""
        if not self.world.is_main:
            return
        assert self.metrics is not None
        self.metrics.write(json.dumps({"kind": kind, "step": self.step, **values}) + "\n")
        self.metrics.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.board.add_scalar(f"{kind}/{name}", value, self.step)


@dataclass
class Step:
    """One optimizer step's micro-batches on this rank, and the whole step's figures."""

    micro: list[Batch]
    """This rank's micro-batches, padded with empty ones to the step's most on any rank."""
    positions: int
    """Distilled positions of the step: every micro-batch of every rank (the divisor)."""
    tokens: int
    """Real tokens of the step, every rank."""


def identities(
    cfg: TrainConfig, cache: Cache, eval_cache: Cache | None, student: Any
) -> dict[str, str]:
    """What every rank of a job must share: each setting (flag), the caches' content and the
    student's weights (paths may differ, say node-local copies: their content is compared)."""
    by_content = ("cache", "eval_cache", "student")
    same = {flag(k): repr(v) for k, v in saved(cfg).items() if k not in by_content}
    return {
        **same,
        "training cache": cache_identity(cache),
        "eval cache": cache_identity(eval_cache) if eval_cache is not None else "none",
        "student weights": student_checksum(student),
    }


def plan_steps(cfg: TrainConfig, batcher: TokenBatcher, world: World) -> tuple[int, int | None]:
    """(optimizer steps, epochs): `--max-steps` (the streams never end), or the steps that
    `epochs` passes take on the rank with the most batches (each rank passes over its part)."""
    if cfg.max_steps is not None:
        return cfg.max_steps, None
    per_epoch = sum(1 for _ in batcher.epoch_plans(0))
    steps = math.ceil(per_epoch * cfg.epochs / cfg.grad_accum)
    return int(world.max([steps])[0]), cfg.epochs


def setup(cfg: TrainConfig, world: World | None = None, held: ExitStack | None = None) -> Run:
    """Load and check the student and caches, prepare the run folder, build the optimizer,
    schedule and scaler, and resume from the newest checkpoint when there is one. `world`:
    this rank of a torchrun job (`init_world`); None: one process on `cfg.device`. With
    `held`, the run folder's lock (`run_lock`, one job per folder) is taken on rank 0 before
    anything is written into the folder, and held until `held` closes."""
    validated(cfg)  # checked where built; in code, here
    world = world or World(device=pick_device(cfg.device))
    device = world.device
    settings = StepSettings.of(cfg)
    autocast_for(cfg.precision, device)  # fails now, naming the flag, where it cannot run
    if world.size > 1 and cfg.parallel == "fsdp" and cfg.precision == "fp16":
        raise RlkdError(
            "--precision fp16 does not work with --parallel fsdp (the loss scaler cannot see "
            "sharded gradients): use --precision bf16"
        )
    lora.check_device_needs(cfg, device)
    if world.size > 1 and (cfg.lora_r or cfg.optimizer != "adamw"):
        raise RlkdError(
            "--lora-r and --optimizer other than adamw train in one process for now, not under "
            "torchrun: run `rlkd train` without torchrun"
        )
    cache = cfg.open_cache(cfg.cache)
    eval_cache = cfg.open_cache(cfg.eval_cache) if cfg.eval_cache else None
    torch.manual_seed(cfg.seed)
    student, tokenizer = load_student(
        cfg.student, device, lora.base_dtype(cfg), lora.quantization(cfg)
    )
    check_compatible(cache, tokenizer, student, cfg.rank_k, "training")
    if eval_cache is not None:
        check_compatible(eval_cache, tokenizer, student, cfg.rank_k, "eval")
    if world.size > 1:
        world.agree(identities(cfg, cache, eval_cache, student))
    student = lora.adapt(student, cfg)
    trainable, total = lora.counts(student)
    if world.is_main:
        log.info(
            "training %s of %s parameters (%.2f%%)%s",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
            f": LoRA r={cfg.lora_r} on {cfg.lora_targets}" if cfg.lora_r else "",
        )

    def claim() -> list[Path]:
        if held is not None:
            held.enter_context(run_lock(cfg.output))
        counted = {
            "trainable_parameters": trainable,
            "parameters": total,
            "trainable_share": round(trainable / total, 6),
        }
        return prepare_run_dir(cfg, world.size, counted)

    resume_from = world.on_main(claim)
    if cfg.gradient_checkpointing:  # non-reentrant: the frozen embedding gives no input grad
        kwargs = {"use_reentrant": False} if cfg.lora_r else None
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    student.config.use_cache = False
    student.train()
    stream = CacheStream(
        cache,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        rank=world.rank,
        world_size=world.size,
        prefetch=cfg.prefetch_shards,
    )
    batcher = TokenBatcher(stream, batch_tokens=cfg.batch_tokens)
    total_steps, epochs = plan_steps(cfg, batcher, world)
    model = wrap(student, cfg.parallel, world)
    optimizer = lora.optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, cfg.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    run = Run(
        cfg, Path(cfg.output), device, model, tokenizer, settings, batcher, optimizer,
        scheduler, scaler, total_steps, epochs, eval_cache, world,
    )  # fmt: skip
    resume(run, resume_from, strict=cfg.resume not in ("auto", "never"))
    return run


def resume(run: Run, candidates: list[Path], strict: bool) -> None:
    """Restore weights, optimizer, schedule, scaler, RNG and reader position from the first
    of `candidates` that loads. `strict` (a checkpoint named by `--resume`): it must load.
    Otherwise a damaged newest checkpoint is skipped with a warning naming it."""
    for checkpoint in candidates:
        try:
            tensors, trainer = load_checkpoint(checkpoint, run.device)
        except RlkdError as e:
            if strict:
                raise
            log.warning("skipping a damaged checkpoint: %s; trying an older one", e)
            continue
        restore(run, checkpoint, tensors, trainer)
        return
    if candidates:
        log.warning("no checkpoint of %s could be loaded: starting from step 0", run.folder)


def restore(run: Run, checkpoint: Path, tensors: dict[str, Any], trainer: dict[str, Any]) -> None:
    """Load a checkpoint's state into `run` (this rank's RNG and reader position)."""
    if run.cfg.lora_r:  # one process: the adapters and their optimizer state
        lora.load_trained(run.student, tensors["model"], run.cfg, checkpoint)
        run.optimizer.load_state_dict(tensors["optimizer"])
    else:
        load_weights(checkpoint, tensors, run.model, run.optimizer)
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.scaler.load_state_dict(tensors["scaler"])
    rng, batcher = rank_state(tensors, trainer, run.world.rank)
    set_rng_state(rng)
    run.batcher.load_state_dict(batcher)
    run.step = int(trainer["step"])
    run.last_good = checkpoint
    log.info("resuming from %s (step %d)", checkpoint, run.step)


def save(run: Run) -> None:
    """Write a checkpoint of this step (the newest `keep_last` are kept); under torchrun
    every rank calls this (`dist_checkpoint.save_ranks`)."""
    common = {"scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict()}
    if run.world.size > 1:
        run.last_good = save_ranks(
            run.folder, run.step, run.world, run.model, run.optimizer, common,
            run.batcher.state_dict(), run.cfg.keep_last,
        )  # fmt: skip
        return
    tensors = {
        "model": lora.trained_state(run.student, run.cfg),
        "optimizer": run.optimizer.state_dict(),
        **common,
        "rng": rng_state(),
    }
    trainer = {"batcher": run.batcher.state_dict()}
    run.last_good = save_checkpoint(run.folder, run.step, tensors, trainer, run.cfg.keep_last)


def held_out(run: Run) -> None:
    """Evaluate on the eval cache, if there is one, and record the result (distributed under
    torchrun: each rank its part of the eval cache; global figures)."""
    if run.eval_cache is None:
        return
    result = evaluate(
        run.model, run.eval_cache, run.settings, batch_tokens=run.cfg.batch_tokens, world=run.world
    )
    run.record("eval", result)
    if run.world.is_main:
        log.info(
            "eval at step %d: kl %.4f, top-1 %.4f, loss %.4f",
            run.step,
            result["kl"],
            result["top1"],
            result["loss"],
        )


def one_step(run: Run, step: Step) -> tuple[dict[str, float], float]:
    """One optimizer step over this rank's micro-batches of `step`; (the step's loss parts,
    per position over all ranks, and the gradient norm)."""
    micro = [b.to(run.device) for b in step.micro]
    try:
        mine = train_step(run.model, micro, run.settings, run.scaler, step.positions)
    except NonFiniteLoss as e:
        where = run.last_good or "none (none saved yet)"
        raise RlkdError(
            f"{e} at step {run.step + 1}; stopped. The last good checkpoint is {where}"
        ) from None
    grad_norm = optimizer_step(run.model, run.optimizer, run.scaler, run.scheduler, run.cfg.clip)
    names = (*PARTS, "loss")
    parts = dict(zip(names, run.world.sum([mine[name] for name in names]), strict=True))
    run.step += 1
    run.tokens_seen += step.tokens
    return {**parts, "positions": step.positions}, grad_norm


def padding_fraction(run: Run) -> float:
    """Padded slots / all slots of the batches trained on so far, all ranks."""
    slots, padded = run.world.sum([run.batcher.padding.slots, run.batcher.padding.padded])
    return padded / slots if slots else 0.0


def after_step(run: Run, parts: dict[str, float], grad_norm: float) -> None:
    """Log, evaluate and save as configured after the step just taken."""
    cfg, step, last = run.cfg, run.step, run.step == run.total_steps
    if step % cfg.log_every == 0 or last:
        run.record(
            "train",
            {
                **parts,
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": run.tokens_seen / max(time.time() - run.started, 1e-9),
                "epoch": run.batcher.epoch,
                "padding_fraction": padding_fraction(run),
            },
        )
    if step % cfg.eval_every == 0 and not last:
        held_out(run)
    if step % cfg.save_every == 0 or last:
        save(run)


def step_batches(run: Run) -> Iterator[Step]:
    """Each optimizer step's micro-batches until the steps or epochs are done: up to
    `grad_accum` from this rank's part; a step runs while any rank has one, with empty
    micro-batches padding a rank to the step's most (see the module docstring)."""
    batches = run.batcher.batches(run.epochs)
    pad = empty_batch(run.batcher.stream.cache.k)
    while run.step < run.total_steps:
        micro = [b for _, b in zip(range(run.cfg.grad_accum), batches, strict=False)]
        most = int(run.world.max([len(micro)])[0])
        if not most:
            return
        mine = [sum(b.n_positions for b in micro), sum(b.n_tokens for b in micro)]
        positions, tokens = (int(v) for v in run.world.sum(mine))
        yield Step(micro + [pad] * (most - len(micro)), positions, tokens)


def run_steps(run: Run, progress: bool) -> None:
    """The optimizer steps, with a progress bar (rank 0) when `progress`."""
    from tqdm import tqdm

    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        unit="step",
        desc="rlkd train",
        disable=not progress or not run.world.is_main,
        dynamic_ncols=True,
    )
    try:
        for step in step_batches(run):
            parts, grad_norm = one_step(run, step)
            rate = run.tokens_seen / max(time.time() - run.started, 1e-9)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {parts['loss']:.4f} kd {parts['kd']:.4f} rank {parts['rank']:.4f} "
                f"{rate:,.0f} tok/s"
            )
            after_step(run, parts, grad_norm)
    finally:
        bar.close()


def save_final(run: Run) -> Path:
    """The final student in `final/` with `save_pretrained` (rank 0; under FSDP2 its whole
    state gathered from the shards first), loadable with plain transformers; of a LoRA run,
    the adapter and with `--merge` the merged model (`lora.save_final`)."""
    final = run.folder / "final"
    state = full_state(run.model)  # every rank takes part in the gather
    if run.world.is_main and run.cfg.lora_r:
        lora.save_final(run.student, run.tokenizer, final, run.cfg)
    elif run.world.is_main:
        run.student.save_pretrained(final, state_dict=state)
        run.tokenizer.save_pretrained(final)
    if run.world.is_main:
        log.info("trained %d steps; final student in %s", run.step, final)
    run.world.barrier()
    return final


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run training as configured, in one process or on every rank of a torchrun job;
    return the folder of the final student."""
    from torch.utils.tensorboard import SummaryWriter

    world = init_world(validated(cfg).device)
    with ExitStack() as held:
        run = setup(cfg, world, held)
        if world.is_main:
            run.board = SummaryWriter(str(run.folder / "tensorboard"))
            run.metrics = (run.folder / "metrics.jsonl").open("a")
        if run.step == 0:
            held_out(run)
        run_steps(run, progress)
        held_out(run)
        if world.is_main:
            run.metrics.close()
            run.board.close()
        final = save_final(run)
    world.close()  # not on an error: torchrun ends the job, and NCCL's teardown could hang
    return final
