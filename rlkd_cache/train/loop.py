"""`rlkd train`: stream a cache and train a student with KL + the RLKD ranking loss.

No teacher in memory: the cache supplies the teacher's top-k per position. Each optimizer
step takes `grad_accum` token-budget micro-batches, divides every loss sum once by the step's
count of distilled positions, clips, steps AdamW and the schedule. Metrics go to
`metrics.jsonl` and TensorBoard; checkpoints (model, optimizer, schedule, RNG, reader
position) make a killed run resumable to the same weights; the final student is saved with
`save_pretrained` in `final/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.config import TrainConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.losses import LossConfig, TeacherTopK, distill_loss
from rlkd_cache.store.manifest import write_json_atomic
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
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import check_compatible, hidden_at, lm_head, load_student

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


def loss_config(cfg: TrainConfig) -> LossConfig:
    names = {f.name for f in fields(LossConfig)}
    return LossConfig(**{k: v for k, v in asdict(cfg).items() if k in names})


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


def autocast_for(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise RlkdError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return lambda: torch.autocast(device.type, dtype=dtype)


def head_matmul_dtype(precision: str) -> torch.dtype | None:
    """dtype of the chunked LM head's matmuls: bf16 under bf16 autocast, as for the student's
    other layers. fp16 keeps them in fp32: the head's gradients are formed in the forward,
    before the loss scaler could keep their small values from flushing to zero in fp16."""
    return torch.bfloat16 if precision == "bf16" else None


def prepare_run_dir(cfg: TrainConfig) -> Path | None:
    """Create the run folder; return the checkpoint to resume from, if any."""
    run = Path(cfg.output)
    saved_path = run / "config.json"
    resolved = asdict(cfg)
    if cfg.resume not in ("auto", "never"):
        checkpoint = Path(cfg.resume)
        if not (checkpoint / "trainer.json").is_file():
            raise RlkdError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer.json)")
    elif saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        differs = sorted(
            k for k in resolved if k not in NOT_RUN_DEFINING and saved.get(k) != resolved[k]
        )
        if cfg.resume == "never" or differs:
            what = f" (differs in: {', '.join(differs)})" if differs else ""
            raise RlkdError(
                f"{run} holds another run's config{what}: choose another --output, or pass "
                "--resume auto with the same settings, or --resume CHECKPOINT to continue from it"
            )
        found = checkpoints(run)
        checkpoint = found[-1] if found else None
    else:
        checkpoint = None
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, resolved)
    return checkpoint


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run training as configured; return the folder of the final student."""
    from tqdm import tqdm

    if not cfg.cache or not cfg.student or not cfg.output:
        raise RlkdError("--cache, --student and --output are required")
    if cfg.grad_accum < 1 or cfg.batch_tokens < 2 or cfg.lr <= 0:
        raise RlkdError("--grad-accum must be >= 1, --batch-tokens >= 2 and --lr > 0")
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    losses = loss_config(cfg)
    cache = Cache(cfg.cache)
    eval_cache = Cache(cfg.eval_cache) if cfg.eval_cache else None
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_student(cfg.student, device)
    check_compatible(cache, tokenizer, model, cfg.rank_k, "training")
    if eval_cache is not None:
        check_compatible(eval_cache, tokenizer, model, cfg.rank_k, "eval")
    resume_from = prepare_run_dir(cfg)
    run = Path(cfg.output)
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
    autocast = autocast_for(cfg.precision, device)
    step = 0
    if resume_from is not None:
        tensors, trainer = load_checkpoint(resume_from, device)
        model.load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        scaler.load_state_dict(tensors["scaler"])
        set_rng_state(tensors["rng"])
        batcher.load_state_dict(trainer["batcher"])
        step = int(trainer["step"])
        log.info("resuming from %s (step %d)", resume_from, step)

    from torch.utils.tensorboard import SummaryWriter

    board = SummaryWriter(str(run / "tensorboard"))
    metrics_file = (run / "metrics.jsonl").open("a")
    weight, bias = lm_head(model)

    def record(kind: str, values: dict[str, Any]) -> None:
        metrics_file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        metrics_file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                board.add_scalar(f"{kind}/{name}", value, step)

    def run_eval() -> None:
        if eval_cache is not None:
            result = evaluate(
                model,
                eval_cache,
                losses,
                batch_tokens=cfg.batch_tokens,
                chunk_size=cfg.chunk_size,
                device=device,
                autocast=autocast,
            )
            record("eval", result)
            log.info(
                "eval at step %d: kl %.4f, top-1 %.4f, loss %.4f",
                step,
                result["kl"],
                result["top1"],
                result["loss"],
            )

    def checkpoint() -> Path:
        tensors = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }
        return save_checkpoint(run, step, tensors, {"batcher": batcher.state_dict()}, cfg.keep_last)

    if step == 0:
        run_eval()
    batches = batcher.batches(epochs)
    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        desc="rlkd train",
        disable=not progress,
        dynamic_ncols=True,
    )
    t0, tokens_seen = time.time(), 0
    last_good = resume_from
    try:
        while step < total_steps:
            micro: list[Batch] = [b for _, b in zip(range(cfg.grad_accum), batches, strict=False)]
            if not micro:
                break
            count = sum(b.n_positions for b in micro)
            parts = {"kd": 0.0, "rank": 0.0, "ce": 0.0, "loss": 0.0}
            for batch in micro:
                batch = batch.to(device)
                with autocast():
                    hidden = hidden_at(
                        model, batch.input_ids, batch.attention_mask, batch.row, batch.pos
                    )
                teacher = TeacherTopK(
                    batch.topk_ids, batch.topk_logprobs, batch.target_ids, batch.target_logprobs
                )
                sums = distill_loss(
                    hidden,
                    weight,
                    bias,
                    teacher,
                    None,
                    losses,
                    chunk_size=cfg.chunk_size,
                    matmul_dtype=head_matmul_dtype(cfg.precision),
                )
                for name in ("kd", "rank", "ce"):
                    value = float(getattr(sums, name))
                    if not math.isfinite(value):
                        raise RlkdError(
                            f"non-finite {name} loss ({value}) at step {step + 1}; stopped. "
                            f"The last good checkpoint is {last_good or 'none (none saved yet)'}"
                        )
                    parts[name] += value / count
                parts["loss"] += float(sums.total.detach()) / count
                scaler.scale(sums.total / count).backward()
                tokens_seen += batch.n_tokens
            if cfg.clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
            else:
                grad_norm = float("nan")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            rate = tokens_seen / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {parts['loss']:.4f} kd {parts['kd']:.4f} rank {parts['rank']:.4f} "
                f"{rate:,.0f} tok/s"
            )
            if step % cfg.log_every == 0 or step == total_steps:
                record(
                    "train",
                    {
                        **parts,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "positions": count,
                        "tokens_per_s": rate,
                        "epoch": batcher.epoch,
                        "padding_fraction": batcher.padding.fraction(),
                    },
                )
            if step % cfg.eval_every == 0 and step != total_steps:
                run_eval()
            if step % cfg.save_every == 0 or step == total_steps:
                last_good = checkpoint()
    finally:
        bar.close()
    run_eval()
    metrics_file.close()
    board.close()
    final = run / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    log.info("trained %d steps; final student in %s", step, final)
    return final
