"""`rlkd cache --ray`: teacher replicas on a real local Ray (started by the test, or by rlkd
on the fly, or a running cluster the test starts on loopback), the transformers backend on
the tiny teacher; each cache compared with the single-process one, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import (
    SAMPLE,
    assert_same_cache,
    descendants,
    fails,
    free_port,
    invoke,
    sample_cache_args,
    single_cache,
    start,
    wait_for_stopped,
)
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import Cache
from rlkd_cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

RAY = [str(Path(sys.executable).parent / "ray")]
"""The `ray` command of this interpreter."""


def cache_args(teacher: Path, root: Path | str, *more: str) -> list[str]:
    """`rlkd cache` of the sample's first 48 rows in 6 shards into `root`."""
    return sample_cache_args(teacher, root, *more, rows=48, shards=6)


@pytest.fixture(scope="module", autouse=True)
def no_ray_tokens() -> Iterator[None]:
    """Ray 2.5x's token auth keeps one token per user (~/.ray/auth_token), which any other Ray
    session of the user may replace under a running cluster, and this process's Ray keeps the
    mode of its first `ray.init`: throwaway test clusters on this host go without, all of
    them (the test process's, rlkd's and the one `ray start` runs)."""
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = before


@pytest.fixture(scope="module")
def single(tiny_teacher, tmp_path_factory) -> tuple[Path, dict]:
    """The cache made by one `rlkd cache` (one thread, as each replica), and its export."""
    root = tmp_path_factory.mktemp("single")
    return single_cache(cache_args(tiny_teacher, root), tmp_path_factory)


def test_two_replicas_on_a_ray_the_caller_started_make_the_single_cache(
    single, tiny_teacher, tmp_path
):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = CacheConfig(
            model=str(tiny_teacher),
            dataset=str(SAMPLE),
            split="train[:48]",
            top_k=8,
            num_shards_hint=6,
            cache_root=str(tmp_path / "root"),
            ray=True,
            replicas=2,
        )
        path = run_cache(cfg, progress=False)
        assert ray.is_initialized()  # the caller's Ray is the caller's to shut down
    finally:
        ray.shutdown()
    assert_same_cache(path, single, tmp_path)
    assert "ray" not in Cache(path).manifest["config"]


def test_a_killed_replica_has_its_shard_redone_on_a_ray_started_on_the_fly(
    single, tiny_teacher, tmp_path
):
    """The replica writing shard 2 stops itself right before the rename (the test hook); the
    test SIGKILLs it; Ray restarts it and runs shard 2 again (the new replica stops at the same
    point and is let go); the cache completes and equals the single-process one."""
    args = cache_args(tiny_teacher, tmp_path / "root", "--ray", "--replicas", "2")
    proc = start(args, tmp_path / "ray.log", fault="pause:before-rename:shard-00002.parquet")
    try:
        first = wait_for_stopped(proc.pid, proc)
        os.kill(first, signal.SIGKILL)
        second = wait_for_stopped(proc.pid, proc)
        assert second != first
        os.kill(second, signal.SIGCONT)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "ray.log").read_text()
    assert not [p for p in descendants(proc.pid)]  # rlkd's local Ray is gone with it
    assert_same_cache(out.splitlines()[-1], single, tmp_path)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """A running Ray cluster on this host (`ray start --head --block`, its own process group,
    torn down by its pid's group): its address and the pid of its head process. Ray turns
    127.0.0.1 into the host's own address and listens on it (it has no loopback-only mode);
    nothing but this host reaches it here."""
    port = free_port()
    folder = tmp_path_factory.mktemp("ray-cluster")
    log = folder / "ray.log"
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # its own folder, so no other ray.init on this host finds it; short: Ray's socket paths
    # under it must fit AF_UNIX's 107 bytes
    short = tempfile.mkdtemp(prefix="rlkd-ray-")
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                *RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                short,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield address, head.pid
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(short, ignore_errors=True)


def test_two_replicas_on_a_running_cluster_make_the_single_cache(
    single, tiny_teacher, tmp_path, ray_cluster
):
    address, _ = ray_cluster
    args = cache_args(tiny_teacher, tmp_path / "root", "--ray", "--replicas", "2")
    path = invoke(*args, "--ray-address", address)[-1]
    assert_same_cache(path, single, tmp_path)
    assert invoke(*args, "--ray-address", address)[-1] == path  # complete: found at once


def test_a_driver_killed_mid_run_resumes_keeping_complete_shards(
    single, tiny_teacher, tmp_path, ray_cluster
):
    """The replica stops itself before writing shard 3 (others written); the driver is
    SIGKILLed (its job's replica goes with it); rerunning the command keeps what was written."""
    address, head = ray_cluster
    args = cache_args(tiny_teacher, tmp_path / "root", "--ray", "--ray-address", address)
    proc = start(args, tmp_path / "driver.log", fault="pause:before-rename:shard-00003.parquet")
    try:
        wait_for_stopped(head, proc)
    finally:
        proc.kill()
        proc.wait()
    (plan,) = (tmp_path / "root").glob(f"*/{CacheDir.PLAN}")
    path = plan.parent
    done = sorted(CacheDir(path).complete_shards())
    assert done and 3 not in done and not CacheDir(path).is_complete()
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0 and rerun.stdout.splitlines()[-1] == str(path), rerun.stderr
    assert f"resuming: {len(done)} of 6 shards already complete" in rerun.stderr
    assert_same_cache(path, single, tmp_path)


def test_too_many_replicas_for_a_local_ray_is_one_line(tiny_teacher, tmp_path):
    line = fails(
        *cache_args(tiny_teacher, tmp_path, "--ray", "--replicas", "3", "--cpus-per-replica", "4")
    )
    assert "need 12 CPUs" in line and "lower --replicas" in line
