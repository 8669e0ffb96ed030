"""The `rlkd` commands as a user runs them: cache, inspect, verify, ls, export, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache
from rlkd_cache.store.tools import EXPORT_SCHEMA
from rlkd_cli.main import app


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    from conftest import SAMPLE

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:12]]
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r["response"]}) + "\n" for r in rows))
    return path


def rlkd(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    return result


def cache(model: Path, data: Path, root: Path, *extra: str, code: int = 0):
    """`rlkd cache` of `data` with `model`, top-k 6 unless `extra` says otherwise."""
    return rlkd(
        "cache",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--cache-root",
        str(root),
        "--no-progress",
        "--top-k",
        "6",
        *extra,
        code=code,
    )


def last_line(result) -> Path:
    """The cache directory `rlkd cache` prints last."""
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def built(tiny_teacher, text_data, cache_root) -> Path:
    return last_line(cache(tiny_teacher, text_data, cache_root, "--num-shards-hint", "3"))


def test_cache_prints_path_last_and_second_run_is_a_noop(
    built, tiny_teacher, text_data, cache_root
):
    assert (built / "manifest.json").is_file() and built.parent == cache_root
    assert len(list(built.glob("shard-*.parquet"))) == 3
    mtime = (built / "manifest.json").stat().st_mtime_ns
    again = cache(tiny_teacher, text_data, cache_root)
    assert last_line(again) == built
    assert "already cached" in again.stderr
    assert (built / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "change", [["--top-k", "5"], ["--max-length", "64"], ["--positions", "response"]]
)
def test_different_inputs_get_different_directories(
    built, tiny_teacher, text_data, cache_root, change
):
    assert last_line(cache(tiny_teacher, text_data, cache_root, *change)) != built


def test_different_model_gets_a_different_directory(
    built, tmp_path, tiny_tokenizer, text_data, cache_root
):
    from conftest import build_llama

    model = build_llama(tmp_path / "other", tiny_tokenizer, seed=1)
    assert last_line(cache(model, text_data, cache_root)) != built


def test_inspect_ls_export(built, cache_root, tmp_path):
    info = json.loads(rlkd("inspect", str(built), "--json").stdout)
    assert info["k"] == 6 and info["rows"] == 12 and info["shards"] == 3
    assert info["bytes_per_position"] > 0 and 0 < info["mean_topk_mass"] <= 1
    assert "bytes_per_position" in rlkd("inspect", str(built)).stdout
    listing = rlkd("ls", "--cache-root", str(cache_root)).stdout
    assert str(built) in listing and "k=6" in listing
    out = tmp_path / "export.parquet"
    rlkd("export", str(built), str(out))
    table = pq.read_table(out)
    assert table.schema.equals(EXPORT_SCHEMA)
    for exported, row in zip(table.to_pylist(), Cache(built).rows(), strict=True):
        assert exported["seq_id"] == row.seq_id
        np.testing.assert_array_equal(exported["topk_ids"], row.topk_ids)
        np.testing.assert_array_equal(exported["topk_logprobs"], row.topk_logprobs)
        np.testing.assert_array_equal(exported["target_logprobs"], row.target_logprobs)
        assert np.all(np.diff(np.array(exported["topk_logprobs"]), axis=1) <= 0)


def test_flipped_byte_fails_verify_and_reader(built):
    assert "OK" in rlkd("verify", str(built)).stdout
    shard = sorted(built.glob("shard-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = rlkd("verify", str(built), code=1)
    assert shard.name in result.stderr and "sha256" in result.stderr
    with pytest.raises(RlkdError, match=shard.name):
        Cache(built).read_shard(1)


def test_incomplete_cache_is_listed_and_refused(built, cache_root):
    (built / "manifest.json").unlink()
    assert "incomplete" in rlkd("ls", "--cache-root", str(cache_root)).stdout
    assert "no manifest.json" in rlkd("inspect", str(built), code=1).stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "corrupt manifest"),
        ('{"format": "something-else"}', "not an rlkd cache manifest"),
        ('{"format": "rlkd-cache", "format_version": 99}', "format version 99 is not supported"),
    ],
)
def test_corrupt_or_foreign_manifest(built, tiny_teacher, text_data, cache_root, content, message):
    (built / "manifest.json").write_text(content)
    assert message in rlkd("inspect", str(built), code=1).stderr
    again = cache(tiny_teacher, text_data, cache_root, code=1)
    assert "manifest.json" in again.stderr and message in again.stderr


def test_user_errors_are_one_line(tiny_teacher, text_data, cache_root, tmp_path):
    base = ["cache", "--cache-root", str(cache_root), "--no-progress"]
    cases = [
        (["--model", str(tmp_path / "nowhere"), "--dataset", str(text_data)], "model not found"),
        (
            ["--model", str(tiny_teacher), "--dataset", str(tmp_path / "nope.jsonl")],
            "dataset not found",
        ),
        (
            ["--model", str(tiny_teacher), "--dataset", str(text_data), "--text-field", "body"],
            "field 'body' is missing in every row",
        ),
        (
            ["--model", str(tiny_teacher), "--dataset", str(text_data), "--top-k", "100000"],
            "--top-k 100000 must be between 1 and the teacher's vocabulary (384)",
        ),
    ]
    for args, message in cases:
        result = rlkd(*base, *args, code=1)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) >= 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = rlkd(
        "cache",
        "--cache-root",
        str(blocker / "sub"),
        "--model",
        str(tiny_teacher),
        "--dataset",
        str(text_data),
        code=1,
    )
    assert "cache root" in result.stderr and "not writable" in result.stderr


def test_strict_names_the_row_and_field(tiny_teacher, cache_root, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "good row"}\n{"text": ""}\n')
    result = cache(tiny_teacher, data, cache_root, "--strict", code=1)
    assert "row 1" in result.stderr and "'text'" in result.stderr


def test_config_file_and_flag_override(tiny_teacher, text_data, cache_root, tmp_path):
    config = tmp_path / "cache.yaml"
    config.write_text(f"model: {tiny_teacher}\ndataset: {text_data}\ntop_k: 3\nmax_length: 40\n")
    args = ["--config", str(config), "--top-k", "4", "--cache-root", str(cache_root)]
    path = last_line(rlkd("cache", *args, "--no-progress"))
    manifest = Cache(path).manifest
    assert manifest["k"] == 4 and manifest["config"]["max_length"] == 40
    config.write_text("top_kk: 3\n")
    assert "unknown key 'top_kk'" in rlkd("cache", "--config", str(config), code=1).stderr


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlkd_cli.main", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("rlkd: error: cache not found")
    assert "Traceback" not in proc.stderr
