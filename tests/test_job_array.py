"""One cache from many processes: the streaming shard plan, job-array workers
(`--num-workers N --worker-index I`) and `--finalize`, run as a user runs them (the CLI, in
this process or as concurrent processes), each compared with the single-process cache.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    SAMPLE,
    assert_same_cache,
    fails,
    invoke,
    sample_cache_args,
    single_cache,
    start,
)
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Preparation, load_rows, prepare
from rlkd_cache.plan import ShardPlan
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import Cache

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_args(teacher: Path, root: Path | str, *more: str) -> list[str]:
    """`rlkd cache` of the sample's first 30 rows in 6 shards into `root`."""
    return sample_cache_args(teacher, root, *more, rows=30, shards=6)


def worker(i: int, n: int) -> list[str]:
    return ["--num-workers", str(n), "--worker-index", str(i)]


@pytest.fixture(scope="module")
def single(tiny_teacher, tmp_path_factory) -> tuple[Path, dict]:
    """The cache made by one `rlkd cache`, and its export."""
    root = tmp_path_factory.mktemp("single")
    return single_cache(cache_args(tiny_teacher, root), tmp_path_factory)


class Counted(dict):
    """A dataset row that counts how many rows are alive at once."""

    alive = 0
    most = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Counted.alive += 1
        Counted.most = max(Counted.most, Counted.alive)

    def __del__(self):
        Counted.alive -= 1


def test_planning_streams_and_never_holds_more_than_a_row(tiny_tokenizer):
    cfg = CacheConfig(num_shards_hint=7)
    rows = load_rows(str(SAMPLE), "train")
    how = Preparation.of(list(rows.column_names), tiny_tokenizer, cfg)
    Counted.alive = Counted.most = 0
    plan = ShardPlan.new((Counted(r) for r in rows), how, tiny_tokenizer, cfg)
    assert len(rows) > 300 and Counted.most <= 2, Counted.most
    assert sum(s.rows for s in plan.shards) == len(prepare(rows, tiny_tokenizer, cfg).sequences)


@pytest.mark.parametrize("hint", [None, 1, 5, 13])
def test_the_plan_is_the_in_memory_split_and_covers_every_row(tiny_tokenizer, hint):
    """The streaming plan makes the shards the in-memory rule makes (contiguous runs of about
    total/hint positions), with skipped rows counted and every dataset row in one shard."""
    cfg = CacheConfig(num_shards_hint=hint, max_length=40, positions="response")
    rows = load_rows(str(SAMPLE), "train[:200]")
    prepared = prepare(rows, tiny_tokenizer, cfg)
    how = Preparation.of(list(rows.column_names), tiny_tokenizer, cfg)
    plan = ShardPlan.new(rows, how, tiny_tokenizer, cfg)
    counts = np.array([len(s.positions) for s in prepared.sequences])
    per = math.ceil(counts.sum() / hint) if hint else 262_144
    expected = list(Counter((np.cumsum(counts) - counts) // per).values())
    assert plan.shard_rows == expected
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == len(rows)
    assert all(a.stop == b.start for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    assert plan.skipped == dict(prepared.skipped) and plan.truncated == prepared.truncated
    seqs = [
        s
        for i in range(len(plan))
        for s in plan.sequences(
            i,
            rows.select(range(plan.shards[i].start, plan.shards[i].stop)),
            how,
            tiny_tokenizer,
            cfg,
        )
    ]
    assert [s.seq_id for s in seqs] == [s.seq_id for s in prepared.sequences]
    assert all(
        np.array_equal(a.input_ids, b.input_ids)
        for a, b in zip(seqs, prepared.sequences, strict=True)
    )


def test_three_workers_one_after_another_then_finalize_make_the_single_cache(
    single, tiny_teacher, tmp_path
):
    root = tmp_path / "root"
    paths = {invoke(*cache_args(tiny_teacher, root, *worker(i, 3)))[-1] for i in range(3)}
    (path,) = paths
    layout = CacheDir(path)
    assert not layout.is_complete() and len(layout.complete_shards()) == 6
    assert invoke(*cache_args(tiny_teacher, root, "--finalize"))[-1] == path
    assert_same_cache(path, single, tmp_path)
    again = invoke(*cache_args(tiny_teacher, root, *worker(1, 3)))  # complete: nothing to do
    assert again[-1] == path


def test_a_worker_beyond_the_shards_has_nothing_to_do(tiny_teacher, tmp_path):
    path = invoke(*cache_args(tiny_teacher, tmp_path, *worker(6, 7)))[-1]  # 6 shards: 0-5
    assert CacheDir(path).complete_shards() == {} and CacheDir(path).read_plan() is not None


def test_two_workers_at_once_then_finalize_make_the_single_cache(
    single, tiny_teacher, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the threads of `single`: same fp32 sums
    root = tmp_path / "root"
    procs = [
        start(cache_args(tiny_teacher, root, *worker(i, 2)), tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [
        (tmp_path / f"w{i}.log").read_text() for i in range(2)
    ]
    (path,) = {out.splitlines()[-1] for out in outs}
    assert "run the same command with --finalize" in (tmp_path / "w0.log").read_text()
    assert invoke(*cache_args(tiny_teacher, root, "--finalize"))[-1] == path
    assert_same_cache(path, single, tmp_path)


def test_finalize_names_each_missing_or_bad_shard_and_its_worker(single, tiny_teacher, tmp_path):
    root = tmp_path / "root"
    line = fails(*cache_args(tiny_teacher, root, "--finalize"))
    assert "no shard plan" in line and "--worker-index" in line
    for i in (0, 2):  # worker 1 of 3 never ran
        path = invoke(*cache_args(tiny_teacher, root, *worker(i, 3)))[-1]
    shard = Path(path) / CacheDir.shard_name(3)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = failure(*cache_args(tiny_teacher, root, "--finalize", "--num-workers", "3"))
    assert "3 of 6 planned shards are missing or bad" in result
    assert "shard-00001.parquet: missing (owned by worker 1 of 3)" in result
    assert "shard-00004.parquet: missing (owned by worker 1 of 3)" in result
    assert "shard-00003.parquet: its sha256 differs" in result and "worker 0 of 3" in result
    assert not CacheDir(path).is_complete()
    invoke(*cache_args(tiny_teacher, root, *worker(1, 3)))  # the fix the message asks for
    invoke(*cache_args(tiny_teacher, root, *worker(0, 3)))
    invoke(*cache_args(tiny_teacher, root, "--finalize"))
    assert_same_cache(path, single, tmp_path)


def failure(*args: str) -> str:
    """Run `rlkd ARGS`; assert it failed as promised (exit 1, no traceback, one error that
    may list lines under it); its stderr."""
    from click.testing import CliRunner

    from rlkd_cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("rlkd: error: ") == 1, result.stderr
    return result.stderr


def test_a_killed_worker_resumes_and_its_peer_is_untouched(
    single, tiny_teacher, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "root"
    args = cache_args(tiny_teacher, root, *worker(0, 2))
    proc = start(args, tmp_path / "killed.log", fault="before-rename:shard-00002.parquet")
    proc.communicate(timeout=600)
    assert proc.returncode == -9
    path = invoke(*cache_args(tiny_teacher, root, *worker(1, 2)))[-1]
    assert sorted(CacheDir(path).complete_shards()) == [0, 1, 3, 5]
    invoke(*args)
    invoke(*cache_args(tiny_teacher, root, "--finalize"))
    assert_same_cache(path, single, tmp_path)
    assert not list(Path(path).glob(".*.tmp"))


def test_a_saved_plan_is_what_every_worker_uses(single, tiny_teacher, tmp_path):
    root = tmp_path / "root"
    path = Path(invoke(*cache_args(tiny_teacher, root, *worker(0, 2)))[-1])
    plan = json.loads((path / CacheDir.PLAN).read_text())
    assert len(plan["shards"]) == 6 and plan["fingerprint"] == Cache(single[0]).info.fingerprint
    assert sum(s["rows"] for s in plan["shards"]) == 30


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--num-workers", "3", "--worker-index", "3"],
            "--worker-index must be in [0, --num-workers 3)",
        ),
        (["--worker-index", "0", "--finalize"], "--finalize must be given without --worker-index"),
        (["--ray", "--finalize"], "--ray must be given without --worker-index and --finalize"),
        (["--num-workers", "0"], "--num-workers must be >= 1"),
        (["--replicas", "0", "--ray"], "--replicas must be >= 1"),
        (
            ["--responses", "teacher", "--num-workers", "2", "--worker-index", "1"],
            "--responses teacher runs in one process",
        ),
    ],
)
def test_bad_spreading_flags_are_one_line(tiny_teacher, tmp_path, flags, expected):
    assert expected in fails(*cache_args(tiny_teacher, tmp_path, *flags))


def test_workers_and_finalize_on_s3_make_the_single_cache(
    single, tiny_teacher, tmp_path, s3_server
):
    """The same on an object store (a real S3 server on loopback): each worker holds its own
    lease, finalize the cache's."""
    root = f"{s3_server.bucket()}/caches"
    for i in (1, 0):
        path = invoke(*cache_args(tiny_teacher, root, *worker(i, 2)))[-1]
    assert not CacheDir(path).is_complete() and len(CacheDir(path).complete_shards()) == 6
    assert invoke(*cache_args(tiny_teacher, root, "--finalize"))[-1] == path
    assert_same_cache(path, single, tmp_path)
