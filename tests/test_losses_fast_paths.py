"""The training step's fast paths against their plain, obviously-right versions.

- `category_log_probs` (tail bucket) computes the student's tail with a hand-written backward
  (`kl._TopkAndTail`); here it must equal autograd through the plain formula (a scatter and
  two log-sum-exps) in float64, values and gradients, for every divergence, and pass
  gradcheck. (Against fp32 autograd of that formula it is the more accurate of the two.)
- `cross_entropy_from_kd` must equal `cross_entropy_loss`.
- `top_ids` (the student's top rank_k for the ranking union) must give a top k, as `topk`.
- `distill_loss(matmul_dtype=torch.bfloat16)` must equal the plain loss with the same
  matmul dtype, and stay near fp32.
"""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import Tensor

from rlkd_cache.losses.chunked import LossConfig, TeacherTopK, distill_loss, distill_loss_reference
from rlkd_cache.losses.kl import (
    LOG_FLOOR,
    KDKind,
    _TopkAndTail,
    category_log_probs,
    cross_entropy_from_kd,
    cross_entropy_loss,
    divergence,
    log1mexp,
)
from rlkd_cache.losses.ranking import top_ids


def plain_bucket_log_probs(z: Tensor, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The tail-bucket categories at temperature 1 by plain autograd (the formula before the
    hand-written backward): the teacher's in fp32 as in `kl.py`, the student's in float64.
    (N, V), (N, k), (N, k) -> (N, k+1) lp and lq, float64."""
    a = values.float().clamp_min(LOG_FLOOR)  # (N, k)
    log_p_tail = log1mexp(a.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)  # (N, 1)
    a, log_p_tail = a.double(), log_p_tail.double()
    s = z.double()  # (N, V)
    lse = s.logsumexp(-1, keepdim=True)  # (N, 1)
    outside = s.scatter(-1, ids, torch.finfo(torch.float64).min)  # (N, V)
    log_q_tail = (outside.logsumexp(-1, keepdim=True) - lse).clamp_min(LOG_FLOOR)  # (N, 1)
    a_t = torch.cat([a, log_p_tail], dim=-1)  # (N, k+1)
    lp = a_t - a_t.logsumexp(-1, keepdim=True)
    return lp, torch.cat([s.gather(-1, ids) - lse, log_q_tail], dim=-1)


def make_case(seed: int, n: int, vocab: int, k: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(n, vocab, generator=gen) * scale).log_softmax(-1)  # (N, V)
    top = teacher.topk(k, dim=-1)
    z = torch.randn(n, vocab, generator=gen) * scale  # (N, V)
    return z, top.indices, top.values


def extreme_logits(vocab: int, k: int) -> list[Tensor]:
    """Student logits where a tail is ~0, ~1, or under fp32's range relative to the peak."""
    peaked_inside = torch.full((2, vocab), -1e4)
    peaked_inside[:, 0] = 1e4  # tail mass 0
    peaked_outside = torch.zeros(2, vocab)
    peaked_outside[:, k:] = 1e4  # tail mass 1
    far_tail = torch.zeros(2, vocab)
    far_tail[:, k:] = -80.0  # tail terms below fp32's smallest normal after the shift
    return [peaked_inside, peaked_outside, far_tail]


@pytest.mark.parametrize("kind", get_args(KDKind))
@pytest.mark.parametrize(("vocab", "k", "scale"), [(50, 5, 1.0), (200, 20, 4.0), (9, 8, 10.0)])
def test_tail_backward_matches_plain_autograd(kind: KDKind, vocab: int, k: int, scale: float):
    z, ids, values = make_case(seed=vocab + k, n=7, vocab=vocab, k=k, scale=scale)
    fast = z.clone().requires_grad_()
    plain = z.double().requires_grad_()
    lp, lq = category_log_probs(fast, ids, values, "bucket")
    lp_ref, lq_ref = plain_bucket_log_probs(plain, ids, values)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lq.double(), lq_ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(divergence(lp, lq, kind).sum(), fast)
    (grad_ref,) = torch.autograd.grad(divergence(lp_ref, lq_ref, kind).sum(), plain)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("case", range(3))
def test_tail_backward_matches_plain_autograd_at_the_extremes(case: int):
    vocab, k = 12, 4
    z = extreme_logits(vocab, k)[case]
    ids = torch.arange(k).repeat(2, 1)  # (2, k)
    values = torch.tensor([-0.5, -1.5, -2.5, -3.5]).repeat(2, 1)  # (2, k)
    fast = z.clone().requires_grad_()
    plain = z.double().requires_grad_()
    lp, lq = category_log_probs(fast, ids, values, "bucket")
    lp_ref, lq_ref = plain_bucket_log_probs(plain, ids, values)
    torch.testing.assert_close(lq.double(), lq_ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(divergence(lp, lq, "fkl").sum(), fast)
    (grad_ref,) = torch.autograd.grad(divergence(lp_ref, lq_ref, "fkl").sum(), plain)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=5e-6)


def test_tail_function_passes_gradcheck():
    z, ids, _ = make_case(seed=3, n=4, vocab=15, k=4, scale=2.0)
    s = z.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _TopkAndTail.apply(x, ids), (s,))


def test_cross_entropy_from_kd_equals_cross_entropy():
    z, ids, values = make_case(seed=4, n=9, vocab=300, k=20, scale=3.0)
    targets = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(0))
    targets[:3] = ids[:3, 2]  # some targets inside the top-k
    mask = torch.arange(9) != 5
    _, lq = category_log_probs(z, ids, values, "bucket")
    got = cross_entropy_from_kd(z, ids, lq, targets, mask)
    want = cross_entropy_loss(z, targets, mask)
    torch.testing.assert_close(got.total, want.total)
    assert int(got.count) == int(want.count) == 8


def test_bf16_head_matmuls_match_the_plain_loss_with_bf16_matmuls():
    n, hidden_size, vocab, k = 70, 32, 500, 16
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3
    bias = torch.randn(vocab, generator=gen) * 0.1
    teacher_logprobs = (torch.randn(n, vocab, generator=gen) * 3).log_softmax(-1)
    top = teacher_logprobs.topk(k, dim=-1)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teacher = TeacherTopK(
        top.indices, top.values, targets, teacher_logprobs.gather(-1, targets[:, None])[:, 0]
    )
    cfg = LossConfig(rank_k=8)

    def run(loss, **kw):
        inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        sums = loss(*inputs, teacher, None, cfg, **kw)
        return sums, torch.autograd.grad(sums.total, inputs)

    fast, fast_grads = run(distill_loss, chunk_size=16, matmul_dtype=torch.bfloat16)
    plain, plain_grads = run(distill_loss_reference, matmul_dtype=torch.bfloat16)
    fp32, fp32_grads = run(distill_loss_reference)
    for name in ("kd", "rank", "ce", "total"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(getattr(fast, name), getattr(fp32, name), rtol=1e-2, atol=0.5)
    for got, want, near in zip(fast_grads, plain_grads, fp32_grads, strict=True):
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-2  # bf16 products, summed in fp32
        assert float((got - near).norm() / near.norm()) < 3e-2


@pytest.mark.parametrize("values", ["continuous", "ties"])
@pytest.mark.parametrize("vocab", [4096, 4100])
def test_top_ids_is_a_top_k(values: str, vocab: int):
    x = torch.randn(50, vocab, generator=torch.Generator().manual_seed(6)) * 3  # (N, V)
    if values == "ties":
        x = x.round()  # many rows tie at the 15th value
    got = top_ids(x, 15)  # (N, 15)
    want = x.topk(15, dim=-1)
    torch.testing.assert_close(x.gather(-1, got), want.values)  # the same values, in order
    assert all(len(set(row)) == 15 for row in got.tolist())  # distinct ids
    if values == "continuous":
        assert torch.equal(got, want.indices)
