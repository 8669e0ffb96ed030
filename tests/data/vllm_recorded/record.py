"""Record real vLLM prompt log-probs for the pure parser test (`tests/test_vllm_parse.py`).

Builds the conftest tiny Llama, runs two sequences through a vLLM engine in both output
formats (flat and list-of-dicts) and through the transformers backend, and writes
`prompt_logprobs.json` next to this file. The first sequence is sample text (the actual
next token is mostly outside the top-k: the k+1 case); the second continues a prompt with
the teacher's own greedy tokens (the actual token is the top-1: the k case). Rerun it only
when vLLM's output format changes:

    VLLM_CPU_KVCACHE_SPACE=1 python tests/data/vllm_recorded/record.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
K = 5


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, str(HERE.parent.parent))
    import numpy as np
    import torch

    from conftest import SAMPLE, build_llama, build_tokenizer
    from rlkd_cache.config import CacheConfig
    from rlkd_cache.data import Sequence
    from rlkd_cache.teacher.hf import HFTeacher
    from rlkd_cache.teacher.vllm import VLLMTeacher

    tokenizer = build_tokenizer()
    model = build_llama(Path(tempfile.mkdtemp()) / "teacher", tokenizer)
    hf = HFTeacher(model)
    text = json.loads(SAMPLE.read_text().splitlines()[0])["response"]
    sample_ids = tokenizer(text)["input_ids"][:40]
    greedy = tokenizer("Hello")["input_ids"]
    with torch.inference_mode():
        for _ in range(12):
            logits = hf.model(input_ids=torch.tensor([greedy])).logits
            greedy.append(int(logits[0, -1].argmax()))
    cases = {"sample_text": sample_ids, "greedy": greedy}

    teacher = VLLMTeacher(model, CacheConfig(top_k=K, vllm_engine_kwargs={"enforce_eager": True}))
    sequences = []
    for name, ids in cases.items():
        seq = Sequence(name, np.asarray(ids, dtype=np.int32), np.arange(len(ids) - 1))
        prompt = teacher._prompt_type(prompt_token_ids=list(ids))
        flat_params = teacher.sampling_params(K)
        dict_params = teacher._params_type(
            max_tokens=1, prompt_logprobs=K, temperature=1.0, detokenize=False
        )
        flat = teacher.llm.generate([prompt], flat_params, use_tqdm=False)[0].prompt_logprobs
        dicts = teacher.llm.generate([prompt], dict_params, use_tqdm=False)[0].prompt_logprobs
        ref = hf.score([seq], K)[0]
        sequences.append(
            {
                "name": name,
                "input_ids": list(ids),
                "flat": {
                    "start_indices": list(flat.start_indices),
                    "end_indices": list(flat.end_indices),
                    "token_ids": list(flat.token_ids),
                    "logprobs": list(flat.logprobs),
                    "ranks": list(flat.ranks),
                },
                "dicts": [
                    None if e is None else [[t, lp.logprob, lp.rank] for t, lp in e.items()]
                    for e in dicts
                ],
                "hf": {
                    "topk_ids": ref.topk_ids.tolist(),
                    "topk_logprobs": ref.topk_logprobs.tolist(),
                    "target_logprobs": ref.target_logprobs.tolist(),
                },
            }
        )
    teacher.close()
    out = {
        "about": "vLLM prompt log-probs of the conftest tiny Llama; written by record.py",
        "vllm": teacher.version(),
        "k": K,
        "sequences": sequences,
    }
    (HERE / "prompt_logprobs.json").write_text(json.dumps(out) + "\n")
    print(f"wrote {HERE / 'prompt_logprobs.json'}")


if __name__ == "__main__":
    main()
