"""The transformers teacher backend: the reference implementation.

A plain forward pass over right-padded batches, log_softmax over the full vocabulary in fp32,
then top-k and the log-prob of the actual next token at each distilled position. Simple and
obviously right; the vLLM backend is tested against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlkd_cache.data import Sequence
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherOutput
from rlkd_cache.train.batching import plan_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    """Teacher backend on `transformers.AutoModelForCausalLM`."""

    name = "hf"

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str | None = None):
        import transformers

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_path), dtype=DTYPES[dtype]
            )
        except (OSError, ValueError) as e:
            raise RlkdError(f"cannot load teacher model from {model_path}: {e}") from None
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])

    def version(self) -> str:
        from rlkd_cache.teacher.select import backend_version

        return backend_version(self.name)

    @torch.inference_mode()
    def score(self, batch: list[Sequence], k: int) -> list[TeacherOutput]:
        longest = max(len(s.input_ids) for s in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids[b, : len(seq.input_ids)] = torch.from_numpy(seq.input_ids)
            mask[b, : len(seq.input_ids)] = 1
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).logits  # (B, T, V)
        outputs = []
        for b, seq in enumerate(batch):
            pos = torch.from_numpy(seq.positions.astype(np.int64)).to(self.device)  # (P,)
            logprobs = torch.log_softmax(logits[b, pos].float(), dim=-1)  # (P, V)
            top = logprobs.topk(k, dim=-1)  # (P, k), sorted descending
            nxt = ids[b, pos.cpu() + 1].to(self.device)  # (P,) the actual next tokens
            target = logprobs.gather(1, nxt[:, None])[:, 0]  # (P,)
            outputs.append(
                TeacherOutput(
                    topk_ids=top.indices.to(torch.int32).cpu().numpy(),
                    topk_logprobs=top.values.cpu().numpy(),
                    target_logprobs=target.cpu().numpy(),
                )
            )
        return outputs

    def generate(
        self, prompts: list[list[int]], cfg: Any, progress: bool = True
    ) -> list[list[int]]:
        """Sampled continuations with `cfg.gen_*` settings (see `generate_tokens`)."""
        return generate_tokens(
            self.model,
            prompts,
            max_new_tokens=cfg.gen_max_new_tokens,
            batch_tokens=cfg.batch_tokens,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            seed=cfg.gen_seed,
            desc="teacher responses",
            progress=progress,
        )


@torch.inference_mode()
def generate_tokens(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "generate",
    progress: bool = False,
) -> list[list[int]]:
    """Continuations of tokenized prompts with `model.generate`, in the prompts' order: batched
    by token budget with left padding, greedy at temperature 0, else sampled with a seed per
    batch; stops at the model's end-of-sequence tokens (its generation config), not returned."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    gen = model.generation_config
    stop = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stop = [t for t in stop if t is not None]
    pad = stop[0] if stop else 0
    lengths = [len(p) + max_new_tokens for p in prompts]
    out: dict[int, list[int]] = {}
    bar = tqdm(total=len(prompts), unit="prompt", desc=desc, disable=not progress)
    for number, batch in enumerate(plan_window(np.array(lengths), max([batch_tokens, *lengths]))):
        longest = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)  # (B, T)
        for b, i in enumerate(batch):
            ids[b, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[b, longest - len(prompts[i]) :] = 1
        torch.manual_seed(seed * 1_000_003 + number)
        sample = temperature > 0
        result = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            eos_token_id=stop or None,
            pad_token_id=pad,
        )[:, longest:].cpu()  # (B, new)
        for b, i in enumerate(batch):
            tokens = result[b].tolist()
            ends = [j for j, t in enumerate(tokens) if t in stop]
            out[i] = tokens[: ends[0]] if ends else tokens
        bar.update(len(batch))
    bar.close()
    return [out[i] for i in range(len(prompts))]
