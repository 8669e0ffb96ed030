"""How closely a student matches a cached teacher: the alignment metrics of rlkd-method.md.

`AlignmentMeter` streams over chunks of distilled positions (student logits plus the teacher's
cached top-k) and reports per-position means of:

- `overlap@k`, k in {1, 3, 5, 10, 20}: |topk(student) ∩ topk(teacher)| / k.
- `consistency@k`, k in {1, ..., 5}: 1 if the student's first k tokens equal the teacher's first
  k tokens, in order, else 0.
- `spearman`, `kendall`: hard-rank Spearman rho (average ranks for ties) and Kendall tau-b
  between the student's logits and the teacher's cached log-probs over the teacher's top-k.
- `kl`: forward KL with the tail bucket at temperature 1 (`kd_loss`, as in training-time eval).
- `ce`: the student's cross-entropy on the actual next tokens; `ppl` = exp(ce).
- `positions`: how many positions were measured.

Conventions (each pinned by a test):

- Capping. The cache knows the teacher's first k_c tokens only, and a vocabulary of V tokens has
  no top-k beyond V. A metric at k > min(k_c, V) is computed at k' = min(k, k_c, V) and keeps its
  key (`overlap@20` is then overlap@k'); the result also holds `"<key>_capped_to": k'` for every
  such key, e.g. `"overlap@20_capped_to": 8`. k_c and V must stay the same across updates.
- Constant positions. Where the teacher's top-k log-probs, or the student's logits on those
  tokens, are all equal, both correlations are undefined; such a position contributes 0 to
  `spearman` and `kendall` and still counts in `positions` (as `rank_correlation` does in
  training). With k_c = 1 every position is constant.
- Orders. The teacher's top-k set and order are the cache's (ties as the cache writer broke
  them). The student's are those of one `torch.topk` call per chunk, whose tie-breaking among
  equal logits is unspecified (not always the lowest index); every k reads a prefix of it.
- Sums are kept in float64 on the CPU; a meter with no positions reports 0 for every mean.

ROUGE-L for greedy generations: `rouge_l` and `mean_rouge_l`, the LCS-based F1 on lowercase word
tokens, with no external package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from rlkd_cache.losses.kl import cross_entropy_loss, kd_loss
from rlkd_cache.losses.softrank import rank_correlation

OVERLAP_KS: tuple[int, ...] = (1, 3, 5, 10, 20)
"""The k's of `overlap@k`."""

CONSISTENCY_KS: tuple[int, ...] = (1, 2, 3, 4, 5)
"""The k's of `consistency@k`."""

_PER_POSITION: tuple[str, ...] = (
    *(f"overlap@{k}" for k in OVERLAP_KS),
    *(f"consistency@{k}" for k in CONSISTENCY_KS),
    "spearman",
    "kendall",
)
"""Metrics summed from per-position values, in the order of `AlignmentMeter._sums`."""


def average_ranks(x: Tensor) -> Tensor:
    """Ascending 1-based ranks of each row; tied values share the average of their ranks.

    Rank of x_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2, by an (N, k, k) comparison.

    Args:
        x: (N, k) float.

    Returns:
        (N, k) float32 ranks in [1, k].
    """
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)  # (N, k) #j with x_j < x_i
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)  # (N, k) #j with x_j = x_i, i included
    return less.float() + (equal.float() + 1.0) / 2.0  # (N, k)


def spearman_rho(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rho of each row: the Pearson correlation of the average ranks.

    A row where x or y is constant gives 0.

    Args:
        x, y: (N, k) float.

    Returns:
        (N,) float32 in [-1, 1].
    """
    return rank_correlation(average_ranks(x), average_ranks(y))


def _pair_signs(x: Tensor) -> Tensor:
    """sign(x_i - x_j) for every pair, by comparisons (so -inf ties -inf). (N, k) -> (N, k, k)."""
    xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)  # (N, k, 1), (N, 1, k)
    return (xi > xj).to(torch.int8) - (xi < xj).to(torch.int8)  # (N, k, k)


def kendall_tau_b(x: Tensor, y: Tensor) -> Tensor:
    """Kendall tau-b of each row: (C - D) / sqrt((n0 - n_x) (n0 - n_y)).

    C and D count concordant and discordant pairs, n0 = k (k - 1) / 2 all pairs, n_x and n_y the
    pairs tied in x and in y. Over the full (k, k) sign matrices every term counts twice, which
    cancels. A row where x or y is constant gives 0.

    Args:
        x, y: (N, k) float.

    Returns:
        (N,) float32 in [-1, 1].
    """
    sx, sy = _pair_signs(x), _pair_signs(y)  # (N, k, k) each
    concordance = (sx * sy).sum(dim=(-2, -1), dtype=torch.int64)  # (N,) 2 (C - D)
    untied_x = sx.abs().sum(dim=(-2, -1), dtype=torch.int64)  # (N,) 2 (n0 - n_x)
    untied_y = sy.abs().sum(dim=(-2, -1), dtype=torch.int64)  # (N,) 2 (n0 - n_y)
    denom = (untied_x.double() * untied_y.double()).sqrt()  # (N,)
    tau = torch.where(denom > 0, concordance.double() / denom.clamp_min(1.0), 0.0)  # (N,)
    return tau.float()


def topk_overlap(student_top: Tensor, teacher_top: Tensor) -> Tensor:
    """How many of the student's tokens are among the teacher's. (N, k), (N, k) -> (N,) int64.

    Both rows must hold distinct token ids.
    """
    hits = student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)  # (N, k, k)
    return hits.any(-1).sum(-1)  # (N,)


class AlignmentMeter:
    """Streaming per-position means of the alignment metrics (see the module docstring).

    Feed it every chunk of distilled positions with `update`, then read `result`.
    """

    def __init__(self) -> None:
        self._sums = torch.zeros(len(_PER_POSITION) + 2, dtype=torch.float64)  # + kl, ce
        self._positions = 0
        self._cache_k: int | None = None
        self._vocab: int | None = None

    @torch.no_grad()
    def update(
        self,
        z: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        target_ids: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Add a chunk of positions.

        Args:
            z: (N, V) student logits, any float dtype (computed in fp32).
            topk_ids: (N, k_c) int64 teacher top-k token ids, distinct within a row.
            topk_logprobs: (N, k_c) teacher log-probs of those tokens, sorted descending.
            target_ids: (N,) int64 actual next tokens.
            mask: (N,) bool, False = leave the position out of every metric; None = all.
        """
        n, vocab = z.shape
        cache_k = topk_ids.shape[-1]
        if topk_ids.shape != (n, cache_k) or topk_logprobs.shape != (n, cache_k):
            raise ValueError(
                f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
                f"{tuple(topk_logprobs.shape)} must both be (N, k) with N = {n} (z is {(n, vocab)})"
            )
        if target_ids.shape != (n,):
            raise ValueError(f"target_ids has shape {tuple(target_ids.shape)}, expected ({n},)")
        if self._cache_k is None:
            self._cache_k, self._vocab = cache_k, vocab
        elif (cache_k, vocab) != (self._cache_k, self._vocab):
            raise ValueError(
                f"chunk has cache k {cache_k} and vocabulary {vocab}; earlier chunks had "
                f"{self._cache_k} and {self._vocab}"
            )
        if mask is not None:
            if mask.shape != (n,):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({n},)")
            keep = mask.to(torch.bool)
            z, topk_ids, topk_logprobs = z[keep], topk_ids[keep], topk_logprobs[keep]
            target_ids = target_ids[keep]
            n = z.shape[0]
        if n == 0:
            return

        z = z.float()  # (N, V)
        k_max = min(max(*OVERLAP_KS, *CONSISTENCY_KS), cache_k, vocab)
        student_top = z.topk(k_max, dim=-1).indices  # (N, k_max) descending
        columns = []
        for k in OVERLAP_KS:
            k_eff = min(k, k_max)
            overlap = topk_overlap(student_top[:, :k_eff], topk_ids[:, :k_eff])  # (N,)
            columns.append(overlap.float())  # a count, divided by k_eff in `result`
        for k in CONSISTENCY_KS:
            k_eff = min(k, k_max)
            same = (student_top[:, :k_eff] == topk_ids[:, :k_eff]).all(-1)  # (N,)
            columns.append(same.float())
        student_k = z.gather(-1, topk_ids)  # (N, k_c) student logits on the teacher's top-k
        teacher_k = topk_logprobs.float()  # (N, k_c)
        columns.append(spearman_rho(student_k, teacher_k))
        columns.append(kendall_tau_b(student_k, teacher_k))
        per_position = torch.stack(columns, dim=-1)  # (N, M)

        kl = kd_loss(z, topk_ids, topk_logprobs, kind="fkl", tail="bucket").total  # ()
        ce = cross_entropy_loss(z, target_ids).total  # ()
        chunk = torch.cat([per_position.cpu().double().sum(0), torch.stack([kl, ce]).cpu()])
        self._sums += chunk.double()
        self._positions += n

    @property
    def positions(self) -> int:
        """How many positions have been measured."""
        return self._positions

    def result(self) -> dict[str, float]:
        """Per-position means: every `overlap@k`, `consistency@k`, then `spearman`, `kendall`,
        `kl`, `ce`, `ppl` (exp ce), `positions` (int), and `"<key>_capped_to": k'` (int) for each
        metric computed at a k' smaller than its k."""
        means = (self._sums / max(self._positions, 1)).tolist()
        out: dict[str, float] = dict(zip(_PER_POSITION, means[:-2], strict=True))
        out["kl"], out["ce"] = means[-2], means[-1]
        out["ppl"] = math.exp(min(out["ce"], 700.0))
        out["positions"] = self._positions
        if self._cache_k is None or self._vocab is None:
            return out  # no update yet: every sum is 0
        limit = min(self._cache_k, self._vocab)
        for k in OVERLAP_KS:
            out[f"overlap@{k}"] /= min(k, limit)  # mean count of shared tokens -> fraction
        for name, ks in (("overlap", OVERLAP_KS), ("consistency", CONSISTENCY_KS)):
            out.update({f"{name}@{k}_capped_to": limit for k in ks if k > limit})
        return out


_WORD = re.compile(r"\w+")


def rouge_tokens(text: str | Sequence[str]) -> list[str]:
    """Lowercase word tokens of a text (runs of letters, digits and `_`; the rest splits).

    A sequence of strings is taken as already tokenized and only lowercased.
    """
    if isinstance(text, str):
        return _WORD.findall(text.lower())
    return [token.lower() for token in text]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) len(b)) DP)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-L F1: with L = LCS(candidate, reference) over `rouge_tokens`,
    P = L / |candidate|, R = L / |reference|, F1 = 2 P R / (P + R).

    A string is tokenized; a sequence of strings is taken as its tokens. An empty side gives 0
    (as the `rouge-score` package does).
    """
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    common = lcs_length(cand, ref) if cand and ref else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2.0 * precision * recall / (precision + recall)


def mean_rouge_l(pairs: Iterable[tuple[str | Sequence[str], str | Sequence[str]]]) -> float:
    """Mean `rouge_l` over (candidate, reference) pairs; 0 when there are none."""
    scores = [rouge_l(candidate, reference) for candidate, reference in pairs]
    return sum(scores) / len(scores) if scores else 0.0
