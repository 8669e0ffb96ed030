"""Teacher backends: turn token sequences into top-k next-token log-probabilities.

A backend implements `TeacherBackend`. The transformers backend (`hf.py`) is the reference;
the vLLM backend (`vllm.py`) is the fast path on GPUs. Both return exactly the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rlkd_cache.data import Sequence


@dataclass
class TeacherOutput:
    """The teacher's view of one sequence at its distilled positions (P of them)."""

    topk_ids: np.ndarray  # (P, k) int32, most likely first
    topk_logprobs: np.ndarray  # (P, k) float32, descending, normalized over the full vocab
    target_logprobs: np.ndarray  # (P,) float32, log-prob of the actual next token


class TeacherBackend(Protocol):
    """What the cache pipeline needs from a teacher."""

    name: str
    """Short backend name recorded in the manifest ("hf", "vllm")."""
    vocab_size: int
    """Size of the teacher's output distribution."""

    def version(self) -> str:
        """Backend library and version, for the manifest (for example "transformers 5.19.0")."""
        ...

    def score(self, batch: list[Sequence], k: int) -> list[TeacherOutput]:
        """Top-k log-probs at each sequence's distilled positions, in the batch's order."""
        ...

    def generate(
        self, prompts: list[list[int]], cfg: Any, progress: bool = True
    ) -> list[list[int]]:
        """Sampled continuations (token ids, end-of-turn excluded) of tokenized prompts, with
        `cfg.gen_*` settings (`CacheConfig`), in the prompts' order."""
        ...
