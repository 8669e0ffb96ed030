"""The student: loading it, checking it against the cache, and its hidden states.

Training needs the student's final hidden states at the distilled positions and its LM head
(applied in chunks by `losses.distill_loss`), so the full (B, T, V) logits never exist.
That requires a plain linear LM head: students with logit soft-capping are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.fingerprint import vocab_sha256
from rlkd_cache.store.reader import Cache


def load_student(path: str | Path, device: torch.device) -> tuple[Any, Any]:
    """(model in fp32 on `device`, tokenizer) from a local Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RlkdError(f"student not found: {path} (expected a local Hugging Face model folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise RlkdError(f"cannot load student from {path}: {e}") from None
    except RuntimeError as e:  # transformers: the weights' shapes differ from config.json's
        raise RlkdError(
            f"cannot load student from {path}: its weights do not fit its config.json "
            f"(for example vocab_size differs from the embedding's rows): {str(e)[:200]}"
        ) from None
    if getattr(model.config, "final_logit_softcapping", None):
        raise RlkdError(f"{path}: students with logit soft-capping are not supported")
    return model.to(device), tokenizer


def check_compatible(cache: Cache, tokenizer: Any, model: Any, rank_k: int, label: str) -> None:
    """Refuse a cache the student cannot learn from, naming both sides."""
    cached = cache.info.tokenizer
    ours = vocab_sha256(tokenizer)
    theirs = cached.vocab_sha256
    if ours != theirs:
        raise RlkdError(
            f"the student's tokenizer ({len(tokenizer)} tokens, vocab sha256 {ours[:12]}) differs "
            f"from the {label} cache's ({cached.vocab_size} tokens, vocab sha256 "
            f"{str(theirs)[:12]}) at {cache.layout}: distil with a student of the teacher's "
            "tokenizer"
        )
    head = model.get_output_embeddings().weight.shape[0]
    if head < cache.vocab_size:
        raise RlkdError(
            f"the student's LM head has {head} outputs, fewer than the {label} cache's vocabulary "
            f"({cache.vocab_size}) at {cache.layout}"
        )
    if cache.k < rank_k:
        raise RlkdError(
            f"the {label} cache at {cache.layout} has k={cache.k}, smaller than --rank-k {rank_k}: "
            f"use --rank-k {cache.k} or a cache with a larger --top-k"
        )


def hidden_at(
    model: Any, input_ids: Tensor, attention_mask: Tensor, row: Tensor, pos: Tensor
) -> Tensor:
    """Final hidden states at the distilled positions: (B, T) inputs -> (N, H)."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state[row, pos]  # (N, H)


def lm_head(model: Any) -> tuple[Tensor, Tensor | None]:
    """(weight (V, H), bias (V,) or None) of the student's output layer."""
    head = model.get_output_embeddings()
    return head.weight, head.bias
