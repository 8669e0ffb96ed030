"""The pure vLLM output parser, on recorded engine outputs and hand-made edge cases.

`tests/data/vllm_recorded/prompt_logprobs.json` holds real vLLM prompt log-probs (flat and
list-of-dict formats) of the conftest tiny Llama, with the transformers backend's rows for
the same tokens; `record.py` next to it rewrote it. No engine and no vLLM import needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rlkd_cache.teacher.vllm import parse_prompt_logprobs

RECORDED = Path(__file__).parent / "data" / "vllm_recorded" / "prompt_logprobs.json"
TOL = 1e-4
"""vLLM vs transformers on the same fp32 weights: measured max difference ~1.4e-5 nat."""


def recorded() -> dict:
    return json.loads(RECORDED.read_text())


def as_flat(entry: dict) -> SimpleNamespace:
    """The recorded fields of a `vllm.logprobs.FlatLogprobs`."""
    return SimpleNamespace(**entry)


def as_dicts(entry: list) -> list:
    """The recorded list-of-dicts format: None, then {token_id: Logprob-like}."""
    return [
        None
        if pos is None
        else {t: SimpleNamespace(logprob=lp, rank=rank, decoded_token=None) for t, lp, rank in pos}
        for pos in entry
    ]


CASES = [s["name"] for s in recorded()["sequences"]]


@pytest.fixture(params=CASES)
def case(request) -> dict:
    return next(s for s in recorded()["sequences"] if s["name"] == request.param)


@pytest.mark.parametrize("fmt", ["flat", "dicts"])
def test_recorded_output_parses_to_the_transformers_rows(case, fmt):
    ids = np.array(case["input_ids"], dtype=np.int32)
    positions = np.arange(len(ids) - 1, dtype=np.int32)
    raw = as_flat(case["flat"]) if fmt == "flat" else as_dicts(case["dicts"])
    out = parse_prompt_logprobs(raw, ids, positions, recorded()["k"])
    ref = case["hf"]
    np.testing.assert_array_equal(out.topk_ids, np.array(ref["topk_ids"]))
    np.testing.assert_allclose(out.topk_logprobs, ref["topk_logprobs"], atol=TOL)
    np.testing.assert_allclose(out.target_logprobs, ref["target_logprobs"], atol=TOL)
    assert out.topk_ids.dtype == np.int32 and out.topk_logprobs.dtype == np.float32
    assert (np.diff(out.topk_logprobs, axis=1) <= 0).all()


def test_both_recorded_formats_parse_identically(case):
    ids = np.array(case["input_ids"])
    positions = np.arange(len(ids) - 1)
    k = recorded()["k"]
    flat = parse_prompt_logprobs(as_flat(case["flat"]), ids, positions, k)
    dicts = parse_prompt_logprobs(as_dicts(case["dicts"]), ids, positions, k)
    for name in ("topk_ids", "topk_logprobs", "target_logprobs"):
        np.testing.assert_array_equal(getattr(flat, name), getattr(dicts, name))


def test_recordings_cover_position_zero_and_both_entry_counts():
    k = recorded()["k"]
    sizes = set()
    for case in recorded()["sequences"]:
        assert case["dicts"][0] is None  # position 0 (token 0) has no log-probs
        starts, ends = case["flat"]["start_indices"], case["flat"]["end_indices"]
        assert starts[0] == ends[0]
        assert {e - s for s, e in zip(starts[1:], ends[1:], strict=True)} == {k + 1}
        sizes |= {len(pos) for pos in case["dicts"][1:]}
    assert sizes == {k, k + 1}  # actual token inside the top-k, and outside it (k+1 case)


def test_k_plus_one_case_keeps_the_actual_token_out_of_the_top_k():
    case = next(s for s in recorded()["sequences"] if s["name"] == "sample_text")
    ids = np.array(case["input_ids"])
    positions = np.arange(len(ids) - 1)
    out = parse_prompt_logprobs(as_flat(case["flat"]), ids, positions, recorded()["k"])
    for t in positions:
        entries = case["dicts"][t + 1]
        actual = {tok: lp for tok, lp, rank in entries}[int(ids[t + 1])]
        assert out.target_logprobs[t] == np.float32(actual)
        if len(entries) == recorded()["k"] + 1:
            assert ids[t + 1] not in out.topk_ids[t]
            assert out.target_logprobs[t] <= out.topk_logprobs[t, -1]


def test_a_subset_of_positions_picks_the_matching_rows(case):
    ids = np.array(case["input_ids"])
    k = recorded()["k"]
    every = parse_prompt_logprobs(as_flat(case["flat"]), ids, np.arange(len(ids) - 1), k)
    some = np.array([0, 3, len(ids) - 2])
    out = parse_prompt_logprobs(as_flat(case["flat"]), ids, some, k)
    np.testing.assert_array_equal(out.topk_ids, every.topk_ids[some])
    np.testing.assert_array_equal(out.target_logprobs, every.target_logprobs[some])


def test_smaller_k_is_a_prefix():
    case = recorded()["sequences"][0]
    ids = np.array(case["input_ids"])
    positions = np.arange(len(ids) - 1)
    full = parse_prompt_logprobs(as_flat(case["flat"]), ids, positions, 5)
    two = parse_prompt_logprobs(as_flat(case["flat"]), ids, positions, 2)
    np.testing.assert_array_equal(two.topk_ids, full.topk_ids[:, :2])


def flat(*positions: list[tuple[int, float, int]]) -> SimpleNamespace:
    """A FlatLogprobs-like object: position 0 empty, then the given (id, logprob, rank)s."""
    out = SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[], ranks=[])
    for entries in positions:
        out.start_indices.append(len(out.token_ids))
        for token, lp, rank in entries:
            out.token_ids.append(token)
            out.logprobs.append(lp)
            out.ranks.append(rank)
        out.end_indices.append(len(out.token_ids))
    return out


def test_ties_keep_rank_order_and_duplicates_collapse():
    # actual token 7 is in the top-2 and tied with token 4: listed first, then again by rank
    raw = flat([(7, -1.0, 2), (4, -1.0, 1), (7, -1.0, 2)])
    out = parse_prompt_logprobs(raw, np.array([1, 7]), np.array([0]), 2)
    np.testing.assert_array_equal(out.topk_ids, [[4, 7]])
    np.testing.assert_array_equal(out.target_logprobs, [-1.0])


def test_ranks_of_none_sort_after_ranked_entries():
    raw = flat([(9, -3.0, None), (2, -0.5, 1), (3, -0.9, 2)])
    out = parse_prompt_logprobs(raw, np.array([1, 9]), np.array([0]), 2)
    np.testing.assert_array_equal(out.topk_ids, [[2, 3]])
    np.testing.assert_allclose(out.target_logprobs, [-3.0])


def test_no_positions_gives_empty_rows():
    out = parse_prompt_logprobs(flat([(5, -1.0, 1)]), np.array([1, 5]), np.array([], int), 3)
    assert out.topk_ids.shape == (0, 3) and out.target_logprobs.shape == (0,)


@pytest.mark.parametrize(
    ("raw", "ids", "positions", "match"),
    [
        (flat([(5, -1.0, 1)]), np.array([1, 5, 6]), np.array([0]), "for 2 of 3 tokens"),
        (flat([(5, -1.0, 1)]), np.array([1, 5]), np.array([1]), r"positions must lie in \[0, 0\]"),
        (flat([(5, -1.0, 1)]), np.array([1, 6]), np.array([0]), "actual next token at position 0"),
        (flat([(5, -1.0, 1)]), np.array([1, 5]), np.array([0]), "fewer than k=2"),
    ],
)
def test_output_that_does_not_fit_the_sequence_is_a_loud_bug(raw, ids, positions, match):
    k = 2 if "fewer" in match else 1
    with pytest.raises(ValueError, match=match):
        parse_prompt_logprobs(raw, ids, positions, k)
