"""`rlkd cache --responses teacher`: the teacher writes the responses it is cached on."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SAMPLE
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache


def teacher_config(model, root, **over) -> CacheConfig:
    values = {
        "model": str(model),
        "dataset": str(SAMPLE),
        "split": "train[:6]",
        "top_k": 4,
        "responses": "teacher",
        "gen_max_new_tokens": 10,
        "positions": "response",
        "cache_root": str(root),
        **over,
    }
    return CacheConfig(**values)


def test_generated_responses_are_cached_and_kept(tiny_teacher, cache_root):
    path = run_cache(teacher_config(tiny_teacher, cache_root), progress=False)
    cache = Cache(path)
    saved = pq.read_table(path / "responses.parquet").to_pylist()
    assert cache.manifest["responses"]["source"] == "teacher"
    assert [r["seq_id"] for r in saved] == [str(i) for i in range(6)]
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    prompts = [json.loads(line)["prompt"] for line in SAMPLE.read_text().splitlines()[:6]]
    for row, entry, prompt in zip(cache.rows(), saved, prompts, strict=True):
        assert prompt in entry["prompt"] and entry["prompt"].endswith("assistant\n")
        text = tok.decode(row.input_ids)
        assert text.startswith(entry["prompt"])  # the cached sequence is prompt + generation
        assert entry["response"] in text
        response_tokens = tok.decode(row.input_ids[row.positions[0] + 1 :])
        assert response_tokens.startswith(entry["response"])
    # a different seed is another cache; the same settings find this one
    assert run_cache(teacher_config(tiny_teacher, cache_root), progress=False) == path
    other = run_cache(teacher_config(tiny_teacher, cache_root, gen_seed=1), progress=False)
    assert other != path


def test_an_interrupted_run_reuses_its_generations(tiny_teacher, cache_root):
    path = run_cache(teacher_config(tiny_teacher, cache_root), progress=False)
    responses = path / "responses.parquet"
    mtime = responses.stat().st_mtime_ns
    before = [r.input_ids.tolist() for r in Cache(path).rows()]
    for name in ["manifest.json", *(p.name for p in path.glob("shard-*.parquet"))]:
        (path / name).unlink()  # as if killed after generating, before scoring
    assert run_cache(teacher_config(tiny_teacher, cache_root), progress=False) == path
    assert responses.stat().st_mtime_ns == mtime
    assert [r.input_ids.tolist() for r in Cache(path).rows()] == before


def test_plain_text_rows_are_refused(tiny_teacher, cache_root, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "just text"}\n')
    with pytest.raises(RlkdError, match="--responses teacher needs prompts"):
        run_cache(
            teacher_config(tiny_teacher, cache_root, dataset=str(data), split="train"),
            progress=False,
        )
