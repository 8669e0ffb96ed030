"""Choosing and building the teacher backend (`--backend auto|hf|vllm`)."""

from __future__ import annotations

from pathlib import Path

from rlkd_cache.config import CacheConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherBackend


def resolve_backend(cfg: CacheConfig) -> tuple[str, str]:
    """(backend name, why it was chosen), for the log and the manifest."""
    if cfg.backend == "vllm":
        raise RlkdError("--backend vllm is not available in this version; use --backend hf")
    if cfg.backend == "hf":
        return "hf", "asked for with --backend hf"
    return "hf", "auto: transformers is the available backend"


def make_backend(name: str, model: Path, cfg: CacheConfig) -> TeacherBackend:
    """Build the named backend for `model`."""
    from rlkd_cache.teacher.hf import HFTeacher

    return HFTeacher(model, dtype=cfg.dtype)
