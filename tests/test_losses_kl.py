"""Tests of the KL family on a top-k cache with a tail bucket (rlkd_cache.losses.kl).

With k = V the tail is empty and every divergence must equal its dense formula (values and
gradients); with k < V the bucket loss must equal the dense divergence between the two
coarsened (k+1)-category distributions built by hand, and never exceed the full divergence.
"""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from rlkd_cache.losses.kl import KDKind, TailMode, category_log_probs, cross_entropy_loss, kd_loss

KINDS: tuple[KDKind, ...] = get_args(KDKind)
TAILS: tuple[TailMode, ...] = get_args(TailMode)
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(
    seed: int, n: int, vocab: int, k: int, scale: float = 3.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random teacher/student logits and the teacher's top-k cache of them.

    Returns:
        teacher_logits (N, V), student_logits (N, V), topk_ids (N, k), topk_logprobs (N, k).
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    top = teacher.log_softmax(-1).topk(k, dim=-1)
    return teacher, student, top.indices, top.values.float()


def dense_divergence(p_logits: Tensor, q_logits: Tensor, kind: KDKind) -> Tensor:
    """Obviously-right divergences on full distributions (defaults beta 0.5, alpha 0.1, mu 0.5).

    (N, V), (N, V) -> (N,).
    """
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    p, q = lp.exp(), lq.exp()

    def kl(x: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
        return (x * (log_x - log_y)).sum(-1)

    if kind == "fkl":
        return kl(p, lp, lq)
    if kind == "rkl":
        return kl(q, lq, lp)
    if kind == "js":
        log_m = (0.5 * p + 0.5 * q).log()
        return 0.5 * kl(p, lp, log_m) + 0.5 * kl(q, lq, log_m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "sfkl":
        return kl(p, lp, (0.1 * p + 0.9 * q).log())
    if kind == "srkl":
        return kl(q, lq, (0.9 * p + 0.1 * q).log())
    # akl: head = teacher-sorted prefix with cumulative mass <= 0.5, plus the first token
    sorted_p, order = p.sort(-1, descending=True)
    gap = (sorted_p - q.gather(-1, order)).detach().abs()
    head = sorted_p.cumsum(-1) <= 0.5
    head[:, 0] = True
    w_head = (gap * head).sum(-1) / gap.sum(-1)
    return w_head * kl(p, lp, lq) + (1 - w_head) * kl(q, lq, lp)


def test_fkl_equals_kl_div_when_k_is_vocab() -> None:
    teacher, student, ids, values = make_case(seed=0, n=6, vocab=13, k=13)
    expected = F.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), reduction="sum", log_target=True
    )
    for tail in TAILS:
        got = kd_loss(student.float(), ids, values, kind="fkl", tail=tail)
        torch.testing.assert_close(got.total.double(), expected, rtol=1e-5, atol=1e-5)
        assert int(got.count) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_matches_dense_formula_and_its_gradient_when_k_is_vocab(kind: KDKind) -> None:
    teacher, student, ids, values = make_case(seed=1, n=5, vocab=11, k=11)
    z = student.float().requires_grad_()
    got = kd_loss(z, ids, values, kind=kind)
    (grad,) = torch.autograd.grad(got.total, z)
    z_dense = student.clone().requires_grad_()
    expected = dense_divergence(teacher, z_dense, kind).sum()
    (grad_dense,) = torch.autograd.grad(expected, z_dense)
    torch.testing.assert_close(got.total.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_dense, rtol=1e-4, atol=1e-5)


def test_temperature_is_exact_when_k_is_vocab() -> None:
    teacher, student, ids, values = make_case(seed=2, n=4, vocab=9, k=9)
    got = kd_loss(student.float(), ids, values, kind="fkl", temperature=2.0)
    expected = dense_divergence(teacher / 2.0, student / 2.0, "fkl").sum()
    torch.testing.assert_close(got.total.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind: KDKind, tail: TailMode) -> None:
    teacher, _, ids, values = make_case(seed=3, n=5, vocab=40, k=6)
    student = teacher.float() + 7.0  # same distribution, shifted logits
    got = kd_loss(student, ids, values, kind=kind, tail=tail)
    assert abs(float(got.total)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_and_empty_batches_give_exact_zero(kind: KDKind) -> None:
    _, student, ids, values = make_case(seed=4, n=4, vocab=20, k=5)
    z = student.float().requires_grad_()
    masked = kd_loss(z, ids, values, torch.zeros(4, dtype=torch.bool), kind=kind)
    (grad,) = torch.autograd.grad(masked.total, z)
    assert masked.total.item() == 0.0 and int(masked.count) == 0
    assert torch.equal(grad, torch.zeros_like(grad))

    empty = kd_loss(z[:0], ids[:0], values[:0], kind=kind)
    assert empty.total.item() == 0.0 and int(empty.count) == 0


def test_mask_keeps_only_the_chosen_positions() -> None:
    _, student, ids, values = make_case(seed=5, n=6, vocab=20, k=5)
    mask = torch.tensor([True, False, True, True, False, False])
    got = kd_loss(student.float(), ids, values, mask)
    kept = kd_loss(student.float()[mask], ids[mask], values[mask])
    torch.testing.assert_close(got.total, kept.total)
    assert int(got.count) == 3


def coarsened_log_probs(logits: Tensor, ids: Tensor) -> Tensor:
    """The (k+1)-category distribution [p_K, sum of p outside K], built by hand. -> (N, k+1)."""
    p = logits.softmax(-1)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    tail = (p * outside).sum(-1, keepdim=True)
    return torch.cat([p.gather(-1, ids), tail], dim=-1).log()


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(3, 40),
    k_fraction=st.floats(0.0, 1.0),
    scale=st.floats(0.1, 8.0),
)
def test_bucket_fkl_is_the_coarsened_kl_and_below_the_full_kl(
    seed: int, vocab: int, k_fraction: float, scale: float
) -> None:
    k = 1 + int(k_fraction * (vocab - 2))  # 1 <= k < V
    teacher, student, ids, values = make_case(seed, n=4, vocab=vocab, k=k, scale=scale)
    lp, lq = coarsened_log_probs(teacher, ids), coarsened_log_probs(student, ids)
    coarse = (lp.exp() * (lp - lq)).sum(-1)
    got = kd_loss(student.float(), ids, values, kind="fkl")
    torch.testing.assert_close(got.total.double(), coarse.sum(), rtol=1e-4, atol=1e-4)
    full = dense_divergence(teacher, student, "fkl").sum()
    assert float(got.total) <= float(full) + 1e-4  # data processing inequality
    # Reverse KL weighs log P_tail by the student's tail mass, and the cache (fp32 log-probs)
    # pins P_tail = 1 - sum_K p only to ~1e-8: compare where the teacher's tail is not tiny.
    if float(lp[:, -1].exp().min()) > 1e-4:
        reverse = kd_loss(student.float(), ids, values, kind="rkl")
        assert float(reverse.total) <= float(dense_divergence(teacher, student, "rkl").sum()) + 1e-4


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 30),
    k_fraction=st.floats(0.0, 1.0),
    scale=st.floats(0.1, 20.0),
    tail=st.sampled_from(TAILS),
)
def test_every_divergence_is_non_negative(
    seed: int, vocab: int, k_fraction: float, scale: float, tail: TailMode
) -> None:
    k = 1 + int(k_fraction * (vocab - 1))  # 1 <= k <= V
    _, student, ids, values = make_case(seed, n=3, vocab=vocab, k=k, scale=scale)
    for kind in KINDS:
        got = kd_loss(student.float(), ids, values, kind=kind, tail=tail)
        assert float(got.total) >= -1e-5, kind


def extreme_cases() -> list[tuple[str, Tensor, Tensor, Tensor]]:
    """(name, student logits (N, V), topk_ids (N, k), topk_logprobs (N, k)) at the edges."""
    vocab, k = 12, 4
    ids = torch.arange(k).repeat(3, 1)  # (3, k)
    renormalized = torch.tensor([1.0, 0.5, 0.2, -1.0]).log_softmax(-1).repeat(3, 1)
    one_hot = torch.tensor([0.0, -torch.inf, -torch.inf, -torch.inf]).repeat(3, 1)
    near_one = torch.tensor([-1e-9, -30.0, -40.0, -50.0]).repeat(3, 1)
    huge = torch.tensor([1e4, -1e4]).repeat(3, vocab // 2)  # (3, V)
    peaked_outside = torch.zeros(3, vocab)
    peaked_outside[:, k:] = 1e4  # student tail mass 1, K mass 0
    peaked_inside = torch.full((3, vocab), -1e4)
    peaked_inside[:, 0] = 1e4  # student tail mass 0
    return [
        ("teacher tail mass 0", torch.randn(3, vocab), ids, renormalized),
        ("one-hot teacher", torch.randn(3, vocab), ids, one_hot),
        ("teacher tail ~ 0", huge, ids, near_one),
        ("student all outside K", peaked_outside, ids, renormalized),
        ("student tail mass 0", peaked_inside, ids, near_one),
        ("huge student logits", huge, ids, renormalized),
    ]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("case", extreme_cases(), ids=lambda case: case[0])
def test_extreme_inputs_stay_finite(
    case: tuple[str, Tensor, Tensor, Tensor], temperature: float, tail: TailMode
) -> None:
    _, student, ids, values = case
    for kind in KINDS:
        z = student.clone().requires_grad_()
        got = kd_loss(z, ids, values, kind=kind, tail=tail, temperature=temperature)
        (grad,) = torch.autograd.grad(got.total, z)
        assert torch.isfinite(got.total), kind
        assert torch.isfinite(grad).all(), kind


def test_categories_sum_to_one_and_are_finite() -> None:
    _, student, ids, values = make_case(seed=6, n=5, vocab=30, k=7)
    for tail in TAILS:
        lp, lq = category_log_probs(student.float(), ids, values, tail, temperature=1.5)
        assert lp.shape == lq.shape == (5, 8 if tail == "bucket" else 7)
        ones = torch.ones(5)
        torch.testing.assert_close(lp.exp().sum(-1), ones)
        torch.testing.assert_close(lq.exp().sum(-1), ones)


def test_cross_entropy_matches_torch_and_ignores_masked_targets() -> None:
    _, student, _, _ = make_case(seed=7, n=5, vocab=10, k=2)
    targets = torch.tensor([1, 2, -100, 4, 9])
    mask = targets >= 0
    got = cross_entropy_loss(student.float(), targets, mask)
    expected = F.cross_entropy(student.float(), targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got.total, expected)
    assert int(got.count) == 4


def test_unknown_choices_are_rejected() -> None:
    _, student, ids, values = make_case(seed=8, n=2, vocab=10, k=3)
    with pytest.raises(ValueError, match="kd kind"):
        kd_loss(student.float(), ids, values, kind="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail"):
        kd_loss(student.float(), ids, values, tail="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student.float(), ids, values, temperature=0.0)
