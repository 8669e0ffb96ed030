"""`rlkd train`: stream a cache and train a student with KL + the RLKD ranking loss.

No teacher in memory: the cache supplies the teacher's top-k per position. `train` sets up a
`Run` (student, reader, optimizer, schedule, loss scaler, resumed from a checkpoint when
there is one), then loops over optimizer steps: each takes `grad_accum` token-budget
micro-batches through `step.train_step` (every loss sum divided once by the step's count of
distilled positions) and `step.optimizer_step` (clip, AdamW, schedule), then logs, evaluates
and saves as configured. Metrics go to `metrics.jsonl` and TensorBoard; checkpoints (model,
optimizer, schedule, scaler, RNG, reader position) make a killed run resumable to the same
weights; the final student is saved with `save_pretrained` in `final/`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from rlkd_cache.config import TrainConfig, pick_device, validated
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.atomic import write_json_atomic
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import Batch, TokenBatcher
from rlkd_cache.train.checkpoint import (
    checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rlkd_cache.train.evaluate import evaluate
from rlkd_cache.train.step import (
    NonFiniteLoss,
    StepSettings,
    autocast_for,
    optimizer_step,
    train_step,
)
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import check_compatible, load_student

log = logging.getLogger("rlkd.train")

NOT_RUN_DEFINING = (
    "output",
    "resume",
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "keep_last",
    "log_every",
    "device",
    "eval_cache",
)
"""Config keys that may differ when a run is continued."""


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The run-defining keys in which a run folder's saved `config.json` differs from `cfg`.
    A key the saved config lacks (written by an rlkd that had no such option) counts as the
    option's default, so adding an option does not orphan existing runs."""
    defaults = asdict(TrainConfig())
    return sorted(
        k
        for k, value in asdict(cfg).items()
        if k not in NOT_RUN_DEFINING and saved.get(k, defaults[k]) != value
    )


def prepare_run_dir(cfg: TrainConfig) -> list[Path]:
    """Create the run folder; return the checkpoints to resume from, best first: the one
    `--resume` names, or with `auto` the run's own, newest first (none for a new run)."""
    run = Path(cfg.output)
    if run.exists() and not run.is_dir():
        raise RlkdError(f"--output {run}: a file is there; expected a run folder (new or not)")
    saved_path = run / "config.json"
    resolved = asdict(cfg)
    if cfg.resume not in ("auto", "never"):
        checkpoint = Path(cfg.resume)
        if not (checkpoint / "trainer.json").is_file():
            raise RlkdError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer.json)")
    elif saved_path.is_file():
        differs = config_differences(json.loads(saved_path.read_text()), cfg)
        if cfg.resume == "never" or differs:
            what = f" (differs in: {', '.join(differs)})" if differs else ""
            raise RlkdError(
                f"{run} holds another run's config{what}: choose another --output, or pass "
                "--resume auto with the same settings, or --resume CHECKPOINT to continue from it"
            )
        candidates = checkpoints(run)[::-1]
    else:
        candidates = []
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, resolved)
    return [checkpoint] if cfg.resume not in ("auto", "never") else candidates


@dataclass
class Run:
    """A training run's live state: what the loop advances and a checkpoint saves."""

    cfg: TrainConfig
    folder: Path
    device: torch.device
    model: Any
    tokenizer: Any
    settings: StepSettings
    batcher: TokenBatcher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int
    epochs: int | None
    eval_cache: Cache | None
    step: int = 0
    last_good: Path | None = None
    """The newest checkpoint written or resumed from (named when a loss turns non-finite)."""
    metrics: IO[str] | None = None
    board: Any = None
    tokens_seen: int = 0
    started: float = field(default_factory=time.time)

    def record(self, kind: str, values: dict[str, Any]) -> None:
        """One line of `metrics.jsonl` and the numeric values in TensorBoard, at this step."""
        assert self.metrics is not None
        self.metrics.write(json.dumps({"kind": kind, "step": self.step, **values}) + "\n")
        self.metrics.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.board.add_scalar(f"{kind}/{name}", value, self.step)


def setup(cfg: TrainConfig) -> Run:
    """Load and check the student and caches, prepare the run folder, build the optimizer,
    schedule and scaler, and resume from the newest checkpoint when there is one."""
    device = pick_device(validated(cfg).device)  # checked where built; in code, here
    settings = StepSettings.of(cfg)
    autocast_for(cfg.precision, device)  # fails now, naming the flag, where it cannot run
    cache = Cache(cfg.cache)
    eval_cache = Cache(cfg.eval_cache) if cfg.eval_cache else None
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg.student, device)
    check_compatible(cache, tokenizer, model, cfg.rank_k, "training")
    if eval_cache is not None:
        check_compatible(eval_cache, tokenizer, model, cfg.rank_k, "eval")
    resume_from = prepare_run_dir(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    batcher = TokenBatcher(
        CacheStream(cache, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer),
        batch_tokens=cfg.batch_tokens,
    )
    if cfg.max_steps is not None:
        total_steps, epochs = cfg.max_steps, None
    else:
        per_epoch = sum(1 for _ in batcher.epoch_plans(0))
        total_steps, epochs = math.ceil(per_epoch * cfg.epochs / cfg.grad_accum), cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, cfg.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    run = Run(
        cfg, Path(cfg.output), device, model, tokenizer, settings, batcher, optimizer,
        scheduler, scaler, total_steps, epochs, eval_cache,
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
    """Load a checkpoint's state into `run`."""
    run.model.load_state_dict(tensors["model"])
    run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.scaler.load_state_dict(tensors["scaler"])
    set_rng_state(tensors["rng"])
    run.batcher.load_state_dict(trainer["batcher"])
    run.step = int(trainer["step"])
    run.last_good = checkpoint
    log.info("resuming from %s (step %d)", checkpoint, run.step)


def save(run: Run) -> None:
    """Write a checkpoint of this step (the newest `keep_last` are kept)."""
    tensors = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
    }
    trainer = {"batcher": run.batcher.state_dict()}
    run.last_good = save_checkpoint(run.folder, run.step, tensors, trainer, run.cfg.keep_last)


def held_out(run: Run) -> None:
    """Evaluate on the eval cache, if there is one, and record the result."""
    if run.eval_cache is None:
        return
    result = evaluate(run.model, run.eval_cache, run.settings, batch_tokens=run.cfg.batch_tokens)
    run.record("eval", result)
    log.info(
        "eval at step %d: kl %.4f, top-1 %.4f, loss %.4f",
        run.step,
        result["kl"],
        result["top1"],
        result["loss"],
    )


def one_step(run: Run, micro: list[Batch]) -> tuple[dict[str, float], float]:
    """One optimizer step over `micro` (the step's micro-batches); (loss parts, grad norm)."""
    micro = [b.to(run.device) for b in micro]
    try:
        parts = train_step(run.model, micro, run.settings, run.scaler)
    except NonFiniteLoss as e:
        where = run.last_good or "none (none saved yet)"
        raise RlkdError(
            f"{e} at step {run.step + 1}; stopped. The last good checkpoint is {where}"
        ) from None
    grad_norm = optimizer_step(run.model, run.optimizer, run.scaler, run.scheduler, run.cfg.clip)
    run.step += 1
    run.tokens_seen += sum(b.n_tokens for b in micro)
    return parts, grad_norm


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
                "padding_fraction": run.batcher.padding.fraction(),
            },
        )
    if step % cfg.eval_every == 0 and not last:
        held_out(run)
    if step % cfg.save_every == 0 or last:
        save(run)


def step_batches(run: Run) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step until the steps or epochs are done."""
    batches = run.batcher.batches(run.epochs)
    while run.step < run.total_steps:
        micro = [b for _, b in zip(range(run.cfg.grad_accum), batches, strict=False)]
        if not micro:
            return
        yield micro


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run training as configured; return the folder of the final student."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    run = setup(cfg)
    run.board = SummaryWriter(str(run.folder / "tensorboard"))
    run.metrics = (run.folder / "metrics.jsonl").open("a")
    if run.step == 0:
        held_out(run)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        unit="step",
        desc="rlkd train",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for micro in step_batches(run):
            parts, grad_norm = one_step(run, micro)
            rate = run.tokens_seen / max(time.time() - run.started, 1e-9)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {parts['loss']:.4f} kd {parts['kd']:.4f} rank {parts['rank']:.4f} "
                f"{rate:,.0f} tok/s"
            )
            after_step(run, parts, grad_norm)
    finally:
        bar.close()
    held_out(run)
    run.metrics.close()
    run.board.close()
    final = run.folder / "final"
    run.model.save_pretrained(final)
    run.tokenizer.save_pretrained(final)
    log.info("trained %d steps; final student in %s", run.step, final)
    return final
