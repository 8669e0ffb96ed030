"""The one reduction rule every loss in this package follows.

A loss returns a `SumCount`: the SUM of its per-position values over the unmasked (distilled)
positions, and the COUNT of those positions. Nothing here averages. The trainer adds the sums
of every micro-batch (and every DDP rank) and divides once by the global count of distilled
positions in the optimizer step, so gradient accumulation and data parallelism give the same
update as one big batch. An all-masked or empty batch gives a sum of exactly 0 and a count of 0.

A masked-out position removes its value and gradient, not its indexing: its token ids must
still lie in the vocabulary and its values be finite (cross-entropy alone tolerates ignore-index
targets such as -100 there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SumCount(NamedTuple):
    """A loss summed over distilled positions, with how many positions it covers."""

    total: Tensor
    """() float32: the sum of the per-position loss over unmasked positions."""
    count: Tensor
    """() int64: the number of unmasked positions."""


def position_mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Return the mask of distilled positions, all True when `mask` is None.

    Args:
        mask: (N,) bool, True = distilled, or None.
        n: N, the number of positions.
        device: where to build the all-True mask.

    Returns:
        (N,) bool.
    """
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({n},)")
    return mask.to(dtype=torch.bool)


def masked_sum(per_position: Tensor, mask: Tensor) -> SumCount:
    """Sum a per-position loss over the unmasked positions.

    Masked positions are removed with `torch.where`, not multiplied by 0, so a non-finite
    value at an ignored position can never leak into the sum.

    Args:
        per_position: (N,) float, the loss at each position.
        mask: (N,) bool, True = count this position.

    Returns:
        The sum over `mask` (float32) and the number of True entries in `mask`.
    """
    kept = torch.where(mask, per_position, torch.zeros_like(per_position))  # (N,)
    return SumCount(total=kept.sum(dtype=torch.float32), count=mask.sum(dtype=torch.int64))
