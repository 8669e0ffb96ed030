"""The training objective, computed from hidden states in chunks of positions.

`distill_loss` applies the LM head and every loss (KD, RLKD ranking, CE) to `chunk_size`
positions at a time, so the (N, V) logits never exist at once, in the forward or the backward.
Like Liger-Kernel's fused linear losses, it takes the gradients in the forward: for each chunk
it builds the logits, backpropagates the chunk's weighted total to them, folds that into the
gradients of the hidden states, LM head weight and bias (accumulated in place), and frees the
chunk before the next. The backward then only scales those gradients by the incoming one. No
logits are recomputed, and peak memory grows with chunk_size x V instead of N x V.
`distill_loss_reference` is the plain version that builds all logits at once; tests hold the
two equal, values and gradients.

Reduction: every part is a SUM over unmasked positions, returned with their count (see
`reduction.py`); the trainer divides `total` once by the global count of the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkd_cache.errors import FieldError
from rlkd_cache.losses.kl import (
    KDKind,
    TailMode,
    cross_entropy_from_kd,
    cross_entropy_loss,
    kd_loss_and_student,
)
from rlkd_cache.losses.ranking import CensoredGuess, RankWeighting, UnionMode, rlkd_rank_loss
from rlkd_cache.losses.reduction import position_mask

Preset = Literal["none", "authors"]
"""A named loss setting; "none" = the fields as given (see `PRESETS`)."""

PRESETS: dict[str, dict[str, Any]] = {
    "authors": {
        "kd": "fkl",
        "kd_weight": 0.5,
        "rank_weight": 1.0,
        "rank_k": 15,
        "rank_union": "censored",
        "rank_guess": "uniform_tail",
        "rank_weighting": "flat",
        "rank_strength": 1.0,
        "ce_weight": 0.0,
        "temperature": 1.0,
        "tail": "bucket",
    },
}
"""The loss fields each preset sets. "authors": L = L_rank + L_KD / 2 with forward KL (tail
bucket), the censored union of rank k 15, plain soft Spearman (strength 1) and the
uniform-tail guess, no CE, temperature 1: the RLKD authors' pre-training setting as rlkd
adapted it to a cache, and rlkd's default until the two-regime ablation (docs/results.md)."""


@dataclass(frozen=True)
class LossConfig:
    """How the student's loss is built. Defaults: L = FKL + 0.5 L_rank (plain soft Spearman over
    the censored union, uniform-tail guess), chosen by the two-regime ablation in
    docs/results.md (the authors' L = L_rank + FKL / 2 cost top-1 agreement on plain text);
    `preset="authors"` is the authors' setting."""

    kd: KDKind = "fkl"
    """Divergence for the KD term (see `KDKind` in `kl.py`)."""
    kd_weight: float = 1.0
    """Weight of the KD term (the authors' L = L_rank + L_KD / 2: 0.5, with rank weight 1)."""
    rank_weight: float = 0.5
    """Weight of the RLKD ranking term. With AdamW only its ratio to kd_weight matters; 2 (the
    authors') widens the student's top-20 most but costs top-1 agreement (docs/results.md)."""
    rank_k: int = 15
    """Tokens per side in the ranking union (paper: 15 pre-training, 5 fine-tuning); <= cache k."""
    rank_union: UnionMode = "censored"
    """Ranking union: "censored" (teacher ∪ student top-rank_k) or "teacher" (see `ranking.py`)."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy on the actual next tokens (the paper uses none)."""
    temperature: float = 1.0
    """Temperature of the KD term (student logits / tau; cached teacher rescaled, see `kl.py`)."""
    tail: TailMode = "bucket"
    """Mass outside the teacher's top-k: one extra category ("bucket") or none ("renormalize")."""
    jsd_beta: float = 0.5
    """Mixture weight of the teacher in the generalized JSD, in (0, 1)."""
    skew_alpha: float = 0.1
    """Skew of sfkl / srkl (DistiLLM), in [0, 1)."""
    akl_mu: float = 0.5
    """Teacher mass that defines the head for AKL, in (0, 1)."""
    rank_strength: float = 1.0
    """l2 regularization strength of the soft rank (torchsort's regularization_strength)."""
    rank_guess: CensoredGuess = "uniform_tail"
    """Teacher score of a student peak outside the cache (censored union): "uniform_tail",
    "midpoint" (halfway between it and the k-th cached value) or "extrapolate" (the cached
    log-probs continued along rank); see `ranking.py`."""
    rank_weighting: RankWeighting = "flat"
    """Rank correlation: "flat" (plain Spearman) or "dcg" (weighted by the teacher's rank, so
    the order of the head counts more; see `ranking.py`)."""
    preset: Preset = "none"
    """A named loss setting (see `PRESETS`): "authors" = the RLKD authors' loss (rank + FKL/2,
    censored union, plain Spearman, uniform-tail guess, rank k 15). The loss fields it names
    take its values; giving one of them a different value too is an error."""

    def __post_init__(self) -> None:
        """Fail on the first bad field with `FieldError` (a `ValueError` naming the field)."""
        kinds = (
            ("kd", KDKind),
            ("tail", TailMode),
            ("rank_union", UnionMode),
            ("rank_guess", CensoredGuess),
            ("rank_weighting", RankWeighting),
            ("preset", Preset),
        )
        for name, kind in kinds:
            if getattr(self, name) not in get_args(kind):
                choices = list(get_args(kind))
                raise FieldError(name, f"must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("kd_weight", "rank_weight", "ce_weight"):
            weight = getattr(self, name)
            if not (math.isfinite(weight) and weight >= 0):
                raise FieldError(name, f"must be finite and >= 0, got {weight!r}")
        checks = (
            ("rank_k", self.rank_k >= 2, ">= 2"),
            ("temperature", self.temperature > 0, "> 0"),
            ("rank_strength", self.rank_strength > 0, "> 0"),
            ("jsd_beta", 0 < self.jsd_beta < 1, "in (0, 1)"),
            ("skew_alpha", 0 <= self.skew_alpha < 1, "in [0, 1)"),
            ("akl_mu", 0 < self.akl_mu < 1, "in (0, 1)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise FieldError(name, f"must be {expected}, got {getattr(self, name)!r}")
        for name, value in PRESETS.get(self.preset, {}).items():
            if getattr(self, name) != value:
                raise FieldError(
                    name,
                    f"is {value!r} in preset {self.preset!r}, got {getattr(self, name)!r} "
                    "(drop one of the two)",
                )


@dataclass(frozen=True, eq=False)
class TeacherTopK:
    """What the cache holds for N distilled positions (flattened over the batch, no padding)."""

    topk_ids: Tensor
    """(N, k) int64 the teacher's top-k token ids."""
    topk_logprobs: Tensor
    """(N, k) float32 their log-probs, normalized over the full vocabulary, descending."""
    target_ids: Tensor
    """(N,) int64 the actual next token."""
    target_logprobs: Tensor
    """(N,) float32 the teacher's log-prob of the actual next token (known outside the top-k)."""

    def rows(self, start: int, stop: int) -> TeacherTopK:
        """The positions [start, stop)."""
        return TeacherTopK(
            self.topk_ids[start:stop],
            self.topk_logprobs[start:stop],
            self.target_ids[start:stop],
            self.target_logprobs[start:stop],
        )


@dataclass(frozen=True, eq=False)
class LossSums:
    """Each part of the objective summed over unmasked positions, and their count.

    Every part is computed whatever its weight, so all three can be logged.
    """

    kd: Tensor
    """() the KD divergence, summed."""
    rank: Tensor
    """() the RLKD ranking loss 1 - rho, summed."""
    ce: Tensor
    """() the cross-entropy on the actual tokens, summed."""
    total: Tensor
    """() kd_weight * kd + rank_weight * rank + ce_weight * ce: what to backpropagate. From
    `distill_loss`, only `total` carries a gradient (the parts are for logging)."""
    count: Tensor
    """() int64 the number of unmasked positions."""


def _part_sums(
    logits: Tensor,
    teacher: TeacherTopK,
    keep: Tensor,
    cfg: LossConfig,
    total_grad_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three loss sums for some positions, from their logits. (C, V) -> three () tensors.

    With `total_grad_only`, only the weighted total's gradient is wanted, so each (C, V)
    pass that adds nothing to it is skipped: a part of weight 0 is computed without a graph,
    the ranking loss gives a sparse gradient (C x 2 rank_k entries) instead of a dense one, and
    a CE of weight 0 is read off the KD term's log-normalizer when they share it (tail bucket,
    temperature 1; see `cross_entropy_from_kd`).
    """

    def graph(weight: float) -> Any:
        return torch.no_grad() if total_grad_only and not weight else contextlib.nullcontext()

    with graph(cfg.kd_weight):
        kd, lq = kd_loss_and_student(
            logits,
            teacher.topk_ids,
            teacher.topk_logprobs,
            keep,
            kind=cfg.kd,
            tail=cfg.tail,
            temperature=cfg.temperature,
            jsd_beta=cfg.jsd_beta,
            skew_alpha=cfg.skew_alpha,
            akl_mu=cfg.akl_mu,
        )  # lq: (C, k+1)
    with graph(cfg.rank_weight):
        rank = rlkd_rank_loss(
            logits,
            teacher.topk_ids,
            teacher.topk_logprobs,
            teacher.target_ids,
            teacher.target_logprobs,
            keep,
            rank_k=cfg.rank_k,
            union=cfg.rank_union,
            strength=cfg.rank_strength,
            sparse_grad=total_grad_only,
            guess=cfg.rank_guess,
            weighting=cfg.rank_weighting,
        )
    if total_grad_only and not cfg.ce_weight and cfg.tail == "bucket" and cfg.temperature == 1:
        with torch.no_grad():
            ce = cross_entropy_from_kd(logits, teacher.topk_ids, lq, teacher.target_ids, keep)
    else:
        with graph(cfg.ce_weight):
            ce = cross_entropy_loss(logits, teacher.target_ids, keep)
    return kd.total, rank.total, ce.total


def _weighted(kd: Tensor, rank: Tensor, ce: Tensor, cfg: LossConfig) -> Tensor:
    """kd_weight * kd + rank_weight * rank + ce_weight * ce."""
    return cfg.kd_weight * kd + cfg.rank_weight * rank + cfg.ce_weight * ce


class _ChunkedObjective(torch.autograd.Function):
    """LM head + losses chunk by chunk, gradients taken in the forward (see the module doc).

    Outputs (total, kd, rank, ce); only total is differentiable. The backward scales the stored
    gradients in place, so it can run once per forward (a second run fails loudly). With
    `low_hidden` (N, r) and `low_weight` (V, r) (a LoRA adapter on the head), the logits get
    a second, rank-r linear term, differentiated like the first.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        low_hidden: Tensor | None,
        low_weight: Tensor | None,
        teacher: TeacherTopK,
        keep: Tensor,
        cfg: LossConfig,
        chunk_size: int,
        matmul_dtype: torch.dtype | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        need = ctx.needs_input_grad[:5]
        any_grad = any(need)
        grad_hidden = torch.zeros_like(hidden) if need[0] else None  # (N, H)
        grad_weight = torch.zeros_like(weight) if need[1] else None  # (V, H)
        grad_bias = torch.zeros_like(bias) if need[2] and bias is not None else None  # (V,)
        low = low_hidden is not None and low_weight is not None
        grad_low_hidden = torch.zeros_like(low_hidden) if low and need[3] else None  # (N, r)
        grad_low_weight = torch.zeros_like(low_weight) if low and need[4] else None  # (V, r)
        sums = torch.zeros(3, device=hidden.device)  # kd, rank, ce
        dtype = matmul_dtype or weight.dtype
        w = weight.to(dtype)  # (V, H) the weight itself unless matmul_dtype differs
        b = None if bias is None else bias.to(dtype)  # (V,)
        lw = low_weight.to(dtype) if low else None  # (V, r)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            chunk = hidden[start:stop].to(dtype)  # (C, H)
            logits = F.linear(chunk, w, b).float()  # (C, V) every loss in fp32
            if low:
                low_chunk = low_hidden[start:stop].to(dtype)  # (C, r)
                logits += F.linear(low_chunk, lw).float()  # (C, V)
            with torch.enable_grad():
                logits.requires_grad_(any_grad)
                rows = teacher.rows(start, stop)
                parts = _part_sums(logits, rows, keep[start:stop], cfg, total_grad_only=True)
                total = _weighted(*parts, cfg)
                if any_grad and total.requires_grad:
                    (grad_logits,) = torch.autograd.grad(total, logits)  # (C, V)
                    if grad_logits.is_sparse:  # only the ranking loss's sparse gradient
                        grad_logits = grad_logits.to_dense()
                elif any_grad:  # every weight is 0
                    grad_logits = torch.zeros_like(logits)  # (C, V)
            sums += torch.stack(parts).detach()
            del logits  # free the chunk's logits before the next chunk's
            if not any_grad:
                continue
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)  # (V,)
            grad_logits = grad_logits.to(dtype)  # (C, V)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ w  # (C, H)
            if grad_weight is not None and dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.T, chunk)  # (V, H)
            elif grad_weight is not None:
                grad_weight += grad_logits.T @ chunk  # (V, H) product in dtype, sum in weight's
            if grad_low_hidden is not None:
                grad_low_hidden[start:stop] = grad_logits @ lw  # (C, r)
            if grad_low_weight is not None:
                grad_low_weight += grad_logits.T @ low_chunk  # (V, r)
            del grad_logits  # freed before the next chunk's logits, like them
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_low_hidden, grad_low_weight)
        kd, rank, ce = sums.unbind()
        ctx.mark_non_differentiable(kd, rank, ce)
        return _weighted(kd, rank, ce, cfg), kd, rank, ce

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grads = [grad if grad is None else grad.mul_(grad_total) for grad in ctx.saved_tensors]
        return (*grads, None, None, None, None, None)  # 5 gradients, 5 Nones


def distill_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherTopK,
    mask: Tensor | None,
    cfg: LossConfig,
    *,
    chunk_size: int = 256,
    matmul_dtype: torch.dtype | None = None,
    low: tuple[Tensor, Tensor] | None = None,
) -> LossSums:
    """The full objective from the student's last hidden states, `chunk_size` positions at a time.

    Gradients (of `total` only) w.r.t. hidden, weight and bias are computed during this call
    when grad mode is on and they require grad; `total.backward()` then applies them, once.

    Args:
        hidden: (N, H) student final hidden states at the distilled positions.
        weight: (V, H) LM head weight.
        bias: (V,) LM head bias, or None.
        teacher: the cached teacher rows for the same N positions.
        mask: (N,) bool, False = ignore the position; None = all positions.
        cfg: which losses and how they are weighted.
        chunk_size: positions per chunk; peak memory grows with chunk_size x V.
        matmul_dtype: dtype of the LM-head matmuls (the logits and both gradient products),
            e.g. torch.bfloat16 to match a bf16-autocast student; None = the weight's dtype.
            The logits are upcast to fp32 before every loss, and the gradients are kept in
            the dtypes of hidden, weight and bias.
        low: a LoRA adapter on the head as (features (N, r), B (V, r)): the logits gain
            features @ B.T (`student.Head.low_rank`); gradients flow to both. None: none.

    Returns:
        Per-part sums, the weighted total and the count of unmasked positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep = position_mask(mask, hidden.shape[0], hidden.device)  # (N,)
    low_hidden, low_weight = low if low is not None else (None, None)
    total, kd, rank, ce = _ChunkedObjective.apply(
        hidden, weight, bias, low_hidden, low_weight, teacher, keep, cfg, chunk_size, matmul_dtype
    )
    return LossSums(kd=kd, rank=rank, ce=ce, total=total, count=keep.sum(dtype=torch.int64))


def distill_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherTopK,
    mask: Tensor | None,
    cfg: LossConfig,
    *,
    matmul_dtype: torch.dtype | None = None,
    low: tuple[Tensor, Tensor] | None = None,
) -> LossSums:
    """Plain version of `distill_loss` (same arguments, no chunk_size): all (N, V) logits at once.

    Plain autograd throughout; for tests and for measuring what chunking saves.
    """
    keep = position_mask(mask, hidden.shape[0], hidden.device)  # (N,)
    dtype = matmul_dtype or weight.dtype
    head_bias = None if bias is None else bias.to(dtype)  # (V,)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), head_bias).float()  # (N, V)
    if low is not None:
        logits = logits + F.linear(low[0].to(dtype), low[1].to(dtype)).float()  # (N, V)
    kd, rank, ce = _part_sums(logits, teacher, keep, cfg)
    total = _weighted(kd, rank, ce, cfg)
    return LossSums(kd=kd, rank=rank, ce=ce, total=total, count=keep.sum(dtype=torch.int64))
