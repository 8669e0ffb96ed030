"""The student: loading it, checking it against the cache, and its hidden states.

Training needs the student's final hidden states at the distilled positions and its LM head
(applied in chunks by `losses.distill_loss`), so the full (B, T, V) logits never exist.
That requires a plain linear LM head: students with logit soft-capping are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.fingerprint import vocab_sha256
from rlkd_cache.store.reader import Cache


def load_student(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    quantization: Any = None,
) -> tuple[Any, Any]:
    """(model in `dtype` on `device`, tokenizer) from a local Hugging Face folder; with
    `quantization` (a transformers `BitsAndBytesConfig`) loaded quantized onto `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RlkdError(f"student not found: {path} (expected a local Hugging Face model folder)")
    placed = {} if quantization is None else {"quantization_config": quantization}
    if quantization is not None:
        placed["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placed)
    except (OSError, ValueError) as e:
        raise RlkdError(f"cannot load student from {path}: {e}") from None
    except RuntimeError as e:  # transformers: the weights' shapes differ from config.json's
        raise RlkdError(
            f"cannot load student from {path}: its weights do not fit its config.json "
            f"(for example vocab_size differs from the embedding's rows): {str(e)[:200]}"
        ) from None
    if getattr(model.config, "final_logit_softcapping", None):
        raise RlkdError(f"{path}: students with logit soft-capping are not supported")
    return (model if quantization is not None else model.to(device)), tokenizer


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


@dataclass(frozen=True, eq=False)
class Head:
    """The student's output layer as the chunked loss applies it: logits = hidden @ weight.T
    + bias, plus, with a LoRA adapter on the head (peft), scaling * B(A(dropout(hidden))),
    which `low_rank` gives as (N, r) features and their (V, r) weight B."""

    weight: Tensor
    """(V, H) the head's (base) weight."""
    bias: Tensor | None
    """(V,) or None."""
    lora_a: Tensor | None = None
    """(r, H) the adapter's A, or None without an adapter on the head."""
    lora_b: Tensor | None = None
    """(V, r) the adapter's B."""
    scaling: float = 1.0
    """alpha / r of the adapter."""
    dropout: Callable[[Tensor], Tensor] | None = None
    """The adapter's dropout (a module: identity in eval mode)."""

    def low_rank(self, hidden: Tensor) -> tuple[Tensor, Tensor] | None:
        """(scaling * dropout(hidden) @ A.T (N, r), B (V, r)): the adapter's part of the
        logits as a second, rank-r linear map; None without an adapter."""
        if self.lora_a is None or self.lora_b is None:
            return None
        x = hidden if self.dropout is None else self.dropout(hidden)
        return F.linear(x.to(self.lora_a.dtype), self.lora_a) * self.scaling, self.lora_b

    def logits(self, hidden: Tensor) -> Tensor:
        """(n, V) logits of some positions' hidden states (n, H), in fp32."""
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        low = self.low_rank(hidden)
        return logits if low is None else logits + F.linear(*low).float()


def lm_head(model: Any) -> Head:
    """The student's output layer, with the LoRA adapter peft put on it, if any."""
    head = model.get_output_embeddings()
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A")):
        return Head(head.weight, head.bias)
    base, active = head.base_layer, head.active_adapters
    if head.merged or not active or active[0] not in head.lora_A:
        return Head(base.weight, base.bias)
    name = active[0]
    return Head(
        base.weight,
        base.bias,
        head.lora_A[name].weight,
        head.lora_B[name].weight,
        float(head.scaling[name]),
        head.lora_dropout[name],
    )
