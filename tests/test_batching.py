"""Token-budget batching: values, budget, bucketing, determinism, resume, DataLoader workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_stream
import torch

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import (
    Batch,
    EpochDataset,
    PaddingMeter,
    TokenBatcher,
    collate,
    plan_window,
)
from rlkd_cache.train.stream import CacheStream

small_cache = test_stream.small_cache  # the cache fixture, shared
ROWS = test_stream.ROWS
BUDGET = 256


def batcher(cache: Cache, seed: int = 0, **kw: object) -> TokenBatcher:
    return TokenBatcher(CacheStream(cache, seed=seed, shuffle_buffer=8), batch_tokens=BUDGET, **kw)


def same(a: Batch, b: Batch) -> bool:
    return a.seq_ids == b.seq_ids and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "pos", "topk_logprobs")
    )


def padding_of(batches: list[Batch]) -> float:
    meter = PaddingMeter()
    for b in batches:
        meter.update(b)
    return meter.fraction()


def test_collate_matches_a_per_row_reference(small_cache: Cache):
    rows = list(small_cache.rows())[:7]
    batch = collate(rows, k=4)
    assert batch.input_ids.shape == (7, max(len(r.input_ids) for r in rows))
    assert batch.topk_ids.shape == (batch.n_positions, 4) and batch.topk_ids.dtype == torch.int64
    assert batch.topk_logprobs.dtype == batch.target_logprobs.dtype == torch.float32
    n = 0
    for b, r in enumerate(rows):
        t = len(r.input_ids)
        assert batch.input_ids[b, :t].tolist() == r.input_ids.tolist()
        assert not batch.input_ids[b, t:].any() and batch.attention_mask[b].sum() == t
        p = slice(n, n + len(r.positions))
        assert (batch.row[p] == b).all() and batch.pos[p].tolist() == r.positions.tolist()
        assert batch.target_ids[p].tolist() == r.input_ids[r.positions + 1].tolist()
        np.testing.assert_array_equal(batch.topk_ids[p].numpy(), r.topk_ids[:, :4])
        np.testing.assert_array_equal(batch.topk_logprobs[p].numpy(), r.topk_logprobs[:, :4])
        np.testing.assert_array_equal(batch.target_logprobs[p].numpy(), r.target_logprobs)
        n += len(r.positions)
    assert batch.n_positions == n and batch.n_tokens == int(batch.attention_mask.sum())
    assert batch.padding_fraction == pytest.approx(1 - batch.n_tokens / batch.input_ids.numel())


def test_every_position_once_per_epoch_with_its_values(small_cache: Cache):
    seen: dict[tuple[str, int], tuple[list[int], list[float], int, float]] = {}
    for batch in batcher(small_cache).batches(epochs=1):
        for i in range(batch.n_positions):
            b, t = int(batch.row[i]), int(batch.pos[i])
            key = (batch.seq_ids[b], t)
            assert key not in seen
            seen[key] = (
                batch.topk_ids[i].tolist(),
                batch.topk_logprobs[i].tolist(),
                int(batch.target_ids[i]),
                float(batch.target_logprobs[i]),
            )
    expected = {}
    for r in small_cache.rows():
        for j, t in enumerate(r.positions.tolist()):
            expected[(r.seq_id, t)] = (
                r.topk_ids[j].tolist(),
                r.topk_logprobs[j].tolist(),
                int(r.input_ids[t + 1]),
                float(r.target_logprobs[j]),
            )
    assert seen == expected


@pytest.mark.parametrize("budget", [64, BUDGET, 4096])
def test_budget_is_kept_and_long_rows_ride_alone(small_cache: Cache, budget: int):
    stream = CacheStream(small_cache, seed=1)
    batches = list(TokenBatcher(stream, batch_tokens=budget, window_batches=2).batches(1))
    longest = max(len(r.input_ids) for r in small_cache.rows())
    assert sum(len(b.seq_ids) for b in batches) == ROWS
    for b in batches:
        assert b.input_ids.numel() <= budget or len(b.seq_ids) == 1
    if budget < longest:  # never truncated: the longest row's batch is as wide as the row
        assert max(b.input_ids.shape[1] for b in batches) == longest


def test_bucketing_lowers_padding():
    lengths = np.random.default_rng(0).integers(8, 512, size=2000)

    def padding(bucketing: bool) -> float:
        plans = plan_window(lengths, 4096, bucketing)
        slots = sum(len(p) * lengths[p].max() for p in plans)
        assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
        return 1 - lengths.sum() / slots

    assert padding(True) < 0.02 and padding(False) > 0.3


def test_batches_are_seeded(small_cache: Cache):
    def run(seed: int) -> list[Batch]:
        return list(batcher(small_cache, seed).batches(epochs=2))

    a, b, other = run(0), run(0), run(1)
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    assert [x.seq_ids for x in a] != [x.seq_ids for x in other]


def test_resume_continues_exactly_across_epochs(small_cache: Cache):
    whole = list(batcher(small_cache).batches(epochs=3))
    per_epoch = len(list(batcher(small_cache).batches(epochs=1)))
    for consumed in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2, len(whole)):
        first = batcher(small_cache)
        it = first.batches(epochs=3)
        for _ in range(consumed):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = batcher(small_cache)
        resumed.load_state_dict(state)
        rest = list(resumed.batches(epochs=3))
        assert len(rest) == len(whole) - consumed
        assert all(same(x, y) for x, y in zip(rest, whole[consumed:], strict=True))
        assert resumed.padding.fraction() == pytest.approx(padding_of(whole))


def test_resume_with_other_settings_is_refused(small_cache: Cache):
    state = batcher(small_cache).state_dict()
    with pytest.raises(RlkdError, match=r"batch_tokens=256.*batch_tokens=512"):
        TokenBatcher(CacheStream(small_cache, seed=0), batch_tokens=512).load_state_dict(state)


def test_k_larger_than_the_cache_is_refused(small_cache: Cache):
    with pytest.raises(RlkdError, match=r"k=7 asked.*k=6"):
        batcher(small_cache, k=7)


def test_dataloader_workers_split_the_rows(small_cache: Cache):
    loader = torch.utils.data.DataLoader(
        EpochDataset(batcher(small_cache), epoch=0), batch_size=None, num_workers=2
    )
    seq_ids = [s for batch in loader for s in batch.seq_ids]
    assert len(seq_ids) == len(set(seq_ids)) == ROWS
