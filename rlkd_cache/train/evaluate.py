"""Held-out evaluation during training: KL, top-1 agreement and loss parts on a cache.

A deterministic pass over the whole eval cache; logits are built a chunk of positions at a
time. KL is the forward KL with the tail bucket at temperature 1 (whatever the training loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlkd_cache.losses import LossConfig, TeacherTopK, distill_loss, kd_loss
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import TokenBatcher
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import hidden_at, lm_head


@torch.no_grad()
def evaluate(
    model: Any,
    cache: Cache,
    cfg: LossConfig,
    *,
    batch_tokens: int,
    chunk_size: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    """Per-position means over the cache: kl, top1 (agreement with the teacher's argmax),
    kd, rank, ce, loss (the training objective), ppl (exp ce), and the count `positions`."""
    was_training = model.training
    model.eval()
    weight, bias = lm_head(model)
    sums = {"kl": 0.0, "top1": 0.0, "kd": 0.0, "rank": 0.0, "ce": 0.0, "loss": 0.0}
    count = 0
    batcher = TokenBatcher(CacheStream(cache, seed=0, shuffle_buffer=1), batch_tokens=batch_tokens)
    for batch in batcher.epoch_batches(0):
        batch = batch.to(device)
        with autocast():
            hidden = hidden_at(model, batch.input_ids, batch.attention_mask, batch.row, batch.pos)
        teacher = TeacherTopK(
            batch.topk_ids, batch.topk_logprobs, batch.target_ids, batch.target_logprobs
        )
        parts = distill_loss(hidden, weight, bias, teacher, None, cfg, chunk_size=chunk_size)
        for name in ("kd", "rank", "ce"):
            sums[name] += float(getattr(parts, name))
        sums["loss"] += float(parts.total)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = teacher.rows(start, start + chunk_size)
            logits = torch.nn.functional.linear(
                hidden[start : start + chunk_size], weight, bias
            ).float()
            sums["kl"] += float(
                kd_loss(logits, rows.topk_ids, rows.topk_logprobs, kind="fkl").total
            )
            sums["top1"] += float((logits.argmax(-1) == rows.topk_ids[:, 0]).sum())
        count += batch.n_positions
    model.train(was_training)
    out = {name: value / max(count, 1) for name, value in sums.items()}
    out["ppl"] = math.exp(min(out["ce"], 700.0))
    out["positions"] = count
    return out
