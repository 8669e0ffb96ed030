"""The shard codec: exact round trip of ids, log-probs within step/2, on random inputs."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.writer import parquet_options


def random_block(
    rng: np.random.Generator, rows: int, k: int, vocab: int, scale: float
) -> codec.Block:
    """Rows with random tokens and a random top-k per position (distinct ids, descending)."""
    lengths = rng.integers(2, 40, size=rows)
    input_ids = rng.integers(0, vocab, size=int(lengths.sum())).astype(np.int32)
    pos_counts = rng.integers(1, lengths)  # at least one position, at most T - 1
    positions = np.concatenate(
        [
            np.sort(rng.choice(n - 1, c, replace=False))
            for n, c in zip(lengths, pos_counts, strict=True)
        ]
    )
    n = int(pos_counts.sum())
    block = codec.Block(
        seq_ids=[f"row-{i}" for i in range(rows)],
        input_ids=input_ids,
        tok_off=codec.offsets(lengths),
        positions=positions.astype(np.int32),
        pos_off=codec.offsets(pos_counts),
        topk_ids=np.empty((n, k), np.int32),
        topk_logprobs=np.empty((n, k), np.float32),
        target_logprobs=np.empty(n, np.float32),
    )
    nxt = block.next_tokens()
    for p in range(n):
        ids = rng.choice(vocab, k, replace=False)
        if rng.random() < 0.7 and nxt[p] not in ids:  # the actual token is often in the top-k
            ids[rng.integers(k)] = nxt[p]
        block.topk_ids[p] = ids
    logits = rng.normal(0, scale, size=(n, vocab))
    logits[np.arange(n)[:, None], block.topk_ids] += scale * 3  # the top-k really are on top
    lp = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    top_lp = np.take_along_axis(lp, block.topk_ids.astype(np.int64), 1)
    order = np.argsort(-top_lp, axis=1, kind="stable")
    block.topk_ids[:] = np.take_along_axis(block.topk_ids, order, 1)
    block.topk_logprobs[:] = np.take_along_axis(top_lp, order, 1)
    block.target_logprobs[:] = lp[np.arange(n), nxt]
    return block


def roundtrip(block: codec.Block, step: float) -> codec.Block:
    table = codec.encode(block, step)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, **{**parquet_options(3), "store_schema": True}) as w:
        w.write_table(table)
    buf.seek(0)
    return codec.decode(pq.read_table(buf))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 6),
    k=st.integers(1, 64),
    vocab_extra=st.integers(0, 70_000),
    scale=st.floats(0.1, 20.0),
    step=st.sampled_from([0.0099, 0.001, 0.05]),
)
def test_roundtrip_ids_exact_logprobs_within_half_step(seed, rows, k, vocab_extra, scale, step):
    rng = np.random.default_rng(seed)
    block = random_block(rng, rows, k, vocab=k + 1 + vocab_extra, scale=scale)
    out = roundtrip(block, step)
    assert out.seq_ids == block.seq_ids
    np.testing.assert_array_equal(out.input_ids, block.input_ids)
    np.testing.assert_array_equal(out.tok_off, block.tok_off)
    np.testing.assert_array_equal(out.positions, block.positions)
    np.testing.assert_array_equal(out.pos_off, block.pos_off)
    np.testing.assert_array_equal(out.topk_ids, block.topk_ids)
    bound = step / 2 + 1e-6 * (1 + np.abs(block.topk_logprobs).max())  # float32 rounding
    assert np.abs(out.topk_logprobs - block.topk_logprobs).max() <= bound
    assert (
        np.abs(out.target_logprobs - block.target_logprobs).max()
        <= bound + 1e-6 * np.abs(block.target_logprobs).max()
    )
    assert np.all(np.diff(out.topk_logprobs, axis=1) <= 0)


def test_default_step_meets_the_0_005_nat_bound():
    from rlkd_cache.config import CacheConfig

    rng = np.random.default_rng(0)
    block = random_block(rng, 8, 20, vocab=5000, scale=4.0)
    out = roundtrip(block, CacheConfig().logprob_step)
    assert np.abs(out.topk_logprobs - block.topk_logprobs).max() <= 0.005
    assert np.abs(out.target_logprobs - block.target_logprobs).max() <= 0.005


def test_target_elision_restores_ids_from_input():
    rng = np.random.default_rng(1)
    block = random_block(rng, 3, 5, vocab=50, scale=2.0)
    nxt = block.next_tokens()
    assert (block.topk_ids == nxt[:, None]).any(1).mean() > 0.3  # the case is exercised
    table = codec.encode(block, 0.01)
    stored = sum(len(v) for v in table.column("topk_codes").to_pylist())
    assert stored == block.topk_ids.size - (block.topk_ids == nxt[:, None]).any(1).sum()
    np.testing.assert_array_equal(codec.decode(table).topk_ids, block.topk_ids)


@given(st.lists(st.integers(0, 200_000), min_size=1, max_size=300))
def test_codebook_roundtrip(ids):
    order = codec.build_codebook(np.array(ids))
    assert sorted(order.tolist()) == sorted(set(ids))
    np.testing.assert_array_equal(codec.decode_codebook(codec.encode_codebook(order)), order)


def test_unsorted_logprobs_are_refused():
    block = random_block(np.random.default_rng(2), 1, 4, vocab=30, scale=1.0)
    block.topk_logprobs[0] = block.topk_logprobs[0][::-1]
    with pytest.raises(RlkdError, match="sorted descending"):
        codec.encode(block, 0.01)


def test_inconsistent_columns_are_refused():
    import pyarrow as pa

    block = random_block(np.random.default_rng(3), 2, 4, vocab=30, scale=1.0)
    table = codec.encode(block, 0.01)
    gaps = table.column("lp_gaps").to_pylist()
    gaps[0] = gaps[0][:-1]  # one log-prob gap lost
    index = table.schema.get_field_index("lp_gaps")
    broken = table.set_column(index, "lp_gaps", pa.array(gaps, pa.list_(pa.int32())))
    meta = table.schema.metadata
    with pytest.raises(RlkdError, match="fails its check"):
        codec.decode(broken.replace_schema_metadata(meta))
    unchecked = {k: v for k, v in meta.items() if k != codec.CHECK_KEY}  # shards before the CRC
    with pytest.raises(RlkdError, match="inconsistent"):
        codec.decode(broken.replace_schema_metadata(unchecked))
