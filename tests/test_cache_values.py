"""Cached values equal an independent full-softmax computation on the same model.

For text, prompt/response and chat data, in both `--positions` modes: ids exact, log-probs
within the encoding bound, and position t holding the distribution of token t + 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SAMPLE
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.store.reader import Cache

BOUND = 0.005 + 1e-5  # the encoding bound, plus fp noise between batched and single forwards


def sample_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    rows = sample_rows(10)
    messages = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": a["prompt"]},
                {"role": "assistant", "content": a["response"]},
                {"role": "user", "content": b["prompt"]},
                {"role": "assistant", "content": b["response"]},
            ]
        }
        for a, b in zip(rows[::2], rows[1::2], strict=True)
    ]
    return {
        "text": write_jsonl(folder / "text.jsonl", [{"text": r["response"]} for r in rows]),
        "pair": write_jsonl(folder / "pair.jsonl", rows),
        "messages": write_jsonl(folder / "chat.jsonl", messages),
    }


@pytest.fixture(scope="module")
def model(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def reference(model, input_ids: np.ndarray, k: int):
    """Full softmax of one unpadded, unbatched forward: (T, k) ids, (T, k) and (T, V) log-probs."""
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64))[None]).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.indices.numpy(), top.values.numpy(), logprobs.numpy()


@pytest.mark.parametrize("shape", ["text", "pair", "messages"])
@pytest.mark.parametrize("positions", ["all", "response"])
def test_cached_values_match_full_softmax(
    shape, positions, datasets_dir, tiny_teacher, model, cache_root
):
    k = 8
    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(datasets_dir[shape]),
        top_k=k,
        positions=positions,
        batch_tokens=300,
        cache_root=str(cache_root),
    )
    cache = Cache(run_cache(cfg, progress=False))
    rows = list(cache.rows())
    assert len(rows) == (10 if shape != "messages" else 5)
    for row in rows:
        ids, values, full = reference(model, row.input_ids, k)
        t = row.positions
        assert t.max() <= len(row.input_ids) - 2  # the last token has no successor
        np.testing.assert_array_equal(row.topk_ids, ids[t])
        assert np.abs(row.topk_logprobs - values[t]).max() <= BOUND
        actual = full[t, row.input_ids[t + 1]]  # position t scores token t + 1
        assert np.abs(row.target_logprobs - actual).max() <= BOUND
        if positions == "all":
            np.testing.assert_array_equal(t, np.arange(len(row.input_ids) - 1))


def test_response_positions_are_exactly_the_response_tokens(datasets_dir, tiny_teacher, cache_root):
    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(datasets_dir["pair"]),
        top_k=4,
        positions="response",
        cache_root=str(cache_root),
    )
    cache = Cache(run_cache(cfg, progress=False))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for row, source in zip(cache.rows(), sample_rows(10), strict=True):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": source["prompt"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        np.testing.assert_array_equal(
            row.input_ids[:n_prompt], tok(prompt, add_special_tokens=False)["input_ids"]
        )
        # distilled: every t whose next token t + 1 is a response token, and nothing else
        np.testing.assert_array_equal(
            row.positions, np.arange(n_prompt - 1, len(row.input_ids) - 1)
        )
        assert tok.decode(row.input_ids[n_prompt:]).startswith(source["response"])


def test_alignment_position_t_predicts_token_t_plus_1(
    datasets_dir, tiny_teacher, model, cache_root
):
    """Directly: the distribution stored at t is the model's prediction after seeing 0..t."""
    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(datasets_dir["text"]),
        top_k=5,
        cache_root=str(cache_root),
    )
    row = next(Cache(run_cache(cfg, progress=False)).rows())
    for t in (0, 3, len(row.input_ids) - 2):
        prefix = torch.from_numpy(row.input_ids[: t + 1].astype(np.int64))[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(prefix).logits[0, -1].double(), -1)
        index = int(np.flatnonzero(row.positions == t)[0])
        np.testing.assert_array_equal(row.topk_ids[index], lp.topk(5).indices.numpy())
        assert abs(row.target_logprobs[index] - lp[int(row.input_ids[t + 1])].item()) <= BOUND


def test_truncation_and_bad_rows_are_counted(tmp_path, tiny_teacher, cache_root):
    rows = [{"text": "word " * 200}, {"text": ""}, {"text": None}, {"text": 7}, {"text": "fine"}]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(data),
        top_k=3,
        max_length=32,
        cache_root=str(cache_root),
    )
    cache = Cache(run_cache(cfg, progress=False))
    assert cache.manifest["truncated"] == 1
    assert cache.manifest["skipped"] == {"empty:text": 1, "missing:text": 1, "wrong_type:text": 1}
    lengths = [len(r.input_ids) for r in cache.rows()]
    assert lengths[0] == 32 and len(lengths) == 2
