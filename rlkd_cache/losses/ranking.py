"""The RLKD ranking loss (Peng & Zhang, COLING 2025), adapted to an offline top-k cache.

At each position the teacher's and the student's scores over a small set of "peak" tokens U
are soft-ranked (`softrank.soft_rank`, l2, strength 1.0 as in the authors' scripts) and
compared by a soft Spearman correlation rho; the loss is 1 - rho, summed over positions
(see `reduction.py`). The union is exact per position: a token in both top lists counts once.

Union modes (`UnionMode`):
- "censored" (default): U = teacher top-`rank_k` ∪ student top-`rank_k`, the paper's union.
  The teacher is known only on its cached top-k set K, so the teacher scores over U are:
  the cached log-prob a_v for v in K (also beyond the first `rank_k` columns); the exact cached
  a_y for the actual next token y when it is not in K; and for every other token outside K one
  tied score, the uniform-tail value log(P_tail / (V - k)): the log-prob each tail token would
  have if the tail were flat, a natural guess for "somewhere in the tail". Both are clamped
  strictly below the smallest cached value (nextafter), so tokens outside K always rank below
  all of K, as they truly do; the clamp only bites when the tail is nearly flat or quantization
  lifted a_y. It is the default because it keeps what the paper's union adds: the student is
  penalized for a false peak, a token it ranks high that the teacher does not.
- "teacher": U = teacher top-`rank_k` only. Exact from the cache, but blind to false peaks.

Guess for a student peak outside the cache (`CensoredGuess`, only with "censored"):
- "uniform_tail" (default): the uniform-tail value above (also the authors' setting).
- "midpoint": halfway, in log-prob, between the uniform-tail value and the k-th cached value
  a_k (clamped just below a_k). The student's peaks outside the cache are the tokens it ranks
  high, so they sit above the average tail token but below the cache. Measured with the real
  teacher's full distribution (`benchmarks/rank_guess.py --rows 40`, SmolLM2-135M and a
  4-layer student trained 90 steps on plain text): those tokens truly sit at -11.6 on
  average, a_k at -7.07, the uniform tail at -14.4 and the midpoint at -10.7; the censored
  loss is off the true-score loss by 0.062 per position with the midpoint against 0.110 with
  the uniform tail (untrained student: 0.032 and 0.029). It is not the default: at the loss
  weights measured it did not move the held-out metrics (docs/results.md).
- "extrapolate": the cached log-probs continued along rank: with d = (a_h - a_k) / (k - h),
  h = k // 2, the j-th guessed token in the student's order gets a_k - j d, clamped into
  [uniform_tail, just below a_k]. Closest on random Gaussian logits, but too high on the
  real teacher (guess -7.7 for tokens at -11.6; loss error 0.128): kept for comparison.

Weighting of the correlation (`RankWeighting`):
- "flat": plain Spearman; a swap of ranks 14 and 15 costs as much as a swap of ranks 1 and 2.
- "dcg": weighted Spearman (`softrank.rank_correlation` with `softrank.top_weights`), each
  token weighted 1 / log2(1 + p) by its position p in the teacher's order over U, so the
  order of the head counts more than the order of the tail of U.

Student scores are its raw logits over U (no temperature), the teacher's are log-probs (a
per-position shift of its logits, to which ranks are invariant).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from rlkd_cache.losses.kl import LOG_FLOOR, log1mexp
from rlkd_cache.losses.reduction import SumCount, masked_sum, position_mask
from rlkd_cache.losses.softrank import rank_correlation, soft_rank, top_weights

UnionMode = Literal["censored", "teacher"]
"""Which tokens the ranking loss compares at a position: "censored" = teacher top-rank_k ∪
student top-rank_k, with censored teacher scores outside the cache; "teacher" = teacher
top-rank_k only."""

CensoredGuess = Literal["uniform_tail", "extrapolate", "midpoint"]
"""Teacher score guessed for a student peak outside the cached top-k (see the module doc)."""

RankWeighting = Literal["flat", "dcg"]
"""How the rank correlation weighs the tokens of U: equally, or by the teacher's rank."""


class RankUnion(NamedTuple):
    """The tokens ranked at each position, in a fixed-width layout with a validity mask."""

    ids: Tensor
    """(N, m) int64 token ids; m = rank_k ("teacher") or 2 * rank_k ("censored")."""
    teacher_scores: Tensor
    """(N, m) float32 teacher scores (log-probs, censored outside the cache)."""
    valid: Tensor
    """(N, m) bool; False marks a student slot whose token is already a teacher slot."""


def top_ids(x: Tensor, r: int, block: int = 64) -> Tensor:
    """Column ids of the r largest entries of each row, as `x.topk(r).indices` gives them
    (a tie at the r-th value may be broken differently), in about one pass over the row.

    The r blocks of `block` columns with the largest maxima hold a valid top r: every entry
    above the r-th largest value lies in a block whose maximum is above it too, and there
    are fewer than r such blocks; so a top r of those blocks' entries is a top r of the row.
    Rows too short for that to pay off (or not a multiple of `block`) use `topk` itself.

    Args:
        x: (N, V) float.
        r: how many ids per row, r <= V.
        block: columns per block.

    Returns:
        (N, r) int64 ids, by decreasing value.
    """
    n, vocab = x.shape
    if vocab % block or vocab < 4 * r * block:
        return x.topk(r, dim=-1).indices
    blocks = x.reshape(n, vocab // block, block)  # (N, B, block)
    best = blocks.amax(-1).topk(r, dim=-1).indices  # (N, r) block ids
    columns = best[:, :, None] * block + torch.arange(block, device=x.device)  # (N, r, block)
    candidates = x.gather(-1, columns.reshape(n, r * block))  # (N, r * block)
    pick = candidates.topk(r, dim=-1).indices  # (N, r) among the candidates
    return columns.reshape(n, r * block).gather(-1, pick)  # (N, r)


def rank_union(
    z: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    *,
    rank_k: int,
    union: UnionMode,
    guess: CensoredGuess = "uniform_tail",
) -> RankUnion:
    """Build the per-position union of peaks and the teacher's scores over it.

    Layout: columns [0, rank_k) are the teacher's first `rank_k` cached tokens; with
    "censored", columns [rank_k, 2 rank_k) are the student's top-`rank_k` tokens by logit, each
    marked invalid when it already appears among the teacher's columns.

    Args:
        z: (N, V) student logits (only their order is used here).
        topk_ids: (N, k) int64 teacher top-k ids, rank_k <= k.
        topk_logprobs: (N, k) teacher log-probs (full-vocabulary normalized), descending.
        target_ids: (N,) int64 actual next tokens.
        target_logprobs: (N,) teacher log-prob of the actual next token.
        rank_k: how many top tokens each side contributes, 2 <= rank_k <= k.
        union: see `UnionMode`.
        guess: see `CensoredGuess`.

    Returns:
        The union's ids, teacher scores and validity mask.
    """
    k = topk_ids.shape[-1]
    vocab = z.shape[-1]
    if not 2 <= rank_k <= min(k, vocab):
        raise ValueError(f"rank_k must be in [2, min(k={k}, V={vocab})], got {rank_k}")
    a = topk_logprobs.float().clamp_min(LOG_FLOOR)  # (N, k) finite, even for -inf in the cache
    teacher_ids = topk_ids[:, :rank_k]  # (N, r)
    teacher_scores = a[:, :rank_k]  # (N, r)
    teacher_valid = torch.ones_like(teacher_ids, dtype=torch.bool)  # (N, r)
    if union == "teacher":
        return RankUnion(teacher_ids, teacher_scores, teacher_valid)
    if union != "censored":
        raise ValueError(f"rank union must be one of {get_args(UnionMode)}, got {union!r}")
    if guess not in get_args(CensoredGuess):
        raise ValueError(f"censored guess must be one of {get_args(CensoredGuess)}, got {guess!r}")

    student_ids = top_ids(z.detach(), rank_k)  # (N, r)
    match = student_ids[:, :, None] == topk_ids[:, None, :]  # (N, r, k)
    in_cache = match.any(-1)  # (N, r)
    duplicate = match[:, :, :rank_k].any(-1)  # (N, r) already a teacher column
    cached = torch.where(match, a[:, None, :], 0.0).sum(-1)  # (N, r) a_v where in_cache

    lowest = a.amin(-1, keepdim=True)  # (N, 1) the k-th cached value
    below_cache = torch.nextafter(lowest, torch.full_like(lowest, -math.inf))  # (N, 1)
    log_tail = log1mexp(a.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)  # (N, 1)
    uniform_tail = log_tail - math.log(max(vocab - k, 1))  # (N, 1)
    censored = torch.minimum(uniform_tail, below_cache)  # (N, 1)
    actual = target_logprobs.float()[:, None].clamp_min(LOG_FLOOR)  # (N, 1)
    actual = torch.minimum(actual, below_cache)  # (N, 1) outside K: not above the cache
    is_actual = student_ids == target_ids[:, None]  # (N, r)
    if guess == "extrapolate":
        half = k // 2
        drop = (a[:, half - 1 : half] - lowest) / (k - half)  # (N, 1) mean drop per rank, >= 0
        guessed = (~in_cache & ~is_actual).cumsum(-1)  # (N, r) j for the j-th guessed token
        ranked = torch.minimum(lowest - guessed * drop, below_cache)  # (N, r)
        censored = torch.maximum(ranked, censored)  # (N, r) not below the uniform tail
    elif guess == "midpoint":
        censored = torch.minimum((lowest + censored) / 2, below_cache)  # (N, 1)
    student_scores = torch.where(
        in_cache, cached, torch.where(is_actual, actual, censored)
    )  # (N, r)
    return RankUnion(
        ids=torch.cat([teacher_ids, student_ids], dim=-1),  # (N, 2r)
        teacher_scores=torch.cat([teacher_scores, student_scores], dim=-1),  # (N, 2r)
        valid=torch.cat([teacher_valid, ~duplicate], dim=-1),  # (N, 2r)
    )


def rlkd_rank_loss(
    z: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    rank_k: int = 15,
    union: UnionMode = "censored",
    strength: float = 1.0,
    sparse_grad: bool = False,
    guess: CensoredGuess = "uniform_tail",
    weighting: RankWeighting = "flat",
) -> SumCount:
    """RLKD ranking loss: sum over positions of 1 - soft Spearman(student, teacher) over U.

    Args:
        z: (N, V) student logits.
        topk_ids: (N, k) int64 teacher top-k ids.
        topk_logprobs: (N, k) teacher log-probs, descending.
        target_ids: (N,) int64 actual next tokens.
        target_logprobs: (N,) teacher log-prob of the actual next token.
        mask: (N,) bool, False = ignore the position; None = all positions.
        rank_k: tokens per side in the union (the first rank_k cached columns for the teacher).
        union: see `UnionMode`.
        strength: soft-rank regularization strength (l2).
        sparse_grad: give z a sparse COO gradient ((N, m) entries) instead of a dense (N, V)
            one that is mostly zeros; autograd adds it in place to other terms' dense gradients.
        guess: teacher score of a student peak outside the cache (see `CensoredGuess`).
        weighting: "flat" Spearman or "dcg" top-weighted (see `RankWeighting`).

    Returns:
        Sum over unmasked positions of 1 - rho (each in [0, 2]), and their count.
    """
    if weighting not in get_args(RankWeighting):
        choices = get_args(RankWeighting)
        raise ValueError(f"rank weighting must be one of {choices}, got {weighting!r}")
    peaks = rank_union(
        z,
        topk_ids,
        topk_logprobs,
        target_ids,
        target_logprobs,
        rank_k=rank_k,
        union=union,
        guess=guess,
    )
    student_scores = torch.gather(z.float(), -1, peaks.ids, sparse_grad=sparse_grad)  # (N, m)
    with torch.no_grad():
        teacher_ranks = soft_rank(peaks.teacher_scores, strength, peaks.valid)  # (N, m)
        weights = top_weights(peaks.teacher_scores, peaks.valid) if weighting == "dcg" else None
    student_ranks = soft_rank(student_scores, strength, peaks.valid)  # (N, m)
    rho = rank_correlation(student_ranks, teacher_ranks, peaks.valid, weights)  # (N,)
    return masked_sum(1.0 - rho, position_mask(mask, z.shape[0], z.device))
