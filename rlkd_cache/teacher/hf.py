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
from rlkd_cache.teacher import TeacherOutput, make_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    """Teacher backend on `transformers.AutoModelForCausalLM`."""

    name = "hf"

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str | None = None):
        import transformers

        self._transformers_version = transformers.__version__
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
        return f"transformers {self._transformers_version}, torch {torch.__version__}"

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

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], cfg: Any, progress: bool = True
    ) -> list[list[int]]:
        """Left-padded batched `model.generate`, seeded per batch; stops at the model's
        end-of-sequence tokens (its generation config), which are not returned."""
        from tqdm import tqdm

        gen = self.model.generation_config
        stop = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        stop = [t for t in stop if t is not None]
        pad = stop[0] if stop else 0
        lengths = [len(p) + cfg.gen_max_new_tokens for p in prompts]
        out: dict[int, list[int]] = {}
        bar = tqdm(
            total=len(prompts), unit="prompt", desc="teacher responses", disable=not progress
        )
        for number, batch in enumerate(make_batches(lengths, max(cfg.batch_tokens, max(lengths)))):
            longest = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros_like(ids)
            for b, i in enumerate(batch):
                ids[b, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[b, longest - len(prompts[i]) :] = 1
            torch.manual_seed(cfg.gen_seed * 1_000_003 + number)
            sample = cfg.gen_temperature > 0
            result = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=cfg.gen_max_new_tokens,
                do_sample=sample,
                temperature=cfg.gen_temperature if sample else None,
                top_p=cfg.gen_top_p if sample else None,
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
