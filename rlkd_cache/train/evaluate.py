"""Held-out evaluation during training: KL, top-1 agreement and loss parts on a cache.

A deterministic pass over the whole eval cache through the training step's own
`micro_step` (same forward, precision and objective as training, without backward); KL and
top-1 are then built from its hidden states a chunk of positions at a time. KL is the
forward KL with the tail bucket at temperature 1 (whatever the training loss).

Under torchrun the evaluation is distributed: each rank evaluates its own disjoint part of
the eval cache (the reader's rank partition) through the wrapped model (FSDP2 needs every
rank in every forward; ranks that run out pad with empty batches), and the sums and the
count are all-reduced, so every rank gets the figures of the whole cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlkd_cache.losses import kd_loss
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import Batch, TokenBatcher
from rlkd_cache.train.distributed import World, call, empty_batch, lockstep
from rlkd_cache.train.step import PARTS, StepSettings, micro_step
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import lm_head

SUMS = ("kl", "top1", *PARTS, "loss")
"""What `batch_sums` adds up over a batch's distilled positions."""


def batch_sums(student: Any, batch: Batch, settings: StepSettings) -> dict[str, float]:
    """The sums over one batch's distilled positions of every figure in `SUMS`."""
    out = micro_step(student, batch, settings)
    sums = {name: float(getattr(out.sums, name)) for name in PARTS}
    sums["loss"] = float(out.sums.total)
    sums["kl"] = sums["top1"] = 0.0
    head = lm_head(student)
    chunk = settings.chunk_size
    for start in range(0, batch.n_positions, chunk):
        logits = head.logits(out.hidden[start : start + chunk])  # (n, V)
        topk_ids = batch.topk_ids[start : start + chunk]  # (n, k)
        topk_logprobs = batch.topk_logprobs[start : start + chunk]  # (n, k)
        sums["kl"] += float(kd_loss(logits, topk_ids, topk_logprobs, kind="fkl").total)
        sums["top1"] += float((logits.argmax(-1) == topk_ids[:, 0]).sum())
    return sums


@torch.no_grad()
def evaluate(
    model: Any,
    cache: Cache,
    settings: StepSettings,
    *,
    batch_tokens: int,
    world: World | None = None,
) -> dict[str, float]:
    """Per-position means over the cache: kl, top1 (agreement with the teacher's argmax),
    kd, rank, ce, loss (the training objective), ppl (exp ce), and the count `positions`.
    `model` is the student or its `distributed.wrap` wrapper; `world` the job (None: one
    process)."""
    world = world or World()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = CacheStream(cache, seed=0, shuffle_buffer=1, rank=world.rank, world_size=world.size)
    batcher = TokenBatcher(stream, batch_tokens=batch_tokens)
    sums = dict.fromkeys(SUMS, 0.0)
    count = 0
    for batch in lockstep(batcher.epoch_batches(0), world, empty_batch(cache.k)):
        part = call(model, batch_sums, batch.to(device), settings)
        for name in SUMS:
            sums[name] += part[name]
        count += batch.n_positions
    model.train(was_training)
    *totals, positions = world.sum([*(sums[name] for name in SUMS), count])
    out_means = {name: value / max(positions, 1) for name, value in zip(SUMS, totals, strict=True)}
    out_means["ppl"] = math.exp(min(out_means["ce"], 700.0))
    out_means["positions"] = int(positions)
    return out_means
