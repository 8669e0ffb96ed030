"""Tests of the chunked objective (rlkd_cache.losses.chunked) against the plain one.

Chunking must change neither the loss nor its gradients (w.r.t. hidden states, LM head weight
and bias), for every KD kind, both tails and chunk sizes that do not divide N; and its forward
must never save an (N, V) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import get_args

import pytest
import torch
from torch import Tensor

from rlkd_cache.losses.chunked import (
    LossConfig,
    LossSums,
    TeacherTopK,
    distill_loss,
    distill_loss_reference,
)
from rlkd_cache.losses.kl import KDKind, TailMode
from rlkd_cache.losses.ranking import UnionMode

N, HIDDEN, VOCAB, K = 23, 16, 64, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(seed: int, n: int = N) -> tuple[Tensor, Tensor, Tensor, TeacherTopK, Tensor]:
    """A tiny fixed LM head, hidden states, a teacher cache and a mask with some positions off.

    Returns:
        hidden (N, H), weight (V, H), bias (V,), the teacher rows, mask (N,).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5
    bias = torch.randn(VOCAB, generator=gen) * 0.1
    teacher_logprobs = (torch.randn(n, VOCAB, generator=gen) * 2).log_softmax(-1)
    top = teacher_logprobs.topk(K, dim=-1)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    teacher = TeacherTopK(
        topk_ids=top.indices,
        topk_logprobs=top.values,
        target_ids=targets,
        target_logprobs=teacher_logprobs.gather(-1, targets[:, None])[:, 0],
    )
    mask = torch.rand(n, generator=gen) > 0.2
    return hidden, weight, bias, teacher, mask


def sums_and_grads(
    result: LossSums, inputs: tuple[Tensor, ...]
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """The four sums and the gradients of the total w.r.t. `inputs`."""
    grads = torch.autograd.grad(result.total, inputs, allow_unused=True)
    return [result.kd, result.rank, result.ce, result.total], grads


def assert_same(
    expected: tuple[list[Tensor], tuple[Tensor, ...]], got: tuple[list[Tensor], tuple[Tensor, ...]]
) -> None:
    for want, have in zip(expected[0] + list(expected[1]), got[0] + list(got[1]), strict=True):
        torch.testing.assert_close(have.detach(), want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tail", get_args(TailMode))
@pytest.mark.parametrize("kd", get_args(KDKind))
def test_chunked_equals_plain_values_and_gradients(kd: KDKind, tail: TailMode) -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=0)
    cfg = LossConfig(kd=kd, tail=tail, rank_k=5, ce_weight=0.3, temperature=1.5)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    expected = sums_and_grads(distill_loss_reference(*inputs, teacher, mask, cfg), inputs)
    for chunk_size in (1, 5, 7, 64):
        got = distill_loss(*inputs, teacher, mask, cfg, chunk_size=chunk_size)
        assert int(got.count) == int(mask.sum())
        assert_same(expected, sums_and_grads(got, inputs))


@pytest.mark.parametrize("union", ["censored", "teacher"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"rank_weighting": "flat"},
        {"rank_guess": "uniform_tail"},
        {"rank_guess": "extrapolate"},
        {"kd_weight": 0.5, "rank_weight": 1.0, "rank_weighting": "flat", "rank_guess": "midpoint"},
        {"kd_weight": 0.5, "rank_weighting": "flat", "rank_guess": "uniform_tail"},
    ],
)
def test_chunked_equals_plain_without_bias_or_mask(union: UnionMode, variant: dict) -> None:
    hidden, weight, _, teacher, _ = make_inputs(seed=1)
    cfg = LossConfig(rank_k=8, rank_union=union, **variant)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight))
    expected = sums_and_grads(distill_loss_reference(*inputs, None, teacher, None, cfg), inputs)
    got = distill_loss(*inputs, None, teacher, None, cfg, chunk_size=6)
    assert int(got.count) == N
    assert_same(expected, sums_and_grads(got, inputs))


def test_total_is_the_weighted_sum_of_the_parts() -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=2)
    cfg = LossConfig(kd_weight=0.5, rank_weight=1.0, ce_weight=0.25, rank_k=4)
    got = distill_loss(hidden, weight, bias, teacher, mask, cfg, chunk_size=4)
    torch.testing.assert_close(got.total, 0.5 * got.kd + got.rank + 0.25 * got.ce)


@pytest.mark.parametrize("n", [0, 9])
def test_empty_and_all_masked_batches_give_zero(n: int) -> None:
    hidden, weight, bias, teacher, _ = make_inputs(seed=3, n=n)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    none = torch.zeros(n, dtype=torch.bool)
    for run in (distill_loss, distill_loss_reference):
        got = run(*inputs, teacher, none, LossConfig(rank_k=4, ce_weight=1.0))
        grads = torch.autograd.grad(got.total, inputs)
        assert [part.item() for part in (got.kd, got.rank, got.ce, got.total)] == [0.0] * 4
        assert int(got.count) == 0
        assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_backward_scales_accumulates_and_runs_once() -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=6)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    cfg = LossConfig(rank_k=4, ce_weight=0.5)
    expected = torch.autograd.grad(
        distill_loss_reference(*inputs, teacher, mask, cfg).total, inputs
    )
    for _ in range(2):  # two micro-batches, each divided by a count, accumulate in .grad
        got = distill_loss(*inputs, teacher, mask, cfg, chunk_size=6)
        (got.total / 4.0).backward()
    for tensor, want in zip(inputs, expected, strict=True):
        torch.testing.assert_close(tensor.grad, want / 2.0, atol=1e-5, rtol=1e-5)
    once = distill_loss(*inputs, teacher, mask, cfg, chunk_size=6)
    once.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        once.total.backward()


def test_values_without_grad_and_in_bfloat16() -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=7)
    cfg = LossConfig(rank_k=4, ce_weight=0.5)
    expected = distill_loss_reference(hidden, weight, bias, teacher, mask, cfg)
    with torch.no_grad():
        got = distill_loss(hidden, weight, bias, teacher, mask, cfg, chunk_size=5)
    torch.testing.assert_close(got.total, expected.total.detach())
    low = tuple(t.bfloat16().requires_grad_() for t in (hidden, weight, bias))
    plain = distill_loss_reference(*low, teacher, mask, cfg)
    chunked = distill_loss(*low, teacher, mask, cfg, chunk_size=5)
    torch.testing.assert_close(chunked.total, plain.total.detach(), rtol=1e-3, atol=1e-3)
    grads = torch.autograd.grad(chunked.total, low)
    plain_grads = torch.autograd.grad(plain.total, low)
    for grad, want in zip(grads, plain_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), want.float(), rtol=2e-2, atol=2e-2)


def largest_saved_tensor(run: Callable[..., LossSums], *args: object) -> int:
    """Elements of the largest tensor autograd keeps for the backward while `run` runs."""
    largest = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(*args)
    return largest


def test_chunked_forward_never_saves_full_logits() -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=4)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    cfg = LossConfig(rank_k=4)
    plain = largest_saved_tensor(distill_loss_reference, *inputs, teacher, mask, cfg)
    chunked = largest_saved_tensor(partial(distill_loss, chunk_size=5), *inputs, teacher, mask, cfg)
    assert plain >= N * VOCAB
    assert chunked <= max(5 * VOCAB, VOCAB * HIDDEN)  # a chunk's logits, or the head's gradient


def test_config_rejects_bad_values() -> None:
    for bad in (
        {"kd": "kl"},
        {"tail": "zero"},
        {"rank_union": "both"},
        {"rank_k": 1},
        {"kd_weight": -1.0},
        {"temperature": 0.0},
        {"jsd_beta": 1.0},
        {"akl_mu": 0.0},
    ):
        with pytest.raises(ValueError):
            LossConfig(**bad)  # type: ignore[arg-type]
    hidden, weight, bias, teacher, mask = make_inputs(seed=5)
    with pytest.raises(ValueError, match="chunk_size"):
        distill_loss(hidden, weight, bias, teacher, mask, LossConfig(rank_k=4), chunk_size=0)


def test_the_rank_variants_reach_the_objective() -> None:
    hidden, weight, bias, teacher, mask = make_inputs(seed=4)
    flat = {"rank_weighting": "flat", "rank_guess": "uniform_tail"}
    base = distill_loss(hidden, weight, bias, teacher, mask, LossConfig(rank_k=8, **flat)).rank
    for variant in ({"rank_weighting": "dcg"}, {"rank_guess": "midpoint"}):
        cfg = LossConfig(rank_k=8, **{**flat, **variant})
        got = distill_loss(hidden, weight, bias, teacher, mask, cfg)
        assert not torch.equal(got.rank, base)
