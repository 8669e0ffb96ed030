"""The streaming reader: coverage, determinism, rank partition, resume, caps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache, CacheRow
from rlkd_cache.train.stream import CacheStream

ROWS = 40


@pytest.fixture(scope="module")
def small_cache(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """40 texts of 3 to ~80 words in 4 shards, k = 6, cached by the tiny teacher (in a
    fixed folder, so the other modules that use this fixture find it already cached)."""
    from conftest import SAMPLE

    words = " ".join(json.loads(line)["response"] for line in SAMPLE.read_text().splitlines())
    words = words.split()
    folder = tmp_path_factory.getbasetemp() / "stream-cache"
    folder.mkdir(exist_ok=True)
    data = folder / "texts.jsonl"
    lengths = [3 + (i * 37) % 78 for i in range(ROWS)]
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(words[i : i + n])}) + "\n" for i, n in enumerate(lengths)
        )
    )
    path = run_cache(
        CacheConfig(
            model=str(tiny_teacher),
            dataset=str(data),
            top_k=6,
            num_shards_hint=4,
            cache_root=str(folder / "caches"),
        ),
        progress=False,
    )
    cache = Cache(path)
    assert len(cache.shards) == 4 and cache.manifest["totals"]["rows"] == ROWS
    return cache


def ids(rows: list[CacheRow]) -> list[str]:
    return [r.seq_id for r in rows]


def test_one_epoch_is_every_row_once_with_its_values(small_cache: Cache):
    stream = CacheStream(small_cache, seed=0, shuffle_buffer=8)
    got = {r.seq_id: r for r in stream.epoch_rows(0)}
    expected = list(small_cache.rows())
    assert len(got) == len(expected) == ROWS
    for row in expected:
        mine = got[row.seq_id]
        for field in ("input_ids", "positions", "topk_ids", "topk_logprobs", "target_logprobs"):
            np.testing.assert_array_equal(getattr(mine, field), getattr(row, field))


def test_order_is_seeded_and_reshuffled_every_epoch(small_cache: Cache):
    def order(seed: int, epoch: int) -> list[str]:
        return ids(list(CacheStream(small_cache, seed=seed, shuffle_buffer=8).epoch_rows(epoch)))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != ids(list(small_cache.rows()))
    assert sorted(order(0, 1)) == sorted(order(0, 0))


@pytest.mark.parametrize("world_size", [2, 3, 7])  # 7 ranks > 4 shards
def test_ranks_are_disjoint_and_cover_the_cache(small_cache: Cache, world_size: int):
    parts = [
        ids(list(CacheStream(small_cache, seed=3, rank=r, world_size=world_size).epoch_rows(2)))
        for r in range(world_size)
    ]
    union = [s for part in parts for s in part]
    assert len(union) == len(set(union)) == ROWS
    assert set(union) == set(ids(list(small_cache.rows())))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_each_rank_decodes_only_its_shards(small_cache: Cache, monkeypatch: pytest.MonkeyPatch):
    decoded = []
    read = small_cache.read_shard
    monkeypatch.setattr(
        small_cache, "read_shard", lambda i, *rest: decoded.append(i) or read(i, *rest)
    )
    for rank in range(3):
        list(CacheStream(small_cache, seed=0, rank=rank, world_size=3).epoch_rows(0))
    assert len(decoded) <= len(small_cache.shards) + 3 - 1


def test_more_readers_than_rows_is_refused(small_cache: Cache):
    stream = CacheStream(small_cache, seed=0, rank=0, world_size=ROWS + 1)
    with pytest.raises(RlkdError, match="gets no rows"):
        list(stream.epoch_rows(0))


@pytest.mark.parametrize("prefetch", [1, 3, 10])
def test_prefetching_shards_changes_nothing_but_when_they_are_read(small_cache: Cache, prefetch):
    def rows(ahead: int) -> list[CacheRow]:
        stream = CacheStream(small_cache, seed=3, shuffle_buffer=5, rank=1, world_size=2)
        stream.prefetch = ahead
        return list(stream.rows(epochs=2))

    plain, ahead = rows(0), rows(prefetch)
    assert ids(plain) == ids(ahead) and len(plain) == ROWS  # rank 1's half, two epochs
    for a, b in zip(plain, ahead, strict=True):
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


def test_a_prefetched_shard_that_fails_raises_where_it_is_used(small_cache: Cache, tmp_path):
    damaged = Path(shutil.copytree(small_cache.layout.path, tmp_path / "damaged"))
    shard = damaged / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    cache = Cache(damaged)
    assert len(list(cache.blocks(indices=[0, 1, 3], prefetch=3))) == 3
    blocks = cache.blocks(prefetch=3)  # shard 2 is read while 0 and 1 are in use
    assert [len(next(blocks)), len(next(blocks))] == [s.rows for s in cache.info.shards[:2]]
    with pytest.raises(RlkdError, match=r"shard-00002\.parquet: checksum mismatch"):
        next(blocks)


@pytest.mark.parametrize("consumed", [0, 1, 17, ROWS, ROWS + 5, 2 * ROWS + 39])
def test_resume_continues_exactly(small_cache: Cache, consumed: int):
    def stream() -> CacheStream:
        return CacheStream(small_cache, seed=5, shuffle_buffer=6)

    whole = ids(list(stream().rows(epochs=3)))
    first = stream()
    it = first.rows(epochs=3)
    head = [next(it).seq_id for _ in range(consumed)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == max(consumed - 1, 0) // ROWS
    resumed = stream()
    resumed.load_state_dict(state)
    assert head + ids(list(resumed.rows(epochs=3))) == whole


def test_state_names_the_last_row(small_cache: Cache):
    stream = CacheStream(small_cache, seed=0)
    row = next(iter(stream))
    state = stream.state_dict()
    assert state["rows"] == 1 and state["epoch"] == 0
    shard_rows = list(small_cache.rows())
    first = sum(s["rows"] for s in small_cache.shards[: state["shard"]])
    assert shard_rows[first + state["row"]].seq_id == row.seq_id


def test_resume_with_other_settings_is_refused(small_cache: Cache):
    state = CacheStream(small_cache, seed=0).state_dict()
    with pytest.raises(RlkdError, match=r"seed=0.*seed=1"):
        CacheStream(small_cache, seed=1).load_state_dict(state)


def test_max_tokens_caps_each_epoch(small_cache: Cache):
    full = list(CacheStream(small_cache, seed=0).epoch_rows(0))
    capped = list(CacheStream(small_cache, seed=0, max_tokens=300).epoch_rows(0))
    lengths = [len(r.input_ids) for r in capped]
    assert sum(lengths) >= 300 and sum(lengths[:-1]) < 300
    assert ids(capped) == ids(full[: len(capped)])


def test_bad_arguments(small_cache: Cache):
    with pytest.raises(RlkdError, match="rank 2"):
        CacheStream(small_cache, seed=0, rank=2, world_size=2)
    with pytest.raises(RlkdError, match="shuffle_buffer"):
        CacheStream(small_cache, seed=0, shuffle_buffer=0)
