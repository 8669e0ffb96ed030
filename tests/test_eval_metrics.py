"""Tests of the alignment metrics and ROUGE-L (rlkd_cache.eval.metrics).

Hand-computed cases pin every convention (teacher ties, k above the cache's k and above the
vocabulary, constant positions, masks); a plain-Python per-position reference checks the
vectorized meter on random inputs, and streaming over chunks must equal one big update.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from rlkd_cache.eval.metrics import (
    CONSISTENCY_KS,
    OVERLAP_KS,
    AlignmentMeter,
    average_ranks,
    kendall_tau_b,
    lcs_length,
    mean_rouge_l,
    rouge_l,
    spearman_rho,
)

BASE_KEYS = {
    *(f"overlap@{k}" for k in OVERLAP_KS),
    *(f"consistency@{k}" for k in CONSISTENCY_KS),
    "spearman",
    "kendall",
    "kl",
    "ce",
    "ppl",
    "positions",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def measure(
    z: list[list[float]],
    ids: list[list[int]],
    logprobs: list[list[float]],
    targets: list[int] | None = None,
) -> dict[str, float]:
    """One update of a fresh meter on hand-written rows."""
    meter = AlignmentMeter()
    n = len(z)
    meter.update(
        torch.tensor(z),
        torch.tensor(ids),
        torch.tensor(logprobs),
        torch.tensor(targets if targets is not None else [0] * n),
    )
    return meter.result()


# ---------------------------------------------------------------- hand-computed cases


def test_hand_case_capped_by_cache_k() -> None:
    # V = 6, k_c = 4. Student order by logit: 2 (5), 0 (4), 1 (3), 5 (2), 3 (1), 4 (0).
    # Teacher (cache) order: 2, 0, 5, 1.
    out = measure(
        z=[[4.0, 3.0, 5.0, 1.0, 0.0, 2.0]],
        ids=[[2, 0, 5, 1]],
        logprobs=[[-1.0, -1.5, -2.5, -3.5]],
    )
    assert out["overlap@1"] == 1.0  # {2} ∩ {2}
    assert out["overlap@3"] == pytest.approx(2 / 3)  # {2,0,1} ∩ {2,0,5} = {2,0}
    for k in (5, 10, 20):  # capped to k_c = 4: {2,0,1,5} ∩ {2,0,5,1} = 4 of 4
        assert out[f"overlap@{k}"] == 1.0
        assert out[f"overlap@{k}_capped_to"] == 4
    assert out["consistency@1"] == 1.0  # [2] = [2]
    assert out["consistency@2"] == 1.0  # [2,0] = [2,0]
    assert out["consistency@3"] == 0.0  # [2,0,1] != [2,0,5]
    assert out["consistency@4"] == 0.0
    assert out["consistency@5"] == 0.0  # capped to 4
    assert out["consistency@5_capped_to"] == 4
    # Over K = [2,0,5,1]: teacher ranks (ascending) [4,3,2,1]; student logits [5,4,2,3] -> ranks
    # [4,3,1,2]; d = [0,0,1,-1], sum d^2 = 2: rho = 1 - 6*2 / (4*(16-1)) = 1 - 12/60 = 0.8.
    assert out["spearman"] == pytest.approx(0.8, abs=1e-6)
    # Pairs of K: all concordant but (5,1): teacher -2.5 > -3.5, student 2 < 3. tau = (5-1)/6.
    assert out["kendall"] == pytest.approx(2 / 3, abs=1e-6)
    assert out["positions"] == 1
    assert set(out) == BASE_KEYS | {
        "overlap@5_capped_to",
        "overlap@10_capped_to",
        "overlap@20_capped_to",
        "consistency@5_capped_to",
    }


def test_hand_case_teacher_ties() -> None:
    # V = 5, K = [0,1,2,3] with teacher log-probs tied in pairs; the cache order breaks the ties
    # (teacher top-1 is token 0, top-2 is [0,1]). Student order: 0 (3), 2 (2), 1 (1), 3 (0), 4.
    out = measure(
        z=[[3.0, 1.0, 2.0, 0.0, -1.0]],
        ids=[[0, 1, 2, 3]],
        logprobs=[[-1.5, -1.5, -2.0, -2.0]],
    )
    assert out["overlap@1"] == 1.0  # {0} ∩ {0}
    assert out["overlap@3"] == 1.0  # {0,2,1} ∩ {0,1,2}
    assert out["consistency@1"] == 1.0
    assert out["consistency@2"] == 0.0  # [0,2] != [0,1]
    # Teacher average ranks [3.5,3.5,1.5,1.5], centred [1,1,-1,-1] (norm 2); student values
    # [3,1,2,0] -> ranks [4,2,3,1], centred [1.5,-0.5,0.5,-1.5] (norm sqrt 5); dot = 2:
    # rho = 2 / (2 sqrt 5) = 1/sqrt 5.
    assert out["spearman"] == pytest.approx(1 / math.sqrt(5), abs=1e-6)
    # Pairs: (0,1) teacher tie; (0,2) C; (0,3) C; (1,2) D (teacher >, student 1 < 2); (1,3) C;
    # (2,3) teacher tie. n0 = 6, n_teacher = 2, n_student = 0:
    # tau_b = (3 - 1) / sqrt((6-2) * (6-0)) = 2 / sqrt 24.
    assert out["kendall"] == pytest.approx(2 / math.sqrt(24), abs=1e-6)


def test_hand_case_k_larger_than_vocabulary() -> None:
    # V = 3 = k_c: the cache holds the whole vocabulary, p = [0.3, 0.6, 0.1] over tokens 0..2.
    # Student logits [0,1,2]: order 2, 1, 0; teacher order 1, 0, 2.
    p = [0.3, 0.6, 0.1]
    out = measure(
        z=[[0.0, 1.0, 2.0]],
        ids=[[1, 0, 2]],
        logprobs=[[math.log(0.6), math.log(0.3), math.log(0.1)]],
        targets=[2],
    )
    assert out["overlap@1"] == 0.0  # {2} ∩ {1}
    assert out["overlap@3"] == 1.0  # the whole vocabulary on both sides
    for k in (5, 10, 20):
        assert out[f"overlap@{k}"] == 1.0
        assert out[f"overlap@{k}_capped_to"] == 3
    for k in CONSISTENCY_KS:  # [2,...] never starts like [1,...]
        assert out[f"consistency@{k}"] == 0.0
    assert out["consistency@4_capped_to"] == out["consistency@5_capped_to"] == 3
    assert "consistency@3_capped_to" not in out
    # Over K = [1,0,2]: teacher ranks [3,2,1]; student values [1,0,2] -> ranks [2,1,3];
    # d = [1,1,-2], sum d^2 = 6: rho = 1 - 6*6 / (3*8) = -0.5.
    assert out["spearman"] == pytest.approx(-0.5, abs=1e-6)
    # (1,0): teacher >, student 1 > 0 C; (1,2): teacher >, student 1 < 2 D; (0,2): D.
    assert out["kendall"] == pytest.approx(-1 / 3, abs=1e-6)
    # No tail (k = V): the dense KL(p || softmax z).
    lse = math.log(1 + math.e + math.e**2)
    q = [math.exp(v - lse) for v in (0.0, 1.0, 2.0)]
    assert out["kl"] == pytest.approx(
        sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)), rel=1e-5
    )
    assert out["ce"] == pytest.approx(lse - 2.0, rel=1e-6)  # -log softmax(z)[2]
    assert out["ppl"] == pytest.approx(math.exp(lse - 2.0), rel=1e-6)


def test_constant_positions_contribute_zero() -> None:
    # V = 5, k_c = 3, three positions:
    # A: teacher [-1,-2,-3] on [0,1,2], student [3,2,1] there: rho = tau = 1.
    # B: teacher constant on K: both 0.   C: student constant on K: both 0.
    # Means over the 3 positions: 1/3.
    out = measure(
        z=[[3.0, 2.0, 1.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0, 0.0]],
        ids=[[0, 1, 2]] * 3,
        logprobs=[[-1.0, -2.0, -3.0], [-1.5, -1.5, -1.5], [-1.0, -2.0, -3.0]],
    )
    assert out["spearman"] == pytest.approx(1 / 3, abs=1e-6)
    assert out["kendall"] == pytest.approx(1 / 3, abs=1e-6)
    assert out["positions"] == 3


def test_cache_k_of_one_gives_zero_correlations() -> None:
    out = measure(z=[[2.0, 1.0, 0.0]], ids=[[0]], logprobs=[[-0.1]])
    assert out["spearman"] == 0.0 and out["kendall"] == 0.0
    assert out["overlap@1"] == 1.0 and "overlap@1_capped_to" not in out
    assert out["overlap@3_capped_to"] == 1 and out["consistency@2_capped_to"] == 1


def test_average_ranks_hand() -> None:
    x = torch.tensor([[10.0, 20.0, 10.0, 30.0, 10.0]])
    # Three 10's share ranks 1,2,3 -> 2; then 20 -> 4, 30 -> 5.
    assert average_ranks(x).tolist() == [[2.0, 4.0, 2.0, 5.0, 2.0]]


def test_empty_meter_and_masked_positions() -> None:
    out = AlignmentMeter().result()
    assert set(out) == BASE_KEYS
    assert out["positions"] == 0 and out["ppl"] == 1.0 and out["overlap@1"] == 0.0

    z, ids, lp, targets = random_case(seed=3, n=12, vocab=30, cache_k=6)
    keep = torch.tensor([True, False] * 6)
    bad_targets = torch.where(keep, targets, -100)  # ignore-index at masked positions
    masked, selected = AlignmentMeter(), AlignmentMeter()
    masked.update(z, ids, lp, bad_targets, mask=keep)
    selected.update(z[keep], ids[keep], lp[keep], targets[keep])
    assert masked.result() == selected.result()
    assert masked.positions == 6


def test_changing_cache_k_between_updates_is_an_error() -> None:
    meter = AlignmentMeter()
    z, ids, lp, targets = random_case(seed=0, n=4, vocab=20, cache_k=5)
    meter.update(z, ids, lp, targets)
    with pytest.raises(ValueError, match="cache k 4"):
        meter.update(z, ids[:, :4], lp[:, :4], targets)


# ---------------------------------------------------------------- perfect student


def test_perfect_student_same_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 100, generator=gen) * 3  # (N, V)
    top = teacher.log_softmax(-1).topk(20, dim=-1)
    meter = AlignmentMeter()
    meter.update(teacher, top.indices, top.values, teacher.argmax(-1))
    out = meter.result()
    for key in (
        *(f"overlap@{k}" for k in OVERLAP_KS),
        *(f"consistency@{k}" for k in CONSISTENCY_KS),
    ):
        assert out[key] == 1.0, key
    assert out["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert out["kendall"] == pytest.approx(1.0, abs=1e-6)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)


def test_perfect_student_logprobs_on_topk_only() -> None:
    # The teacher puts all its mass on its top-k; the student's logits are the cached log-probs
    # on K and -1e4 elsewhere.
    gen = torch.Generator().manual_seed(1)
    n, vocab, k = 32, 80, 20
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])  # (N, k)
    logits = torch.randn(n, k, generator=gen) * 2
    lp = logits.log_softmax(-1).sort(-1, descending=True).values  # (N, k) sums to 1
    z = torch.full((n, vocab), -1e4).scatter(-1, ids, lp)  # (N, V)
    meter = AlignmentMeter()
    meter.update(z, ids, lp, ids[:, 0])
    out = meter.result()
    assert all(out[f"overlap@{k}"] == 1.0 for k in OVERLAP_KS)
    assert all(out[f"consistency@{k}"] == 1.0 for k in CONSISTENCY_KS)
    assert out["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert out["kendall"] == pytest.approx(1.0, abs=1e-6)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- slow reference


def slow_average_ranks(values: list[float]) -> list[float]:
    """Sort, then give each run of equal values the mean of its 1-based positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def slow_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = slow_average_ranks(x), slow_average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0


def slow_kendall_tau_b(x: list[float], y: list[float]) -> float:
    concordant = discordant = tied_x = tied_y = pairs = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            pairs += 1
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denom if denom > 0 else 0.0


def slow_metrics(z: Tensor, ids: Tensor, lp: Tensor, targets: Tensor) -> dict[str, float]:
    """Per-position loop in float64 numpy; the same key layout as `AlignmentMeter.result`."""
    z64, a64 = z.double().numpy(), lp.double().numpy()
    n, vocab = z64.shape
    cache_k = ids.shape[1]
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    for row in range(n):
        teacher = [int(t) for t in ids[row]]
        student = [int(t) for t in np.argsort(-z64[row], kind="stable")]
        for k in OVERLAP_KS:
            kk = min(k, cache_k, vocab)
            add(f"overlap@{k}", len(set(student[:kk]) & set(teacher[:kk])) / kk)
        for k in CONSISTENCY_KS:
            kk = min(k, cache_k, vocab)
            add(f"consistency@{k}", float(student[:kk] == teacher[:kk]))
        s_k, t_k = [float(z64[row, t]) for t in teacher], [float(v) for v in a64[row]]
        add("spearman", slow_spearman(s_k, t_k))
        add("kendall", slow_kendall_tau_b(s_k, t_k))
        log_q = z64[row] - np.log(np.exp(z64[row] - z64[row].max()).sum()) - z64[row].max()
        p_k, q_k = np.exp(a64[row]), np.exp(log_q[teacher])
        if cache_k == vocab:  # no tail: the teacher renormalized over the vocabulary
            p_k = p_k / p_k.sum()
            kl = float((p_k * np.log(p_k / q_k)).sum())
        else:
            p_tail = 1.0 - p_k.sum()
            q_tail = np.exp(np.delete(log_q, teacher)).sum()
            kl = float((p_k * np.log(p_k / q_k)).sum() + p_tail * math.log(p_tail / q_tail))
        add("kl", kl)
        add("ce", -float(log_q[int(targets[row])]))
    out = {key: value / n for key, value in sums.items()}
    out["ppl"] = math.exp(out["ce"])
    out["positions"] = n
    limit = min(cache_k, vocab)
    for name, ks in (("overlap", OVERLAP_KS), ("consistency", CONSISTENCY_KS)):
        out.update({f"{name}@{k}_capped_to": limit for k in ks if k > limit})
    return out


def random_case(
    seed: int, n: int, vocab: int, cache_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A student correlated with a teacher whose cached log-probs are floored to steps of 1/4
    (so they tie), and random targets. Returns z (N, V), ids (N, k), logprobs (N, k), (N,)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, vocab)) * 2.0
    log_p = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    ids = np.argsort(-log_p, axis=-1, kind="stable")[:, :cache_k]
    lp = np.floor(np.take_along_axis(log_p, ids, -1) * 4.0) / 4.0  # descending, with ties
    z = teacher + rng.normal(size=(n, vocab)) * 1.5
    targets = rng.integers(0, vocab, size=n)
    return (
        torch.tensor(z, dtype=torch.float32),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(lp, dtype=torch.float32),
        torch.tensor(targets, dtype=torch.int64),
    )


SHAPES = [(1, 5, 5), (9, 12, 3), (17, 40, 20), (13, 30, 30), (8, 200, 64), (21, 64, 8)]


@pytest.mark.parametrize(("n", "vocab", "cache_k"), SHAPES)
def test_meter_matches_slow_reference(n: int, vocab: int, cache_k: int) -> None:
    z, ids, lp, targets = random_case(seed=n * 1000 + vocab, n=n, vocab=vocab, cache_k=cache_k)
    meter = AlignmentMeter()
    meter.update(z, ids, lp, targets)
    got, want = meter.result(), slow_metrics(z, ids, lp, targets)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize(("n", "vocab", "cache_k"), SHAPES)
def test_streaming_equals_one_update(n: int, vocab: int, cache_k: int) -> None:
    z, ids, lp, targets = random_case(seed=n + vocab, n=n, vocab=vocab, cache_k=cache_k)
    whole, streamed = AlignmentMeter(), AlignmentMeter()
    whole.update(z, ids, lp, targets)
    bounds = sorted({0, n, *np.random.default_rng(n).integers(0, n + 1, size=3).tolist()})
    for start, end in itertools.pairwise(bounds):
        streamed.update(z[start:end], ids[start:end], lp[start:end], targets[start:end])
    streamed.update(z[:0], ids[:0], lp[:0], targets[:0])  # an empty chunk changes nothing
    got, want = streamed.result(), whole.result()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("k", [1, 2, 5, 17, 64])
def test_rank_correlations_match_slow_with_ties(k: int) -> None:
    # Values from {0, 1, 2, 3} on both sides: many ties, some constant rows.
    rng = np.random.default_rng(k)
    x = rng.integers(0, 4, size=(40, k)).astype(np.float32)
    y = rng.integers(0, 4, size=(40, k)).astype(np.float32)
    x[0], y[1] = 2.0, 1.0  # one constant row on each side
    y[2] = x[2] * 2 + 1  # a monotone row: rho = tau = 1 unless constant
    rho = spearman_rho(torch.tensor(x), torch.tensor(y)).tolist()
    tau = kendall_tau_b(torch.tensor(x), torch.tensor(y)).tolist()
    for row in range(40):
        xs, ys = x[row].tolist(), y[row].tolist()
        assert rho[row] == pytest.approx(slow_spearman(xs, ys), abs=1e-5)
        assert tau[row] == pytest.approx(slow_kendall_tau_b(xs, ys), abs=1e-5)
    assert rho[0] == tau[0] == rho[1] == tau[1] == 0.0
    if k > 1 and len(set(x[2].tolist())) > 1:
        assert rho[2] == pytest.approx(1.0) and tau[2] == pytest.approx(1.0)


def test_kendall_handles_infinite_ties() -> None:
    # -inf ties -inf (a cache slot the teacher gave no mass); x - y would be nan there.
    x = torch.tensor([[0.0, -1.0, -math.inf, -math.inf]])
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # Pairs: 5 concordant, 1 tied in x: tau_b = 5 / sqrt(5 * 6).
    assert kendall_tau_b(x, y).item() == pytest.approx(5 / math.sqrt(30), abs=1e-6)


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_cases() -> None:
    assert rouge_l("The cat sat.", "the cat sat") == 1.0  # case and punctuation ignored
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat = 4; P = R = 4/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # Candidate [a, b, c], reference [a, x, b, y, c, z]: LCS 3, P = 1, R = 1/2,
    # F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert rouge_l("A, B; c!", "a x b y c z") == pytest.approx(2 / 3)
    assert rouge_l(["The", "cat"], "the cat") == 1.0  # a list is taken as tokens
    assert rouge_l("", "the cat") == 0.0 and rouge_l("", "") == 0.0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the CLRS example


def test_mean_rouge_l() -> None:
    pairs = [("the cat sat", "the cat sat"), ("alpha", "beta")]
    assert mean_rouge_l(pairs) == pytest.approx(0.5)
    assert mean_rouge_l([]) == 0.0
