"""`rlkd eval --generate`: greedy generations of the student, scored by ROUGE-L.

Prompts and references come from a JSONL file with `prompt` and `response` fields (the prompt
is rendered with the student tokenizer's chat template), or, for the word `cache`, from the
eval cache's saved teacher responses (written by `rlkd cache --responses teacher`): its `prompt`
column is already rendered and is tokenized as it is, and the teacher's generations are the
references. Generation mirrors the teacher's (`teacher/hf.py`): left-padded batches of at most
`batch_tokens` padded tokens (prompt + new tokens), greedy, stopping at the student's
generation-config end-of-sequence tokens, decoded without special tokens and stripped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.errors import RlkdError
from rlkd_cache.eval.metrics import mean_rouge_l
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import Cache
from rlkd_cache.teacher.hf import generate_tokens

DEFAULT_MAX_NEW_TOKENS = 128
"""New tokens per generation, unless the references are the cache's own teacher generations
(then the teacher's `gen_max_new_tokens`, so both sides had the same budget)."""


def read_jsonl_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) of every non-empty line of a JSONL file."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlkdError(f"{path}:{number}: not valid JSON ({e})") from None
        for field in ("prompt", "response"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise RlkdError(f"{path}:{number}: expected a string field {field!r}")
        pairs.append((record["prompt"], record["response"]))
    return pairs


def check_source(source: str, cache: Cache) -> None:
    """Fail early, before any model is loaded, when the prompts of `source` cannot be read."""
    if source == "cache" and not cache.layout.has_responses():
        raise RlkdError(
            f"--generate cache: the cache at {cache.layout} has no {CacheDir.RESPONSES} (make it "
            "with `rlkd cache --responses teacher`, or pass a JSONL file of prompt/response)"
        )
    if source != "cache" and not Path(source).is_file():
        raise RlkdError(f"--generate {source}: no such file (expected JSONL, or the word `cache`)")


def load_prompts(source: str, cache: Cache, tokenizer: Any) -> list[tuple[str, str]]:
    """(rendered prompt, reference) pairs from a JSONL file or, for `cache`, the cache's
    teacher responses."""
    check_source(source, cache)
    if source == "cache":
        table = cache.layout.read_responses(["prompt", "response"]).to_pydict()
        return list(zip(table["prompt"], table["response"], strict=True))
    if getattr(tokenizer, "chat_template", None) is None:
        raise RlkdError(f"--generate {source}: the student's tokenizer has no chat template")
    return [
        (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            ),
            response,
        )
        for prompt, response in read_jsonl_pairs(Path(source))
    ]


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_tokens: int,
    device: torch.device,
    progress: bool = False,
) -> list[str]:
    """Greedy continuation of each rendered prompt (end-of-sequence excluded), in order."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    tokens = generate_tokens(
        model.to(device),
        ids,
        max_new_tokens=max_new_tokens,
        batch_tokens=batch_tokens,
        progress=progress,
    )
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def rouge_report(
    model: Any,
    tokenizer: Any,
    source: str,
    cache: Cache,
    *,
    max_new_tokens: int | None,
    limit: int | None,
    batch_tokens: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """`rouge_l` (mean ROUGE-L F1 of the greedy generations against the references) and
    `generations` (how many), for the first `limit` prompts of `source` (all if None)."""
    pairs = load_prompts(source, cache, tokenizer)[:limit]
    if not pairs:
        raise RlkdError(f"--generate {source}: no prompts to generate from")
    if max_new_tokens is None:
        teacher = cache.info.identity.get("generation", {})
        from_cache = source == "cache" and "max_new_tokens" in teacher
        max_new_tokens = teacher["max_new_tokens"] if from_cache else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise RlkdError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    texts = greedy_generate(
        model,
        tokenizer,
        [prompt for prompt, _ in pairs],
        max_new_tokens=max_new_tokens,
        batch_tokens=batch_tokens,
        device=device,
        progress=progress,
    )
    references = [reference for _, reference in pairs]
    return {
        "rouge_l": mean_rouge_l(zip(texts, references, strict=True)),
        "generations": len(texts),
    }
