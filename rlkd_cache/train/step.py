"""The training step, in one place: what `rlkd train`, its held-out eval and the benchmarks run.

- `student_hidden`: the student's decoder under the precision's autocast, then its final
  hidden states at the distilled positions, (B, T) -> (N, H). The LM head is not applied
  here: `distill_loss` applies it a chunk of positions at a time, so (N, V) logits never
  exist at once.
- `micro_step`: `student_hidden` + `distill_loss` over one batch's cached teacher top-k.
  Returns the loss SUMS (the reduction rule of `losses/reduction.py`) and the hidden states.
- `train_step`: one optimizer step's micro-batches: each `micro_step`'s total is divided once
  by the count of distilled positions of the whole step and backpropagated (through the fp16
  loss scaler), then the parts are checked finite; `optimizer_step` unscales, clips, steps
  the optimizer, the scaler and the schedule.

Under torchrun the same `train_step` runs on every rank with the student wrapped by
`distributed.wrap` (DDP or FSDP2, gradients summed over ranks) and the step's GLOBAL count
(all ranks, all micro-batches, all-reduced by the loop before any backward), so the summed
gradient is the one-process gradient of the whole global batch.

`benchmarks/train_step.py` times `train_step` + `optimizer_step` themselves, and a test checks
that the loop and the benchmark hold the same function objects.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from rlkd_cache.config import Precision
from rlkd_cache.errors import RlkdError
from rlkd_cache.losses import LossConfig, LossSums, TeacherTopK, distill_loss
from rlkd_cache.train.batching import Batch
from rlkd_cache.train.distributed import call, grad_sync
from rlkd_cache.train.student import hidden_at, lm_head

PARTS = ("kd", "rank", "ce")
"""The loss terms logged per step, besides their weighted total `loss`."""


class NonFiniteLoss(RlkdError):
    """A loss term came out NaN or infinite; no optimizer step was taken with it."""


@dataclass(frozen=True)
class StepSettings:
    """How a micro-step computes its loss (the loss half of `TrainConfig`)."""

    losses: LossConfig
    """Which loss terms, with which weights and parameters."""
    chunk_size: int = 256
    """Positions per chunk of the LM head + loss (peak memory ~ chunk_size x vocab)."""
    precision: Precision = "fp32"
    """Autocast precision of the student forward (see `autocast_for`, `head_matmul_dtype`)."""

    @classmethod
    def of(cls, cfg: Any) -> StepSettings:
        """The settings of a `TrainConfig` (any object with the loss fields and these)."""
        losses = LossConfig(**{f.name: getattr(cfg, f.name) for f in fields(LossConfig)})
        return cls(losses=losses, chunk_size=cfg.chunk_size, precision=cfg.precision)


@dataclass
class StepOutput:
    """One micro-batch's loss sums and the hidden states they were computed from."""

    sums: LossSums
    """Loss sums over the batch's distilled positions (not divided)."""
    hidden: Tensor
    """(N, H) the student's final hidden states at the distilled positions."""


def autocast_for(precision: Precision, device: torch.device) -> Callable[[], Any]:
    """A factory of the autocast context for `precision` on `device` (fp16 needs CUDA)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise RlkdError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def head_matmul_dtype(precision: Precision) -> torch.dtype | None:
    """dtype of the chunked LM head's matmuls: bf16 under bf16 autocast, as for the student's
    other layers. fp16 keeps them in fp32: the head's gradients are formed in the forward,
    before the loss scaler could keep their small values from flushing to zero in fp16."""
    return torch.bfloat16 if precision == "bf16" else None


def student_hidden(model: Any, batch: Batch, precision: Precision = "fp32") -> Tensor:
    """The student's final hidden states at `batch`'s distilled positions: (N, H)."""
    with autocast_for(precision, batch.input_ids.device)():
        return hidden_at(model, batch.input_ids, batch.attention_mask, batch.row, batch.pos)


def teacher_of(batch: Batch) -> TeacherTopK:
    """The cached teacher side of `batch`, as the losses take it."""
    return TeacherTopK(batch.topk_ids, batch.topk_logprobs, batch.target_ids, batch.target_logprobs)


def micro_step(model: Any, batch: Batch, settings: StepSettings) -> StepOutput:
    """Student forward + the whole distillation objective on one batch (no backward)."""
    hidden = student_hidden(model, batch, settings.precision)  # (N, H)
    head = lm_head(model)  # (V, H) weight, (V,) bias or None, a LoRA adapter or None
    sums = distill_loss(
        hidden,
        head.weight,
        head.bias,
        teacher_of(batch),
        None,
        settings.losses,
        chunk_size=settings.chunk_size,
        matmul_dtype=head_matmul_dtype(settings.precision),
        low=head.low_rank(hidden),
    )
    return StepOutput(sums=sums, hidden=hidden)


def train_step(
    model: Any,
    micro: Sequence[Batch],
    settings: StepSettings,
    scaler: torch.amp.GradScaler,
    count: int | None = None,
) -> dict[str, float]:
    """Forward and backward of one optimizer step's micro-batches (already on the device).

    Every loss sum is divided once by `count`, the step's count of distilled positions: over
    all micro-batches of all ranks under torchrun (the caller all-reduces it), or with None
    over `micro` (one process). So accumulation and data parallelism give the gradient of
    one big batch. `model` is the student, or its `distributed.wrap` wrapper: then each
    micro-batch runs through the wrapper's forward and gradients are synchronized across
    ranks on the last micro-batch only. Returns this call's share of the per-position means
    `kd`, `rank`, `ce`, `loss` (its sums / `count`: the ranks' shares add up to the global
    means) and `positions` = `count`; raises `NonFiniteLoss` naming the term when one is not
    finite (before any optimizer step).
    """
    count = sum(b.n_positions for b in micro) if count is None else count
    parts = dict.fromkeys((*PARTS, "loss"), 0.0)
    for i, batch in enumerate(micro):
        with grad_sync(model, sync=i == len(micro) - 1):
            sums = call(model, micro_step, batch, settings).sums
            for name in PARTS:
                parts[name] += float(getattr(sums, name)) / max(count, 1)
            parts["loss"] += float(sums.total.detach()) / max(count, 1)
            scaler.scale(sums.total / max(count, 1)).backward()
    for name in (*PARTS, "loss"):
        if not math.isfinite(parts[name]):
            raise NonFiniteLoss(f"non-finite {name} loss ({parts[name]})")
    return {**parts, "positions": count}


def optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any | None,
    clip: float,
) -> float:
    """Unscale, clip (when `clip` > 0), step the optimizer, the scaler and the schedule;
    clear the gradients. Returns the gradient norm before clipping (nan without clipping)."""
    grad_norm = float("nan")
    if clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return grad_norm
