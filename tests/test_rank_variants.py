"""Tests of the ranking-loss variants: the top-weighted (DCG) rank correlation, the
"extrapolate" guess for student peaks outside the cache, and the `authors` loss preset.

The weighted correlation is held against a plain-Python weighted Pearson on hand cases and
random rows; the guess against its bounds and, on full-vocabulary teachers (random logits and
a trained tiny model), against the loss computed with the teacher's true scores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from rlkd_cache.config import TrainConfig, build_config
from rlkd_cache.errors import RlkdError
from rlkd_cache.losses.chunked import PRESETS, LossConfig
from rlkd_cache.losses.kl import log1mexp
from rlkd_cache.losses.ranking import rank_union, rlkd_rank_loss
from rlkd_cache.losses.softrank import rank_correlation, soft_rank, top_weights

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

pytestmark = pytest.mark.usefixtures("one_thread")


def weighted_pearson(x: list[float], y: list[float], w: list[float]) -> float:
    """Weighted Pearson correlation, written out for one list."""
    total = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / total
    my = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / total
    cov = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y, strict=True))
    vx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x, strict=True))
    vy = sum(wi * (yi - my) ** 2 for wi, yi in zip(w, y, strict=True))
    return cov / math.sqrt(vx * vy)


def dcg_weights(scores: list[float]) -> list[float]:
    """1 / log2(1 + p), p the 1-based position from the top, ties sharing their mean position."""
    out = []
    for s in scores:
        above = sum(t > s for t in scores)
        tied = sum(t == s for t in scores)
        out.append(1 / math.log2(1 + above + (tied + 1) / 2))
    return out


def test_top_weights_on_hand_cases() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 5.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    got = top_weights(scores, valid)
    expected = [
        [1 / math.log2(2), 1 / math.log2(4), 1 / math.log2(3), 1 / math.log2(5)],
        [1 / math.log2(2.5), 1 / math.log2(2.5), 1 / math.log2(4), 0.0],  # tie at 1-2
    ]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_weighted_correlation_on_hand_cases() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 1.0, 3.0, 4.0]  # the bottom two swapped
    y_top = [1.0, 2.0, 4.0, 3.0]  # the top two swapped
    w = dcg_weights([1.0, 2.0, 3.0, 4.0])  # rank 4 (largest) is the head
    rows = torch.tensor([x, x], dtype=torch.float64)
    other = torch.tensor([y, y_top], dtype=torch.float64)
    weights = torch.tensor([w, w], dtype=torch.float64)
    got = rank_correlation(rows, other, weights=weights)
    expected = [weighted_pearson(x, y, w), weighted_pearson(x, y_top, w)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    flat = rank_correlation(rows, other)
    assert flat[0] == flat[1]  # plain Spearman: both swaps cost the same
    assert got[1] < got[0]  # top-weighted: the swap at the head costs more


@HYPOTHESIS
@given(seed=st.integers(0, 2**16), width=st.integers(2, 12))
def test_weighted_correlation_matches_the_reference(seed: int, width: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, width, generator=gen, dtype=torch.float64)
    y = torch.randn(6, width, generator=gen, dtype=torch.float64)
    w = torch.rand(6, width, generator=gen, dtype=torch.float64) + 0.05
    valid = torch.rand(6, width, generator=gen) > 0.3
    valid[:, :2] = True
    got = rank_correlation(x, y, valid, w)
    for row in range(6):
        keep = valid[row]
        expected = weighted_pearson(*(v[row][keep].tolist() for v in (x, y, w)))
        assert got[row].item() == pytest.approx(expected, abs=1e-10)


def test_flat_weights_give_plain_spearman_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 9, generator=gen)
    y = torch.randn(50, 9, generator=gen)
    valid = torch.rand(50, 9, generator=gen) > 0.2
    valid[:, :2] = True
    plain = rank_correlation(x, y, valid)
    assert torch.equal(rank_correlation(x, y, valid, torch.ones_like(x)), plain)


def test_weighted_correlation_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    valid = torch.ones(4, 7, dtype=torch.bool)
    valid[1, 5:] = False
    w = top_weights(y, valid)

    def rho(x: Tensor) -> Tensor:
        return rank_correlation(soft_rank(x, 0.7, valid), soft_rank(y, 0.7, valid), valid, w)

    assert torch.autograd.gradcheck(rho, (x,))


def test_dcg_loss_is_zero_for_a_student_equal_to_the_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 64, generator=gen) * 3
    lp = logits.log_softmax(-1)
    values, ids = lp.topk(20, dim=-1)
    targets = ids[:, 0]
    for guess in ("uniform_tail", "extrapolate"):
        loss = rlkd_rank_loss(
            logits, ids, values, targets, values[:, 0], rank_k=8, weighting="dcg", guess=guess
        )
        assert loss.total.item() < 1e-5  # log-probs are a shift of the logits: same soft ranks


def random_case(seed: int, vocab: int, noise: float) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(400, vocab, generator=gen) * 2
    return teacher, teacher + noise * torch.randn(400, vocab, generator=gen)


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 12),
    noise=st.floats(0.1, 3.0),
    guess=st.sampled_from(["midpoint", "extrapolate"]),
)
def test_new_guesses_lie_between_the_tail_floor_and_the_cache(
    seed: int, k: int, noise: float, guess: str
) -> None:
    teacher, student = random_case(seed, 50, noise)
    lp = teacher.log_softmax(-1)
    values, ids = lp.topk(k, dim=-1)
    targets = torch.full((400,), -1)  # no actual token among the guesses
    peaks = rank_union(
        student, ids, values, targets, values[:, 0], rank_k=k, union="censored", guess=guess
    )  # type: ignore[arg-type]
    outside = ~(peaks.ids[:, k:, None] == ids[:, None, :]).any(-1)  # (N, k) guessed slots
    guessed = peaks.teacher_scores[:, k:]
    floor = log1mexp(values.logsumexp(-1, keepdim=True)) - math.log(50 - k)  # uniform tail
    kth = values[:, -1:]
    low = torch.minimum(floor, kth).expand_as(guessed)[outside]
    assert bool((guessed[outside] >= low - 1e-5).all())
    assert bool((guessed[outside] < kth.expand_as(guessed)[outside]).all())
    if guess == "midpoint":  # one tied score, halfway between the floor and the k-th value
        below = torch.nextafter(kth, torch.full_like(kth, -math.inf))
        expected = torch.minimum((torch.minimum(floor, below) + kth) / 2, below)
        torch.testing.assert_close(guessed[outside], expected.expand_as(guessed)[outside])
        return
    # extrapolate, in the student's order: the j-th guessed token no higher than the (j-1)-th
    for row in range(400):
        seq = guessed[row][outside[row]]
        assert bool((seq[1:] <= seq[:-1]).all())


def censored_minus_true(teacher: Tensor, student: Tensor, k: int, rank_k: int, guess: str) -> float:
    """Mean |censored loss - loss with the teacher's true scores over the same union|."""
    lp = teacher.log_softmax(-1)
    full_values, full_ids = lp.sort(-1, descending=True)
    targets = full_ids[:, 0]
    target_lp = full_values[:, 0]
    args = (student, full_ids[:, :k], full_values[:, :k], targets, target_lp)
    censored = rank_union(*args, rank_k=rank_k, union="censored", guess=guess)  # type: ignore[arg-type]
    true = rank_union(
        student, full_ids, full_values, targets, target_lp, rank_k=rank_k, union="censored"
    )
    assert torch.equal(censored.ids, true.ids)

    def loss(peaks: object) -> Tensor:
        s = soft_rank(torch.gather(student, -1, peaks.ids), 1.0, peaks.valid)  # type: ignore[attr-defined]
        t = soft_rank(peaks.teacher_scores, 1.0, peaks.valid)  # type: ignore[attr-defined]
        return 1 - rank_correlation(s, t, peaks.valid)  # type: ignore[attr-defined]

    return (loss(censored) - loss(true)).abs().mean().item()


@pytest.mark.parametrize("k,rank_k", [(5, 5), (20, 15)])
@pytest.mark.parametrize("noise", [0.5, 1.0])
@pytest.mark.parametrize("guess", ["midpoint", "extrapolate"])
def test_new_guesses_are_closer_to_the_true_loss_on_random_teachers(
    k: int, rank_k: int, noise: float, guess: str
) -> None:
    teacher, student = random_case(1, 1000, noise)
    old = censored_minus_true(teacher, student, k, rank_k, "uniform_tail")
    new = censored_minus_true(teacher, student, k, rank_k, guess)
    assert new < old


@pytest.mark.slow
def test_midpoint_guess_is_closer_to_the_true_loss_with_the_real_teacher(tmp_path) -> None:
    """The embedded SmolLM2 teacher (full 49,152-token vocabulary) and a 4-layer student of its
    layers trained 20 steps by `rlkd train`: where the student's peaks outside the cache truly
    sit, the midpoint guess is nearer than the uniform tail (benchmarks/rank_guess.py has the
    figures). Tiny models with a few hundred tokens are not used here: their tails are short
    and nearly flat, where the uniform-tail value is close to exact by construction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd_cache.cache import resolve_model, run_cache
    from rlkd_cache.config import CacheConfig
    from rlkd_cache.data import bundled_sample, load_rows
    from rlkd_cache.train.loop import train
    from rlkd_cache.train.student_init import shallow_student

    cache_cfg = CacheConfig(
        template="none", positions="all", split="train[:40]", top_k=20, max_length=128,
        cache_root=str(tmp_path / "root"),
    )  # fmt: skip
    teacher_dir = resolve_model(cache_cfg)
    cache = run_cache(cache_cfg, progress=False)
    student_dir = shallow_student(teacher_dir, [0, 10, 20, 29], tmp_path / "student")
    final = train(
        TrainConfig(
            cache=str(cache), student=str(student_dir), output=str(tmp_path / "run"),
            max_steps=20, batch_tokens=1024, lr=1e-4, warmup_steps=2, kd_weight=1.0,
            rank_weight=0.0, eval_every=1000, save_every=1000, log_every=1000,
        ),
        progress=False,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = load_rows(str(bundled_sample()), "train[300:310]")

    def logits(folder: object) -> Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out = []
        with torch.no_grad():
            for row in rows:
                text = f"{row['prompt']}\n\n{row['response']}"
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
                out.append(model(input_ids=ids).logits[0, :-1])
        return torch.cat(out)

    teacher, student = logits(teacher_dir), logits(final)
    old = censored_minus_true(teacher, student, 20, 15, "uniform_tail")
    new = censored_minus_true(teacher, student, 20, 15, "midpoint")
    assert new < old


def test_authors_preset_fills_the_loss_fields() -> None:
    cfg = build_config(
        TrainConfig,
        {"preset": "authors", "cache": "c", "student": "s", "output": "o"},
    )
    for name, value in PRESETS["authors"].items():
        assert getattr(cfg, name) == value
    assert cfg.preset == "authors"


def test_a_field_that_contradicts_the_preset_is_refused() -> None:
    with pytest.raises(RlkdError, match=r"--rank-weighting is 'flat' in preset 'authors'"):
        build_config(
            TrainConfig,
            {"preset": "authors", "cache": "c", "student": "s", "output": "o"},
            flags={"rank_weighting": "dcg"},
        )
    # in Python a preset is not expanded, so the defaults that differ from it are refused
    with pytest.raises(ValueError, match="kd_weight"):
        LossConfig(preset="authors")
    assert LossConfig(**PRESETS["authors"], preset="authors").rank_weight == 1.0
    with pytest.raises(ValueError, match="rank_weight"):
        LossConfig(**{**PRESETS["authors"], "rank_weight": 2.0}, preset="authors")


def test_a_field_that_agrees_with_the_preset_is_accepted() -> None:
    cfg = build_config(
        TrainConfig,
        {"preset": "authors", "cache": "c", "student": "s", "output": "o", "rank_k": 15},
    )
    assert cfg.rank_k == 15
