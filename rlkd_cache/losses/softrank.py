"""Differentiable soft ranks and a soft Spearman correlation, in plain PyTorch.

`soft_rank` equals `torchsort.soft_rank(x, regularization="l2", regularization_strength=eps)`
(Blondel et al. 2020, "Fast Differentiable Sorting and Ranking"): the ranks are the Euclidean
projection of x / eps onto the permutahedron of (1, ..., n), so the largest value gets rank n.
As eps -> 0 they become the hard ranks; ties get equal ranks. torchsort does not build here,
so the isotonic regression inside the projection is a batched pool-adjacent-violators in
PyTorch ops (our vectors are short: the RLKD union holds at most 2k elements), with the same
block-averaging backward as torchsort, ties included.

Rows may hold a variable number of valid entries (a fixed-width layout with a validity mask):
invalid entries take no part in any rank, mean or norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _blocks(y: Tensor, start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Block id, block size and block mean at every entry, given where blocks begin.

    Args:
        y: (N, n) values.
        start: (N, n) bool, True where a block begins (column 0 always True).

    Returns:
        (N, n) int64 block ids, (N, n) sizes and (N, n) means, each read at the entry's block.
    """
    block = start.long().cumsum(-1) - 1  # (N, n) in [0, n)
    total = torch.zeros_like(y).scatter_add(-1, block, y)  # (N, n) indexed by block id
    count = torch.zeros_like(y).scatter_add(-1, block, torch.ones_like(y))  # (N, n)
    size = count.gather(-1, block)  # (N, n)
    return block, size, total.gather(-1, block) / size


class _IsotonicDecreasing(torch.autograd.Function):
    """Batched pool-adjacent-violators with torchsort's backward (block averaging)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, length: Tensor) -> Tensor:
        n = y.shape[-1]
        idx = torch.arange(n, device=y.device)  # (n,)
        frozen = idx[None, :] >= length[:, None]  # (N, n) past the fit: singleton blocks
        start = torch.ones_like(frozen)  # (N, n) True where a block begins
        while True:
            block, size, mean = _blocks(y, start)  # (N, n) each
            before = torch.cat([mean[:, :1], mean[:, :-1]], dim=-1)  # (N, n) mean at i - 1
            # Pool a block into its left neighbour when their means are not strictly decreasing
            # (ties are pooled, as torchsort's PAV does); every such pair shares a block in the
            # solution, so all of them can be pooled at once.
            pool = start & (idx > 0) & ~frozen & (before <= mean)  # (N, n)
            if not bool(pool.any()):
                break
            start = start & ~pool
        ctx.save_for_backward(block, size)
        return mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        block, size = ctx.saved_tensors  # (N, n) each
        total = torch.zeros_like(grad).scatter_add(-1, block, grad)  # (N, n) per block id
        return total.gather(-1, block) / size, None


def isotonic_decreasing(y: Tensor, length: Tensor | None = None) -> Tensor:
    """Least-squares non-increasing fit: argmin_v ||v - y||^2 s.t. v_1 >= v_2 >= ... >= v_m.

    Exact, by pool-adjacent-violators run on all rows at once: every pass pools each block
    whose mean is not below its left neighbour's (at most m - 1 passes, usually a few). The
    backward averages the incoming gradient over each block, as torchsort does.

    Args:
        y: (N, n) float.
        length: (N,) int64, the fit covers each row's first `length` entries; the entries after
            them are returned unchanged. None = all n entries.

    Returns:
        (N, n) the fitted values.
    """
    if length is None:
        length = torch.full(y.shape[:-1], y.shape[-1], dtype=torch.long, device=y.device)
    return _IsotonicDecreasing.apply(y, length)


def soft_rank(theta: Tensor, strength: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """Soft ranks of each row, ascending (largest value -> rank m), with l2 regularization.

    r = P(theta / strength), P the projection onto the permutahedron of (1..m):
    with s = theta / strength sorted descending and w = (m, m-1, ..., 1),
    r_sorted = s - isotonic_decreasing(s - w), then r is unsorted back.

    Args:
        theta: (N, n) float scores (finite at valid entries).
        strength: regularization strength eps > 0; smaller is closer to hard ranks.
        valid: (N, n) bool, the entries to rank among (m = row count, >= 1); None = all.

    Returns:
        (N, n) soft ranks in [1, m] at valid entries (summing to m(m+1)/2), 0 at invalid ones.
    """
    if strength <= 0:
        raise ValueError(f"soft rank strength must be > 0, got {strength}")
    if valid is None:
        valid = torch.ones_like(theta, dtype=torch.bool)
    n = theta.shape[-1]
    scaled = torch.where(valid, theta, 0.0) / strength  # (N, n) invalid made finite
    key = scaled.detach().masked_fill(~valid, -torch.inf)  # (N, n) invalid sort last
    perm = key.argsort(dim=-1, descending=True, stable=True)  # (N, n)
    s = scaled.gather(-1, perm)  # (N, n) valid first, descending
    m = valid.sum(-1)  # (N,)
    w = (m[:, None] - torch.arange(n, device=theta.device)).to(s.dtype)  # (N, n) m, m-1, ...
    ranks_sorted = s - isotonic_decreasing(s - w, length=m)  # (N, n)
    ranks = ranks_sorted.gather(-1, perm.argsort(dim=-1))  # (N, n) back to input order
    return torch.where(valid, ranks, 0.0)


def rank_correlation(
    rank_x: Tensor, rank_y: Tensor, valid: Tensor | None = None, weights: Tensor | None = None
) -> Tensor:
    """Spearman-style correlation: dot product of centred, unit-normed rank vectors; with
    `weights`, the weighted Pearson correlation of the ranks (weighted means and norms).

    With w_i >= 0 and means x_w = sum w x / sum w: rho = sum w (x - x_w)(y - y_w) /
    sqrt(sum w (x - x_w)^2 * sum w (y - y_w)^2). Flat weights (all equal) give exactly the
    unweighted correlation. A row whose ranks are all equal (zero norm after centring)
    contributes a correlation of 0.

    Args:
        rank_x: (N, n) ranks (soft or hard) of the first variable.
        rank_y: (N, n) ranks of the second variable.
        valid: (N, n) bool, the entries that count; None = all.
        weights: (N, n) non-negative weight of each entry (not differentiated); None = flat.

    Returns:
        (N,) correlations in [-1, 1].
    """
    if valid is None:
        valid = torch.ones_like(rank_x, dtype=torch.bool)
    w = torch.ones_like(rank_x) if weights is None else weights.detach().to(rank_x.dtype)
    w = torch.where(valid, w, 0.0)  # (N, n)
    total = w.sum(-1, keepdim=True).clamp_min(1e-12)  # (N, 1)
    root = w.sqrt()  # (N, n)

    def unit(r: Tensor) -> Tensor:
        r = torch.where(valid, r, 0.0)  # (N, n)
        centred = root * torch.where(valid, r - (w * r).sum(-1, keepdim=True) / total, 0.0)
        norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)  # (N, 1)
        return centred / norm.clamp_min(1e-12)  # (N, n)

    return (unit(rank_x) * unit(rank_y)).sum(-1)


def top_weights(scores: Tensor, valid: Tensor) -> Tensor:
    """DCG-style weights that decay with each entry's rank by `scores`: 1 / log2(1 + p), p the
    1-based position from the top among the row's valid entries (tied entries share the mean
    of their positions). Position 1 weighs 1, position 2 0.63, position 15 0.25.

    Args:
        scores: (N, n) float, larger = nearer the top.
        valid: (N, n) bool.

    Returns:
        (N, n) weights in (0, 1] at valid entries, 0 at invalid ones.
    """
    other = scores[:, None, :]  # (N, 1, n) the entries compared against
    counted = valid[:, None, :]  # (N, 1, n)
    above = ((other > scores[:, :, None]) & counted).sum(-1)  # (N, n)
    tied = ((other == scores[:, :, None]) & counted).sum(-1)  # (N, n) includes the entry
    position = above.to(scores.dtype) + (tied.to(scores.dtype) + 1) / 2  # (N, n) >= 1
    return torch.where(valid, 1.0 / torch.log2(1.0 + position), 0.0)
