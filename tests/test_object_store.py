"""Caches on object storage: a real S3-compatible server on loopback (moto's server mode,
started by the `s3_server` fixture) with a real s3fs client; nothing of rlkd is mocked.

Cache to S3 and read it back (inspect, verify, ls, export, train) against the same cache made
locally; a run killed mid-write resumes; two writers at once; a flipped byte; `rlkd copy` there
and back, interrupted; manifest names that are paths; the lease lock; the local shard cache;
retries; clear errors for URLs without a filesystem or without conditional writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import (
    S3Server,
    exported,
    fails,
    invoke,
    sample_cache_args,
    shallow_copy,
    start,
)
from rlkd_cache.config import TrainConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import files, lease
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.manifest import digest
from rlkd_cache.store.reader import Cache
from rlkd_cache.store.shard_cache import ShardCache
from rlkd_cli.main import app


def cache_args(teacher: Path, root: str) -> list[str]:
    """`rlkd cache` of the sample's first 24 rows in 4 shards into `root`."""
    return sample_cache_args(teacher, root, rows=24, shards=4)


def key(url: str) -> str:
    return url.removeprefix("s3://")


@pytest.fixture(scope="module")
def made(s3_server: S3Server, tiny_teacher: Path, tmp_path_factory) -> SimpleNamespace:
    """The same cache made locally and on S3 (by `rlkd cache`), and its local export."""
    local_root = tmp_path_factory.mktemp("local-root")
    root = f"{s3_server.bucket()}/caches"
    local = Path(invoke(*cache_args(tiny_teacher, str(local_root)))[-1])
    remote = invoke(*cache_args(tiny_teacher, root))[-1]
    table = exported(local, tmp_path_factory.mktemp("export"))
    return SimpleNamespace(local=local, remote=remote, root=root, export=table)


def fresh_copy(made: SimpleNamespace, s3_server: S3Server) -> str:
    """A copy of the cache in a new bucket (by `rlkd copy`), for a test to damage."""
    return invoke("copy", str(made.local), f"{s3_server.bucket()}/caches", "--no-progress")[-1]


def test_a_cache_made_on_s3_has_the_local_cache_name_and_content(made, tmp_path):
    assert made.remote.startswith(made.root + "/")
    assert made.remote.rsplit("/", 1)[-1] == made.local.name
    remote, local = Cache(made.remote), Cache(made.local)
    assert [s.sha256 for s in remote.info.shards] == [s.sha256 for s in local.info.shards]
    assert len(remote.info.shards) == 4
    assert exported(made.remote, tmp_path) == made.export
    assert "storage_options" not in remote.manifest["config"]


def test_inspect_verify_ls_and_export_take_s3_urls(made, tmp_path):
    info = json.loads("\n".join(invoke("inspect", made.remote, "--json")))
    assert info["path"] == made.remote and info["rows"] == 24 and info["shards"] == 4
    assert invoke("verify", made.remote) == [f"OK {made.remote}"]
    (line,) = invoke("ls", "--cache-root", made.root)
    assert line.startswith(made.remote + "  ") and "rows=24" in line
    out = tmp_path / "cli-export.parquet"
    invoke("export", made.remote, str(out))
    assert pq.read_table(out).to_pydict() == made.export


@pytest.mark.slow
def test_training_from_s3_gives_the_weights_of_training_from_the_local_copy(
    made, s3_server, tiny_teacher, tmp_path
):
    student = shallow_copy(tiny_teacher, tmp_path / "student")
    from rlkd_cache.train.loop import train

    def trained(cache: str, name: str, **read) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(
            cache=cache,
            student=str(student),
            output=str(tmp_path / name),
            max_steps=3,
            batch_tokens=1024,
            lr=1e-3,
            rank_k=8,
            device="cpu",
            **read,
        )
        return load_file(str(train(cfg, progress=False) / "model.safetensors"))

    kept = tmp_path / "local-cache"
    endpoint = {"s3": {"endpoint_url": s3_server.env["AWS_ENDPOINT_URL"]}}
    local = trained(str(made.local), "from-local")
    read = {"local_cache": str(kept), "prefetch_shards": 3, "storage_options": endpoint}
    remote = trained(made.remote, "from-s3", **read)
    assert local.keys() == remote.keys()
    for name in local:
        assert torch.equal(local[name], remote[name]), name
    shas = {s.sha256 for s in Cache(made.remote).info.shards}
    assert {p.stem for p in kept.glob("*.parquet")} == shas
    saved = json.loads((tmp_path / "from-s3" / "config.json").read_text())
    assert saved["cache"] == made.remote and "storage_options" not in saved
    assert "endpoint_url" not in (tmp_path / "from-s3" / "config.json").read_text()

    from rlkd_cache.config import EvalConfig
    from rlkd_cache.eval.run import run_eval

    run = tmp_path / "from-local" / "final"
    on_local = run_eval(run, made.local, EvalConfig(device="cpu"))
    on_s3 = run_eval(run, made.remote, EvalConfig(device="cpu", storage_options=endpoint))
    assert on_s3.pop("cache") == made.remote and on_local.pop("cache") == str(made.local)
    assert on_s3 == on_local


@pytest.mark.slow
def test_the_local_cache_serves_a_second_reader_without_the_store(made, s3_server, tmp_path):
    url = fresh_copy(made, s3_server)
    kept = ShardCache(tmp_path / "kept", max_bytes=1 << 30)
    first = [b.topk_ids.copy() for b in Cache(url, local_cache=kept).blocks()]
    for name in CacheDir(url).complete_shards().values():  # the store loses every shard
        s3_server.fs.rm_file(f"{key(url)}/{name}")
    second = [b.topk_ids for b in Cache(url, local_cache=kept).blocks()]
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    with pytest.raises(RlkdError, match="shard listed in the manifest is missing"):
        Cache(url).read_shard(0)


@pytest.mark.slow
def test_a_run_killed_while_writing_to_s3_resumes_to_the_same_cache(
    made, s3_server, tiny_teacher, tmp_path
):
    root = f"{s3_server.bucket()}/caches"
    args = cache_args(tiny_teacher, root)
    killed = start(args, tmp_path / "killed.log", fault="before-rename:shard-00002.parquet")
    assert killed.wait(timeout=300) == -signal.SIGKILL
    url = f"{root}/{made.local.name}"
    left = CacheDir(url)
    assert not left.is_complete() and sorted(left.complete_shards()) == [0, 1]
    fs = s3_server.fs
    bucket, prefix = key(url).split("/", 1)
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/shard-00003.parquet")
    rerun = start(args, tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
    assert rerun.stdout.read().strip() == url
    log = (tmp_path / "rerun.log").read_text()
    assert "breaking the stale lock" in log and "2 of 4 shards already complete" in log
    assert not [u for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith(prefix)]
    assert exported(url, tmp_path) == made.export
    assert invoke("verify", url) == [f"OK {url}"]


@pytest.mark.slow
def test_two_writers_of_one_s3_cache_make_one_sound_cache(made, s3_server, tiny_teacher, tmp_path):
    root = f"{s3_server.bucket()}/caches"
    args = cache_args(tiny_teacher, root)
    runs = [start(args, tmp_path / f"writer-{i}.log") for i in range(2)]
    for i, run in enumerate(runs):
        assert run.wait(timeout=600) == 0, (tmp_path / f"writer-{i}.log").read_text()
    url = f"{root}/{made.local.name}"
    assert {run.stdout.read().strip() for run in runs} == {url}
    logs = [(tmp_path / f"writer-{i}.log").read_text() for i in range(2)]
    assert sum("cached 24 rows" in log for log in logs) == 1  # one scored, one found it done
    assert sum("already cached" in log for log in logs) == 1
    cache = Cache(url)
    for entry in cache.info.shards:  # the manifest says what the store holds
        data = s3_server.fs.cat_file(f"{key(url)}/{entry.name}")
        assert hashlib.sha256(data).hexdigest() == entry.sha256
    assert invoke("verify", url) == [f"OK {url}"]
    assert exported(url, tmp_path) == made.export


def test_a_flipped_byte_in_an_s3_shard_is_named_by_verify_and_refused_by_training(
    made, s3_server, tiny_teacher, tmp_path
):
    url = fresh_copy(made, s3_server)
    shard = f"{key(url)}/shard-00001.parquet"
    data = bytearray(s3_server.fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    s3_server.fs.pipe_file(shard, bytes(data))
    result = CliRunner().invoke(app, ["verify", url])
    assert result.exit_code == 1
    assert f"BAD {url}/shard-00001.parquet: sha256 differs from the manifest" in result.stderr
    student = shallow_copy(tiny_teacher, tmp_path / "student")
    line = fails(
        "train",
        "--cache",
        url,
        "--student",
        str(student),
        "--output",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--rank-k",
        "8",
        "--no-progress",
    )
    assert f"{url}/shard-00001.parquet: checksum mismatch" in line


@pytest.mark.slow
def test_copy_local_to_s3_and_back_resumes_after_a_kill(made, s3_server, tmp_path):
    root = f"{s3_server.bucket()}/caches"
    args = ["copy", str(made.local), root, "--no-progress"]
    killed = start(args, tmp_path / "killed.log", fault="after-rename:shard-00001.parquet")
    assert killed.wait(timeout=300) == -signal.SIGKILL
    url = f"{root}/{made.local.name}"
    assert not CacheDir(url).is_complete()
    rerun = start(args, tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
    assert rerun.stdout.read().strip() == url
    there = re.search(
        r"\((\d) of 4 files were there already\)", (tmp_path / "rerun.log").read_text()
    )
    assert there and int(there.group(1)) >= 1  # shard 1 at least (8 PUTs run at once)
    back = Path(invoke("copy", url, str(tmp_path / "back"), "--no-progress")[-1])
    assert back == tmp_path / "back" / made.local.name
    assert (back / "manifest.json").read_bytes() == (made.local / "manifest.json").read_bytes()
    assert invoke("verify", str(back)) == [f"OK {back}"]
    assert exported(back, tmp_path) == made.export
    assert invoke("copy", url, str(tmp_path / "back"), "--no-progress")[-1] == str(back)


def test_copy_refuses_a_destination_with_another_manifest(made, s3_server):
    url = fresh_copy(made, s3_server)
    document = Cache(url).manifest
    document["created"] = "another time"
    document["digest"] = digest(document)
    s3_server.fs.pipe_file(f"{key(url)}/manifest.json", json.dumps(document).encode())
    line = fails("copy", str(made.local), url.rsplit("/", 1)[0], "--no-progress")
    assert "already holds another manifest" in line


def test_a_manifest_naming_a_path_is_refused_before_any_read(made, s3_server):
    url = fresh_copy(made, s3_server)
    s3_server.fs.pipe_file(f"{key(url).rsplit('/', 1)[0]}/evil.parquet", b"not yours")
    document = Cache(url).manifest
    document["shards"][0]["name"] = "../evil.parquet"
    document["digest"] = digest(document)
    s3_server.fs.pipe_file(f"{key(url)}/manifest.json", json.dumps(document).encode())
    line = fails("verify", url)
    assert "shard name '../evil.parquet' is not a shard file name" in line
    assert "is not a shard file name" in fails("copy", url, str(Path("/tmp") / "never"))


def test_a_url_without_an_installed_filesystem_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where rlkd[gcs] is not installed
    assert "pip install 'rlkd[gcs]'" in fails("inspect", "gs://bucket/caches/x")
    assert "not a URL fsspec knows" in fails("inspect", "nosuchfs://bucket/x")


def test_a_cache_root_in_a_missing_bucket_is_one_line(s3_server, tiny_teacher):
    line = fails(*cache_args(tiny_teacher, "s3://no-such-bucket-rlkd/caches"))
    assert "cache root s3://no-such-bucket-rlkd/caches is not writable" in line


def test_writing_to_a_store_without_conditional_writes_is_refused(tiny_teacher, tmp_path):
    line = fails(*cache_args(tiny_teacher, "memory://rlkd-test/caches"))
    assert "only to stores with conditional writes" in line


def test_storage_options_reach_the_filesystem_and_are_never_saved(made, s3_server, monkeypatch):
    monkeypatch.setattr(files, "BACKOFF_S", 0.01)
    unknown = json.dumps({"s3": {"no_such_option": 1}})
    assert "not accepted" in fails("inspect", made.remote, "--storage-options", unknown)
    retries = {"retries": {"max_attempts": 1}}
    nowhere = {"s3": {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": retries}}
    line = fails("inspect", made.remote, "--storage-options", json.dumps(nowhere))
    assert "127.0.0.1:9" in line and f"{files.RETRIES} tries" in line
    good = json.dumps({"s3": {"endpoint_url": s3_server.env["AWS_ENDPOINT_URL"]}})
    assert invoke("verify", made.remote, "--storage-options", good) == [f"OK {made.remote}"]


HOLD = """
import sys, time, s3fs
from rlkd_cache.store import lease
fs = s3fs.S3FileSystem(use_listings_cache=False)
with lease.hold(fs, sys.argv[1], wait_s=0):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_process_waits_for_the_lease_and_takes_it_when_the_holder_dies(s3_server, caplog):
    lock = f"{key(s3_server.bucket())}/cache/.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        taken = f"being written by another rlkd run, pid {holder.pid}"
        with pytest.raises(RlkdError, match=taken), lease.hold(s3_server.fs, lock, wait_s=1):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.INFO, logger="rlkd.lock"), lease.hold(s3_server.fs, lock, 0):
        assert f"breaking the stale lock of pid {holder.pid}" in caplog.text
    record = json.loads(s3_server.fs.cat_file(lock))
    assert record == {"released": True}
    with lease.hold(s3_server.fs, lock, wait_s=0):  # a released lock is free at once
        pass


def test_a_lease_not_renewed_for_its_length_is_taken_over(s3_server):
    lock = f"{key(s3_server.bucket())}/cache/.lock"
    foreign = {"host": "another-machine", "pid": 1, "since": "then", "lease_s": 1.0, "beat": 0}
    s3_server.fs.pipe_file(lock, json.dumps(foreign).encode())
    started = time.monotonic()
    with lease.hold(s3_server.fs, lock, wait_s=30):
        assert time.monotonic() - started >= 1.0
        assert json.loads(s3_server.fs.cat_file(lock))["pid"] == os.getpid()


def test_a_writer_whose_lease_was_taken_stops_before_its_next_write(s3_server):
    bucket = s3_server.bucket()
    layout = CacheDir(f"{bucket}/cache")
    with lease.hold(s3_server.fs, f"{key(bucket)}/cache/.lock", wait_s=0, lease_s=0.4):
        s3_server.fs.pipe_file(f"{key(bucket)}/cache/.lock", b'{"host": "thief", "pid": 2}')
        time.sleep(0.6)  # the next renewal finds another version
        with pytest.raises(RlkdError, match="another process took over the cache"):
            layout.write_plan({"fingerprint": "fp"})
    assert not layout.has(CacheDir.PLAN)


def test_shards_are_written_only_if_absent_and_a_present_one_is_adopted(made, s3_server):
    url = fresh_copy(made, s3_server)
    layout = CacheDir(url)
    with pytest.raises(FileExistsError), layout.writing("shard-00000.parquet", create=True) as tmp:
        tmp.write_bytes(b"another writer's bytes")
    assert layout.sha256("shard-00000.parquet") == Cache(url).info.shards[0].sha256


def test_the_local_shard_cache_is_bounded_and_drops_damaged_copies(tmp_path):
    kept = ShardCache(tmp_path, max_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(3)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    for sha, blob in zip(shas, blobs, strict=True):
        kept.put(sha, blob)
        time.sleep(0.01)
    assert kept.get(shas[0]) is None and kept.get(shas[2]) == blobs[2]
    (tmp_path / f"{shas[2]}.parquet").write_bytes(b"\x00" * 100)
    assert kept.get(shas[2]) is None and not (tmp_path / f"{shas[2]}.parquet").exists()
    with pytest.raises(ValueError, match="not a sha256"):
        kept.get("../escape")


def test_transient_read_errors_are_retried_and_a_missing_object_is_not(monkeypatch, caplog):
    monkeypatch.setattr(files, "BACKOFF_S", 0.01)
    folder = files.folder("s3://bucket/x")
    calls = []

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    with caplog.at_level(logging.WARNING, logger="rlkd.store"):
        assert folder._retrying(flaky) == b"ok"
    assert len(calls) == 3 and caplog.text.count("retrying") == 2

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("bucket/x/shard")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        folder._retrying(missing)
    assert len(calls) == 1

    def down() -> bytes:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(RlkdError, match=f"ConnectionRefusedError.*{files.RETRIES} tries"):
        folder._retrying(down)


def stopped(pid: int) -> bool:
    """True once process `pid` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow
def test_a_writer_paused_past_its_lease_cannot_make_the_manifest_lie(
    made, s3_server, tiny_teacher, tmp_path, monkeypatch
):
    """Writer A stops (SIGSTOP, every thread: no renewals) right before the PUT of shard 2;
    B takes the stale lease over and completes the cache; A continues: its PUT of shard 2 is
    refused (the object exists), and it stops at its next write or keeps B's manifest."""
    monkeypatch.setenv("RLKD_LOCK_LEASE", "2")
    root = f"{s3_server.bucket()}/caches"
    args = cache_args(tiny_teacher, root)
    a = start(args, tmp_path / "a.log", fault="pause:before-rename:shard-00002.parquet")
    deadline = time.monotonic() + 300
    while not stopped(a.pid):
        assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
        time.sleep(0.1)
    url = f"{root}/{made.local.name}"
    try:
        b = start(args, tmp_path / "b.log")
        assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()
    finally:
        a.send_signal(signal.SIGCONT)
    b_log = (tmp_path / "b.log").read_text()
    assert f"breaking the stale lock of pid {a.pid}" in b_log
    assert "2 of 4 shards already complete" in b_log
    a_code = a.wait(timeout=300)
    a_log = (tmp_path / "a.log").read_text()
    assert a_code == 0 or (a_code == 1 and "another process took over the cache" in a_log), a_log
    cache = Cache(url)
    for entry in cache.info.shards:
        data = s3_server.fs.cat_file(f"{key(url)}/{entry.name}")
        assert hashlib.sha256(data).hexdigest() == entry.sha256
    assert invoke("verify", url) == [f"OK {url}"]
    assert exported(url, tmp_path) == made.export


def test_a_shard_another_writer_put_first_is_adopted_if_it_holds_the_same_rows(tmp_path, made):
    from rlkd_cache.store.writer import write_shard

    theirs = Cache(made.local)
    block = theirs.read_shard(1)
    layout = CacheDir(tmp_path / "cache")
    layout.create()
    (tmp_path / "cache" / "shard-00001.parquet").write_bytes(theirs.shard_bytes(1))
    entry = write_shard(layout, 1, block, theirs.info.logprob_step, level=3)  # level: other bytes
    assert entry.sha256 == theirs.info.shards[1].sha256 == layout.sha256("shard-00001.parquet")
    assert layout.read_record(1)["sha256"] == entry.sha256
    other = theirs.read_shard(0)
    with pytest.raises(RlkdError, match="written meanwhile by another run with other rows"):
        write_shard(layout, 1, other, theirs.info.logprob_step)
