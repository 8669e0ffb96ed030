"""Held-out evaluation during training: KL, top-1 agreement and loss parts on a cache.

A deterministic pass over the whole eval cache through the training step's own
`micro_step` (same forward, precision and objective as training, without backward); KL and
top-1 are then built from its hidden states a chunk of positions at a time. KL is the
forward KL with the tail bucket at temperature 1 (whatever the training loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlkd_cache.losses import kd_loss
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import TokenBatcher
from rlkd_cache.train.step import PARTS, StepSettings, micro_step
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import lm_head


@torch.no_grad()
def evaluate(
    model: Any, cache: Cache, settings: StepSettings, *, batch_tokens: int
) -> dict[str, float]:
    """Per-position means over the cache: kl, top1 (agreement with the teacher's argmax),
    kd, rank, ce, loss (the training objective), ppl (exp ce), and the count `positions`."""
    was_training = model.training
    model.eval()
    weight, bias = lm_head(model)  # (V, H), (V,) or None
    chunk = settings.chunk_size
    sums = dict.fromkeys(("kl", "top1", *PARTS, "loss"), 0.0)
    count = 0
    batcher = TokenBatcher(CacheStream(cache, seed=0, shuffle_buffer=1), batch_tokens=batch_tokens)
    for batch in batcher.epoch_batches(0):
        batch = batch.to(weight.device)
        out = micro_step(model, batch, settings)
        for name in PARTS:
            sums[name] += float(getattr(out.sums, name))
        sums["loss"] += float(out.sums.total)
        for start in range(0, batch.n_positions, chunk):
            logits = torch.nn.functional.linear(
                out.hidden[start : start + chunk], weight, bias
            ).float()  # (n, V)
            topk_ids = batch.topk_ids[start : start + chunk]  # (n, k)
            topk_logprobs = batch.topk_logprobs[start : start + chunk]  # (n, k)
            sums["kl"] += float(kd_loss(logits, topk_ids, topk_logprobs, kind="fkl").total)
            sums["top1"] += float((logits.argmax(-1) == topk_ids[:, 0]).sum())
        count += batch.n_positions
    model.train(was_training)
    out_means = {name: value / max(count, 1) for name, value in sums.items()}
    out_means["ppl"] = math.exp(min(out_means["ce"], 700.0))
    out_means["positions"] = count
    return out_means
