"""Tests of the soft rank (rlkd_cache.losses.softrank) and the RLKD ranking loss (ranking).

The soft rank is checked against torchsort's documented outputs, against hard ranks as the
regularization vanishes, and against a loop-based, one-list-at-a-time implementation; the
censored union against hand-built positions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from rlkd_cache.losses.ranking import UnionMode, rank_union, rlkd_rank_loss
from rlkd_cache.losses.softrank import isotonic_decreasing, rank_correlation, soft_rank

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def pav_decreasing(y: list[float]) -> list[float]:
    """Textbook pool-adjacent-violators for a non-increasing fit, one list, plain Python."""
    blocks: list[tuple[float, int]] = []  # (sum, size)
    for value in y:
        blocks.append((value, 1))
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] <= blocks[-1][0] / blocks[-1][1]:
            total, size = blocks.pop()
            blocks[-1] = (blocks[-1][0] + total, blocks[-1][1] + size)
    return [total / size for total, size in blocks for _ in range(size)]


def brute_soft_rank(x: list[float], strength: float) -> list[float]:
    """Projection of x / strength onto the permutahedron of (1..n), written out directly."""
    n = len(x)
    order = sorted(range(n), key=lambda i: -x[i])
    s = [x[i] / strength for i in order]
    fit = pav_decreasing([s[pos] - (n - pos) for pos in range(n)])
    ranks = [0.0] * n
    for pos, i in enumerate(order):
        ranks[i] = s[pos] - fit[pos]
    return ranks


def hard_ranks(x: Tensor) -> Tensor:
    """Ascending ranks 1..n of distinct values. (N, n) -> (N, n)."""
    return (x.argsort(-1).argsort(-1) + 1).to(x.dtype)


def random_rows(seed: int, n_rows: int, width: int, ties: bool) -> tuple[Tensor, Tensor]:
    """Float64 scores (some rounded to create ties) and a validity mask with >= 1 valid entry."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, width, generator=gen, dtype=torch.float64) * 3
    if ties:
        x = (x * 2).round() / 2
    valid = torch.rand(n_rows, width, generator=gen) < 0.7
    valid[:, 0] = True
    return x, valid


def test_soft_rank_and_spearman_match_torchsort_readme() -> None:
    x = torch.tensor([[8.0, 0.0, 5.0, 3.0, 2.0, 1.0, 6.0, 7.0, 9.0]])
    expected = torch.tensor([[8.0, 1.0, 5.0, 4.0, 3.0, 2.0, 6.0, 7.0, 9.0]])
    torch.testing.assert_close(soft_rank(x), expected)

    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    target = torch.tensor([[5.0, 6.0, 7.0, 8.0, 7.0]])
    rho = rank_correlation(soft_rank(pred), soft_rank(target))
    (grad,) = torch.autograd.grad(rho.sum(), pred)
    torch.testing.assert_close(rho, torch.tensor([0.8321]), atol=1e-4, rtol=0)
    expected_grad = torch.tensor([[-5.5470e-02, 0.0, 5.5470e-02, 1.1094e-01, -1.1094e-01]])
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_soft_rank_approaches_hard_ranks() -> None:
    x, _ = random_rows(seed=0, n_rows=8, width=30, ties=False)
    errors = [
        float((soft_rank(x, strength) - hard_ranks(x)).abs().max())
        for strength in (10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-6)
    ]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))
    assert errors[0] > 1.0
    assert errors[-1] < 1e-9


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(1, 24),
    strength=st.sampled_from([1e-3, 0.1, 1.0, 3.0]),
    ties=st.booleans(),
)
def test_soft_rank_matches_brute_force(seed: int, width: int, strength: float, ties: bool) -> None:
    x, valid = random_rows(seed, n_rows=4, width=width, ties=ties)
    got = soft_rank(x, strength, valid)
    for row in range(x.shape[0]):
        expected = brute_soft_rank(x[row][valid[row]].tolist(), strength)
        torch.testing.assert_close(got[row][valid[row]].tolist(), expected, atol=1e-8, rtol=1e-8)
        assert bool((got[row][~valid[row]] == 0).all())


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 30), ties=st.booleans())
def test_isotonic_matches_brute_force_pav(seed: int, width: int, ties: bool) -> None:
    y, valid = random_rows(seed, n_rows=3, width=width, ties=ties)
    length = valid.sum(-1)
    got = isotonic_decreasing(y, length)
    for row, m in enumerate(length.tolist()):
        torch.testing.assert_close(got[row, :m].tolist(), pav_decreasing(y[row, :m].tolist()))
        torch.testing.assert_close(got[row, m:], y[row, m:])


def test_soft_rank_gradient_matches_finite_differences() -> None:
    x, valid = random_rows(seed=1, n_rows=3, width=12, ties=False)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, 0.7, valid), (x,))


def test_spearman_with_itself_is_one_and_with_its_reverse_minus_one() -> None:
    x, valid = random_rows(seed=2, n_rows=6, width=15, ties=False)
    valid[:, 1] = True  # at least two entries per row
    for strength in (0.1, 1.0, 10.0):
        ranks = soft_rank(x, strength, valid)
        reverse = soft_rank(-x, strength, valid)
        torch.testing.assert_close(rank_correlation(ranks, ranks, valid), torch.ones(6).double())
        torch.testing.assert_close(rank_correlation(ranks, reverse, valid), -torch.ones(6).double())
    ascending = torch.arange(10.0)[None]
    rho = rank_correlation(soft_rank(ascending), soft_rank(ascending.flip(-1)))
    torch.testing.assert_close(rho, torch.tensor([-1.0]))


def test_gradients_are_finite_with_ties() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 5.0], [3.0, 3.0, 3.0, -1.0]])
    x.requires_grad_()
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(3, 4)
    rho = rank_correlation(soft_rank(x, 0.5), soft_rank(target, 0.5))
    (grad,) = torch.autograd.grad(rho.sum(), x)
    assert torch.isfinite(rho).all() and torch.isfinite(grad).all()
    assert rho[0].item() == 0.0  # all-equal ranks: zero norm, correlation 0


def test_invalid_entries_are_inert() -> None:
    x, valid = random_rows(seed=3, n_rows=5, width=10, ties=False)
    other = torch.where(valid, x, torch.full_like(x, 1e6))  # garbage at invalid entries
    x.requires_grad_()
    ranks = soft_rank(x, 1.0, valid)
    torch.testing.assert_close(ranks, soft_rank(other, 1.0, valid))
    target = soft_rank(torch.randn(5, 10, dtype=torch.float64), 1.0, valid)
    rho = rank_correlation(ranks, target, valid)
    (grad,) = torch.autograd.grad(rho.sum(), x)
    assert bool((grad[~valid] == 0).all())
    for row in range(5):
        keep = valid[row]
        compact = rank_correlation(
            soft_rank(x[row][keep][None], 1.0), soft_rank(target[row][keep][None].detach(), 1.0)
        )
        torch.testing.assert_close(rho[row : row + 1], compact)


def censored_case() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Two positions, V = 20, teacher top-6 = tokens 0..5, rank_k = 4 in the tests.

    Row 0: student top-4 = 7 (the actual token, outside K), 4 (in K past rank_k), 1 (a teacher
    column: duplicate), 9 (outside K: censored). Row 1: same student, but a teacher whose
    uniform-tail value lies above its smallest cached value (so the clamp matters).

    Returns:
        z (2, V), topk_ids (2, 6), topk_logprobs (2, 6), target_ids (2,), target_logprobs (2,).
    """
    z = torch.zeros(2, 20)
    z[:, [7, 4, 1, 9]] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    ids = torch.arange(6).repeat(2, 1)
    probs = torch.tensor(
        [[0.4, 0.2, 0.1, 0.08, 0.05, 0.03], [0.1, 0.02, 0.01, 0.005, 0.003, 0.001]]
    )
    targets = torch.tensor([7, 7])
    return z, ids, probs.log(), targets, torch.tensor([0.02, 0.0001]).log()


def test_censored_union_layout_and_teacher_scores() -> None:
    z, ids, logprobs, targets, target_logprobs = censored_case()
    union = rank_union(z, ids, logprobs, targets, target_logprobs, rank_k=4, union="censored")
    assert union.ids.tolist() == [[0, 1, 2, 3, 7, 4, 1, 9]] * 2
    assert union.valid.tolist() == [[True] * 6 + [False, True]] * 2
    scores = union.teacher_scores
    torch.testing.assert_close(scores[:, :4], logprobs[:, :4])  # teacher columns: cached
    torch.testing.assert_close(scores[:, 5], logprobs[:, 4])  # in K past rank_k: cached
    torch.testing.assert_close(scores[0, 4], target_logprobs[0])  # actual token: its own value
    uniform_tail = math.log((1 - 0.86) / (20 - 6))
    torch.testing.assert_close(float(scores[0, 7]), uniform_tail)
    # Row 1: uniform tail log(0.861 / 14) is above the 6th cached value log(0.001): clamped below.
    lowest = logprobs.min(-1).values
    assert bool((scores[:, 7] < lowest).all())
    assert float(scores[1, 7]) > float(lowest[1]) - 1e-4
    # Outside K, every token ranks below all of K.
    ranks = soft_rank(scores, 1e-4, union.valid)
    outside = [4, 7]
    assert bool((ranks[:, outside].max(-1).values < ranks[:, [0, 1, 2, 3, 5]].min(-1).values).all())


def test_teacher_union_is_the_first_rank_k_columns() -> None:
    z, ids, logprobs, targets, target_logprobs = censored_case()
    union = rank_union(z, ids, logprobs, targets, target_logprobs, rank_k=3, union="teacher")
    assert union.ids.tolist() == [[0, 1, 2]] * 2
    assert bool(union.valid.all())
    torch.testing.assert_close(union.teacher_scores, logprobs[:, :3])


def teacher_and_student(
    seed: int, n: int, vocab: int, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Teacher log-probs (N, V), student logits (N, V) and the cache fields drawn from them."""
    gen = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(n, vocab, generator=gen) * 3).log_softmax(-1)
    student = torch.randn(n, vocab, generator=gen) * 3
    top = teacher.topk(k, dim=-1)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return (
        teacher,
        student,
        top.indices,
        top.values,
        targets,
        teacher.gather(-1, targets[:, None])[:, 0],
    )


@pytest.mark.parametrize("rank_k", [3, 8])
@pytest.mark.parametrize("union", ["censored", "teacher"])
def test_a_student_equal_to_the_teacher_has_zero_loss(rank_k: int, union: UnionMode) -> None:
    teacher, _, ids, values, targets, target_values = teacher_and_student(0, 6, 40, 8)
    args = (teacher + 3.0, ids, values, targets, target_values)
    got = rlkd_rank_loss(*args, rank_k=rank_k, union=union)
    assert abs(float(got.total)) < 1e-5 and int(got.count) == 6


def test_duplicates_count_once() -> None:
    _, _, ids, values, targets, target_values = teacher_and_student(1, 6, 40, 8)
    student = torch.randn(6, 40) - 100.0
    student.scatter_(-1, ids[:, :4], torch.tensor([4.0, 1.0, 3.0, 2.0]).repeat(6, 1))
    # The student's top-4 is the teacher's top-4 (in another order): no student column is valid.
    union = rank_union(student, ids, values, targets, target_values, rank_k=4, union="censored")
    assert not bool(union.valid[:, 4:].any())
    censored = rlkd_rank_loss(student, ids, values, targets, target_values, rank_k=4)
    teacher_only = rlkd_rank_loss(
        student, ids, values, targets, target_values, rank_k=4, union="teacher"
    )
    torch.testing.assert_close(censored.total, teacher_only.total)
    assert float(censored.total) > 0.5  # the order differs


def test_censored_union_penalizes_a_false_peak() -> None:
    teacher, _, ids, values, targets, target_values = teacher_and_student(2, 5, 40, 8)
    student = teacher.clone()
    outside = teacher.argmin(-1)  # the teacher's least likely token, far outside K
    student.scatter_(-1, outside[:, None], 5.0)  # the student's top-1
    args = (student, ids, values, targets, target_values)
    blind = rlkd_rank_loss(*args, rank_k=4, union="teacher")
    censored = rlkd_rank_loss(*args, rank_k=4, union="censored")
    assert abs(float(blind.total)) < 1e-5
    assert float(censored.total) > 0.5


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(8, 60),
    rank_k=st.integers(2, 8),
    scale=st.sampled_from([0.01, 1.0, 1e4]),
    strength=st.sampled_from([0.01, 1.0, 100.0]),
)
def test_rank_loss_is_bounded_with_finite_gradients(
    seed: int, vocab: int, rank_k: int, scale: float, strength: float
) -> None:
    _, student, ids, values, targets, target_values = teacher_and_student(seed, 5, vocab, 8)
    z = (student * scale).requires_grad_()
    mask = torch.tensor([True, True, False, True, True])
    got = rlkd_rank_loss(
        z, ids, values, targets, target_values, mask, rank_k=rank_k, strength=strength
    )
    (grad,) = torch.autograd.grad(got.total, z)
    assert -1e-5 <= got.total.item() <= 2 * 4 + 1e-5
    assert torch.isfinite(grad).all()
    assert bool((grad[2] == 0).all())


def test_masked_empty_and_one_hot_batches() -> None:
    _, student, ids, values, targets, target_values = teacher_and_student(3, 4, 30, 6)
    z = student.requires_grad_()
    none = torch.zeros(4, dtype=torch.bool)
    masked = rlkd_rank_loss(z, ids, values, targets, target_values, none, rank_k=4)
    (grad,) = torch.autograd.grad(masked.total, z)
    assert masked.total.item() == 0.0 and int(masked.count) == 0
    assert torch.equal(grad, torch.zeros_like(grad))
    empty = rlkd_rank_loss(z[:0], ids[:0], values[:0], targets[:0], target_values[:0], rank_k=4)
    assert empty.total.item() == 0.0 and int(empty.count) == 0
    one_hot = torch.full_like(values, -torch.inf)
    one_hot[:, 0] = 0.0
    no_target = torch.full_like(target_values, -torch.inf)
    got = rlkd_rank_loss(z, ids, one_hot, targets, no_target, rank_k=4)
    (grad,) = torch.autograd.grad(got.total, z)
    assert torch.isfinite(got.total) and torch.isfinite(grad).all()


def test_rank_k_must_fit_the_cache() -> None:
    _, student, ids, values, targets, target_values = teacher_and_student(4, 2, 30, 6)
    with pytest.raises(ValueError, match="rank_k"):
        rlkd_rank_loss(student, ids, values, targets, target_values, rank_k=7)
    with pytest.raises(ValueError, match="rank union"):
        rlkd_rank_loss(student, ids, values, targets, target_values, rank_k=4, union="x")  # type: ignore[arg-type]
