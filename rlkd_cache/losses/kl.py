"""KL-family distillation losses on a top-k cache, with the teacher's tail as one category.

The cache knows the teacher only on its top-k set K. Everything outside K is merged into one
extra "tail" category on both sides, so every divergence here is exact for that coarsened
(k+1)-category distribution instead of renormalizing the top-k, which is biased (Anshumann et
al., ACL 2025, "Sparse Logit Sampling"). Renormalizing over K stays available for comparison.

Numerics: fp32 throughout; the teacher's tail mass `1 - sum_K exp(a)` is taken with a
log1p/expm1 formula; the student's tail is summed straight over the tokens outside K (no
`1 - sum_K` cancellation), with a hand-written backward (`_TopkAndTail`). Both tail
log-masses, and the cached teacher log-probs, are floored at `LOG_FLOOR` (the log of the
smallest normal fp32), so a mass of 0 on either side (a one-hot teacher, an empty tail, -inf in
the cache) gives finite values and gradients: a term whose true value is +inf is capped instead.

Temperature tau: the student's logits are divided by tau over the full vocabulary (exact). The
teacher is known only through log-probs, so they are divided by tau and renormalized over the
k+1 categories: the tail is treated as one token of mass P_tail, whose share becomes
P_tail^(1/tau) before renormalization. That is exact at tau = 1 and an approximation otherwise
(the true tempered tail is sum_{v not in K} p_v^(1/tau), which the cache cannot know). No tau^2
factor is applied; scale the KD weight instead.

All losses return a `SumCount` (see `reduction.py`). Positions masked out must still hold valid
token ids and finite values: the mask removes their loss and gradient, not their indexing.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkd_cache.losses.reduction import SumCount, masked_sum, position_mask

KDKind = Literal["fkl", "rkl", "js", "tvd", "sfkl", "srkl", "akl"]
"""Which divergence between teacher p and student q: forward KL(p||q), reverse KL(q||p),
generalized Jensen-Shannon, total variation, skew forward / skew reverse KL (DistiLLM), or
adaptive KL (AKL)."""

TailMode = Literal["bucket", "renormalize"]
"""How the mass outside the teacher's top-k is handled: "bucket" keeps it as one extra category
on both sides (exact for the coarsened distribution); "renormalize" drops it and renormalizes both
sides over the top-k (biased; kept for comparison)."""

LOG_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)
"""Floor of every teacher log-prob and tail log-mass (about -87.3): log of the smallest normal
fp32. It keeps the divergences finite when a mass is 0."""

_LN2 = math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """Compute log(1 - exp(x)) accurately for x <= 0 (Maechler 2012); x > 0 is read as 0.

    Meant for cached teacher values (no gradient): at x = 0 it returns -inf, which callers floor.

    Args:
        x: any shape, float.

    Returns:
        Same shape as `x`.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def category_log_probs(
    z: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail: TailMode = "bucket",
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Build the teacher's and the student's log-probs over the categories the KD loss compares.

    With tail "bucket" the categories are K (in cached order) then the tail; with "renormalize",
    K alone. When k equals the vocabulary size the tail is empty and both tails sit at LOG_FLOOR.

    Args:
        z: (N, V) student logits (any float dtype; computed in fp32).
        topk_ids: (N, k) int64 teacher top-k token ids, distinct within a row.
        topk_logprobs: (N, k) teacher log-probs of those tokens, normalized over the full
            vocabulary, sorted descending.
        tail: see `TailMode`.
        temperature: tau > 0.

    Returns:
        lp, lq: (N, C) teacher and student log-probs, C = k + 1 ("bucket") or k, all finite.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = topk_logprobs.float().clamp_min(LOG_FLOOR)  # (N, k)
    s = z.float() if temperature == 1.0 else z.float() / temperature  # (N, V) no copy at tau 1
    s_k = s.gather(-1, topk_ids)  # (N, k)
    if tail == "renormalize":
        a_t = a / temperature  # (N, k)
        return a_t - a_t.logsumexp(-1, keepdim=True), s_k - s_k.logsumexp(-1, keepdim=True)
    if tail != "bucket":
        raise ValueError(f"tail must be one of {get_args(TailMode)}, got {tail!r}")

    if topk_ids.shape[-1] >= s.shape[-1]:
        lq_k = s_k - s.logsumexp(-1, keepdim=True)  # (N, k)
        log_p_tail = torch.full_like(lq_k[:, :1], LOG_FLOOR)  # (N, 1) empty tail
        log_q_tail = torch.full_like(lq_k[:, :1], LOG_FLOOR)  # (N, 1)
    else:
        log_p_tail = log1mexp(a.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)  # (N, 1)
        lq_k, log_q_tail = _TopkAndTail.apply(s, topk_ids)  # (N, k), (N, 1)
        log_q_tail = log_q_tail.clamp_min(LOG_FLOOR)  # (N, 1)
    a_t = torch.cat([a, log_p_tail], dim=-1) / temperature  # (N, k+1)
    lp = a_t - a_t.logsumexp(-1, keepdim=True)  # (N, k+1)
    lq = torch.cat([lq_k, log_q_tail], dim=-1)  # (N, k+1)
    return lp, lq


class _TopkAndTail(torch.autograd.Function):
    """The student's log-probs of K and of the tail outside K, in a few passes over V.

    Forward: e = exp(s - max s), lq_j = s_j - log-sum-exp(s) for j in K, and
    log q_tail = log(sum_{v not in K} e_v / sum_v e_v): the tail is summed directly (no
    1 - sum_K cancellation). Only a tail mass below ~e^-76 (tail terms under fp32's smallest
    normal) loses precision, and below LOG_FLOOR the caller clamps it anyway.
    Backward, by hand (autograd through two log-sum-exps and a scatter takes ~3x the passes):
    d lq_j / d s_v = [v = j] - q_v and d log q_tail / d s_v = [v not in K] q_v / q_tail - q_v,
    so grad_v = e_v / sum e * (g_tail / q_tail - G) outside K and g_j - q_j G on K, with
    G = sum_j g_j + g_tail. Saves e (N, V) for the backward.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, topk_ids: Tensor) -> tuple[Tensor, Tensor]:
        peak = s.amax(-1, keepdim=True)  # (N, 1)
        e = (s - peak).exp_()  # (N, V)
        total = e.sum(-1, keepdim=True)  # (N, 1) >= 1
        lq_k = s.gather(-1, topk_ids) - (peak + total.log())  # (N, k)
        e.scatter_(-1, topk_ids, 0.0)  # (N, V) K removed
        q_tail = e.sum(-1, keepdim=True) / total  # (N, 1)
        ctx.save_for_backward(e, total, q_tail, lq_k, topk_ids)
        return lq_k, q_tail.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_k: Tensor, g_tail: Tensor) -> tuple[Tensor, None]:
        e, total, q_tail, lq_k, topk_ids = ctx.saved_tensors
        spread = g_k.sum(-1, keepdim=True) + g_tail  # (N, 1) G
        per_e = (torch.where(q_tail > 0, g_tail / q_tail, 0.0) - spread) / total  # (N, 1)
        grad = e * per_e  # (N, V) right outside K, 0 on K
        grad.scatter_(-1, topk_ids, g_k - lq_k.exp() * spread)  # (N, V)
        return grad, None


def forward_kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over categories. (N, C), (N, C) -> (N,)."""
    return (lp.exp() * (lp - lq)).sum(-1)


def reverse_kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(q || p) = sum_c q_c (log q_c - log p_c). (N, C), (N, C) -> (N,)."""
    return forward_kl(lq, lp)


def _log_mixture(lp: Tensor, lq: Tensor, weight_p: float) -> Tensor:
    """log(w p + (1 - w) q) for w = weight_p in [0, 1]. (N, C), (N, C) -> (N, C)."""
    log_w = math.log(weight_p) if weight_p > 0 else -math.inf
    log_1mw = math.log1p(-weight_p) if weight_p < 1 else -math.inf
    return torch.logaddexp(lp + log_w, lq + log_1mw)


def generalized_jsd(lp: Tensor, lq: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence, as in TRL's GKD (Agarwal et al. 2024).

    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), with m = beta p + (1 - beta) q;
    beta = 0.5 is the usual JS divergence. (N, C), (N, C) -> (N,).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    lm = _log_mixture(lp, lq, beta)  # (N, C)
    return beta * forward_kl(lp, lm) + (1.0 - beta) * forward_kl(lq, lm)


def total_variation(lp: Tensor, lq: Tensor) -> Tensor:
    """TV(p, q) = 1/2 sum_c |p_c - q_c|. (N, C), (N, C) -> (N,)."""
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def skew_forward_kl(lp: Tensor, lq: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p || alpha p + (1 - alpha) q). -> (N,)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    return forward_kl(lp, _log_mixture(lp, lq, alpha))


def skew_reverse_kl(lp: Tensor, lq: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(q || (1 - alpha) p + alpha q). -> (N,)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    return forward_kl(lq, _log_mixture(lp, lq, 1.0 - alpha))


def adaptive_kl(lp: Tensor, lq: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (AKL) of Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models" (arXiv 2404.02657).

    Categories must be in the teacher's descending order (K as cached, then the tail bucket).
    Head = the categories whose cumulative teacher mass is <= mu, plus always the first; tail =
    the rest (the bucket is always tail). With the gaps g_head = sum_head |p - q| and
    g_tail = sum_tail |p - q|, computed without gradient as in the authors' code:
    AKL = g_head / (g_head + g_tail) * KL(p||q) + g_tail / (g_head + g_tail) * KL(q||p).
    When p = q both gaps are 0 and so is the loss. (N, C), (N, C) -> (N,).
    """
    if not 0.0 < mu < 1.0:
        raise ValueError(f"akl mu must be in (0, 1), got {mu}")
    with torch.no_grad():
        p = lp.exp()  # (N, C)
        gap = (p - lq.exp()).abs()  # (N, C)
        first = torch.arange(p.shape[-1], device=p.device) == 0  # (C,)
        head = (p.cumsum(-1) <= mu) | first  # (N, C)
        g_head = torch.where(head, gap, 0.0).sum(-1)  # (N,)
        g_all = gap.sum(-1)  # (N,)
        w_head = torch.where(g_all > 0, g_head / g_all.clamp_min(1e-30), 0.5)  # (N,)
    return w_head * forward_kl(lp, lq) + (1.0 - w_head) * reverse_kl(lp, lq)


def divergence(
    lp: Tensor,
    lq: Tensor,
    kind: KDKind,
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> Tensor:
    """Per-position divergence of the chosen kind. (N, C), (N, C) -> (N,)."""
    if kind == "fkl":
        return forward_kl(lp, lq)
    if kind == "rkl":
        return reverse_kl(lp, lq)
    if kind == "js":
        return generalized_jsd(lp, lq, jsd_beta)
    if kind == "tvd":
        return total_variation(lp, lq)
    if kind == "sfkl":
        return skew_forward_kl(lp, lq, skew_alpha)
    if kind == "srkl":
        return skew_reverse_kl(lp, lq, skew_alpha)
    if kind == "akl":
        return adaptive_kl(lp, lq, akl_mu)
    raise ValueError(f"kd kind must be one of {get_args(KDKind)}, got {kind!r}")


def kd_loss(
    z: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    kind: KDKind = "fkl",
    tail: TailMode = "bucket",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> SumCount:
    """Top-k distillation loss: a divergence between teacher and student over K (+ the tail).

    Args:
        z: (N, V) student logits.
        topk_ids: (N, k) int64 teacher top-k token ids.
        topk_logprobs: (N, k) teacher log-probs (full-vocabulary normalized, descending).
        mask: (N,) bool, False = ignore the position; None = all positions.
        kind, tail, temperature, jsd_beta, skew_alpha, akl_mu: see `LossConfig`.

    Returns:
        Sum over unmasked positions of the divergence, and their count.
    """
    return kd_loss_and_student(
        z,
        topk_ids,
        topk_logprobs,
        mask,
        kind=kind,
        tail=tail,
        temperature=temperature,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
        akl_mu=akl_mu,
    )[0]


def kd_loss_and_student(
    z: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    kind: KDKind = "fkl",
    tail: TailMode = "bucket",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> tuple[SumCount, Tensor]:
    """`kd_loss` (same arguments) and the student's category log-probs lq (N, C) it used,
    which `cross_entropy_from_kd` can reuse."""
    lp, lq = category_log_probs(z, topk_ids, topk_logprobs, tail, temperature)  # (N, C) each
    per_position = divergence(
        lp, lq, kind, jsd_beta=jsd_beta, skew_alpha=skew_alpha, akl_mu=akl_mu
    )  # (N,)
    return masked_sum(per_position, position_mask(mask, z.shape[0], z.device)), lq


def cross_entropy_from_kd(
    z: Tensor, topk_ids: Tensor, lq: Tensor, target_ids: Tensor, mask: Tensor | None = None
) -> SumCount:
    """`cross_entropy_loss` from the KD term's student log-probs, with no pass over V.

    Valid only for `category_log_probs(z, topk_ids, ..., tail="bucket", temperature=1.0)`,
    whose lq_0 = z_{K_0} - log Z: then log Z = z_{K_0} - lq_0 and CE = log Z - z_target.

    Args:
        z: (N, V) student logits.
        topk_ids: (N, k) int64 the teacher's top-k ids that `lq` was built on.
        lq: (N, k+1) the student's category log-probs (bucket tail, temperature 1).
        target_ids: (N,) int64 actual next tokens; any valid id at masked positions.
        mask: (N,) bool, False = ignore the position; None = all positions.

    Returns:
        Sum over unmasked positions of -log q(target), and their count.
    """
    z = z.float()
    log_z = z.gather(-1, topk_ids[:, :1]) - lq[:, :1]  # (N, 1)
    per_position = (log_z - z.gather(-1, target_ids[:, None]))[:, 0]  # (N,)
    return masked_sum(per_position, position_mask(mask, z.shape[0], z.device))


def cross_entropy_loss(z: Tensor, target_ids: Tensor, mask: Tensor | None = None) -> SumCount:
    """Cross-entropy of the student on the actual next tokens (temperature 1).

    Args:
        z: (N, V) student logits.
        target_ids: (N,) int64 actual next tokens; any value at masked positions.
        mask: (N,) bool, False = ignore the position; None = all positions.

    Returns:
        Sum over unmasked positions of -log q(target), and their count.
    """
    keep = position_mask(mask, z.shape[0], z.device)  # (N,)
    safe_targets = torch.where(keep, target_ids, 0)  # (N,) ignore-index values made harmless
    per_position = F.cross_entropy(z.float(), safe_targets, reduction="none")  # (N,)
    return masked_sum(per_position, keep)
