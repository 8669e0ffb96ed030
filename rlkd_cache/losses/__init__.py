"""Distillation losses: pure tensor functions over a cached teacher top-k.

- `kl`: the KL family (fkl, rkl, js, tvd, sfkl, srkl, akl) on the top-k plus one tail bucket,
  and cross-entropy on the actual tokens.
- `softrank`: differentiable soft ranks (torchsort's l2 soft_rank, in PyTorch) and the soft
  Spearman correlation.
- `ranking`: the RLKD ranking loss with the exact per-position (censored) union.
- `chunked`: `LossConfig` and `distill_loss`, the whole objective from hidden states, chunked
  over positions so the full logits never exist at once.

Reduction rule, for every loss here: the SUM over unmasked positions plus their COUNT
(`SumCount`, `LossSums`); the trainer divides once by the global count per optimizer step.
"""

from rlkd_cache.losses.chunked import (
    LossConfig,
    LossSums,
    TeacherTopK,
    distill_loss,
    distill_loss_reference,
)
from rlkd_cache.losses.kl import (
    KDKind,
    TailMode,
    category_log_probs,
    cross_entropy_loss,
    divergence,
    kd_loss,
)
from rlkd_cache.losses.ranking import RankUnion, UnionMode, rank_union, rlkd_rank_loss
from rlkd_cache.losses.reduction import SumCount
from rlkd_cache.losses.softrank import isotonic_decreasing, rank_correlation, soft_rank

__all__ = [
    "KDKind",
    "LossConfig",
    "LossSums",
    "RankUnion",
    "SumCount",
    "TailMode",
    "TeacherTopK",
    "UnionMode",
    "category_log_probs",
    "cross_entropy_loss",
    "distill_loss",
    "distill_loss_reference",
    "divergence",
    "isotonic_decreasing",
    "kd_loss",
    "rank_correlation",
    "rank_union",
    "rlkd_rank_loss",
    "soft_rank",
]
