"""Kill test: SIGKILL `rlkd cache` mid-run (its whole process group: a vLLM engine too),
rerun; completed shards are kept and the export equals an uninterrupted run's exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE

SHARDS = 24


def cache_cmd(model: Path, data: Path, root: Path, backend: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "rlkd_cli.main",
        "cache",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--top-k",
        "5",
        "--num-shards-hint",
        str(SHARDS),
        "--batch-tokens",
        "96",
        "--cache-root",
        str(root),
        "--no-progress",
        "--backend",
        backend,
    ]
    if backend == "vllm":
        cmd += ["--vllm-engine-kwargs", '{"enforce_eager": true}']
    return cmd


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_sigkill_then_rerun_equals_uninterrupted(tiny_teacher, tmp_path, backend):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()] * 3
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": r["response"]}) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

    killed_root = tmp_path / "killed"
    proc = subprocess.Popen(
        cache_cmd(tiny_teacher, data, killed_root, backend),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # its own process group, engine included
    deadline = time.time() + 300
    shards: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        shards = list(killed_root.glob("*/shard-*.parquet"))
        if len(shards) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it was killed: " + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    cache_dir = shards[0].parent
    assert not (cache_dir / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*.parquet")}
    assert 2 <= len(kept) < SHARDS

    def run(root: Path) -> subprocess.CompletedProcess:
        cmd = cache_cmd(tiny_teacher, data, root, backend)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    resumed = run(killed_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(cache_dir)
    for name, mtime in kept.items():  # completed shards were kept, not redone
        assert (cache_dir / name).stat().st_mtime_ns == mtime
    assert not list(cache_dir.glob(".*.tmp"))

    clean = run(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_dir = Path(clean.stdout.strip().splitlines()[-1])
    assert clean_dir.name == cache_dir.name  # same inputs, same content address

    exports = []
    for folder in (cache_dir, clean_dir):
        out = tmp_path / f"{folder.parent.name}.parquet"
        subprocess.run(
            [sys.executable, "-m", "rlkd_cli.main", "export", str(folder), str(out)],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        exports.append(pq.read_table(out))
    assert exports[0].num_rows == len(rows)
    assert exports[0].equals(exports[1])
