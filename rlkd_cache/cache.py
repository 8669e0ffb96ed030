"""`rlkd cache`: run a teacher over a dataset into a content-addressed, resumable cache.

Resolve the teacher (default: the embedded SmolLM2), load and fingerprint the data, and name
the cache directory by the fingerprint (`open_job`); an existing complete cache is returned
at once. Otherwise, holding the directory's lock (`store/lock.py`: a second run on the same
cache waits for the first, then finds it complete), plan the shards in one streaming pass
(`plan.py`; the plan is saved so a resumed run splits the same way), skip shards a killed run
completed, score the rest in token-budget batches (`ShardScorer`, one shard's rows in memory
at a time), and write the manifest last (`finish`).

The same cache, spread over processes: `--num-workers N --worker-index I` scores only worker
I's shards of the saved plan (under that worker's own lock) and `--finalize` checks them all
and writes the manifest (`finalize`); `--ray` scores the shards on Ray replicas
(`ray_cache.py`) while this process plans, shows progress and writes the manifest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache.config import CacheConfig, saved, validated
from rlkd_cache.data import Preparation, Sequence, dataset_identity, load_rows, rows_between
from rlkd_cache.default_teacher import default_teacher
from rlkd_cache.errors import RlkdError
from rlkd_cache.plan import PlannedShard, ShardPlan, load_plan
from rlkd_cache.responses import with_teacher_responses
from rlkd_cache.store import FORMAT_VERSION, codec
from rlkd_cache.store.files import Files, folder, is_remote
from rlkd_cache.store.fingerprint import (
    fingerprint,
    folder_sha256,
    slug,
    tokenizer_sha256,
    vocab_sha256,
)
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.manifest import (
    BackendInfo,
    Manifest,
    ResponsesInfo,
    ShardEntry,
    TeacherInfo,
    TokenizerInfo,
)
from rlkd_cache.store.reader import Cache, decode_bytes
from rlkd_cache.store.writer import CacheWriter, recorded
from rlkd_cache.teacher import TeacherBackend, TeacherOutput
from rlkd_cache.teacher.select import (
    backend_version,
    make_backend,
    resolve_backend,
    teacher_vocab_size,
)
from rlkd_cache.train.batching import plan_window

log = logging.getLogger("rlkd.cache")


def check_writable(root: Files) -> None:
    """Fail with one line naming the cache root unless a file can be written there."""
    probe = f".rlkd-probe-{uuid.uuid4().hex}"
    try:
        root.makedirs()
        with root.writing(probe) as tmp:
            tmp.write_bytes(b"")
        root.remove(probe)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        raise RlkdError(f"cache root {root.url} is not writable ({why})") from None


def local_home(cfg: CacheConfig) -> Path:
    """The local folder for the converted default teacher and the teacher-hash memo: the
    cache root, or ~/.cache/rlkd when the root is on an object store."""
    if is_remote(cfg.cache_root):
        return Path.home() / ".cache" / "rlkd"
    return Path(cfg.cache_root).expanduser()


def resolve_model(cfg: CacheConfig) -> Path:
    """The teacher's local folder (with `--backend server`, its tokenizer's)."""
    if cfg.model is None:
        return default_teacher(local_home(cfg))
    path = Path(cfg.model).expanduser()
    if cfg.backend == "server":
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise RlkdError(
                f"tokenizer not found: {cfg.model} (with --backend server, --model is a local "
                "folder with the served model's tokenizer.json or tokenizer_config.json)"
            )
        return path
    if not (path / "config.json").is_file():
        raise RlkdError(
            f"model not found: {cfg.model} (expected a local Hugging Face model folder "
            "with config.json)"
        )
    return path


def cache_identity(
    cfg: CacheConfig, teacher_sha: str, tokenizer: Any, data_id: dict[str, str], backend: str
) -> dict[str, Any]:
    """Everything that changes the cache's content: what its fingerprint hashes."""
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher_sha256": teacher_sha,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "dataset_sha256": data_id["content_sha256"],
        "split": cfg.split,
        "fields": [
            cfg.text_field,
            cfg.prompt_field,
            cfg.response_field,
            cfg.messages_field,
            cfg.id_field,
        ],
        "template": cfg.template,
        "positions": cfg.positions,
        "max_length": cfg.max_length,
        "top_k": cfg.top_k,
        "logprob_step": cfg.logprob_step,
        "backend": backend,
        "dtype": None if backend == "server" else cfg.dtype,  # a server's is its own
        "responses": cfg.responses,
    }
    if backend == "vllm" and cfg.vllm_engine_kwargs:
        identity["vllm_engine_kwargs"] = cfg.vllm_engine_kwargs  # may change numerics
    if cfg.responses == "teacher":
        identity["generation"] = {
            "max_new_tokens": cfg.gen_max_new_tokens,
            "temperature": cfg.gen_temperature,
            "top_p": cfg.gen_top_p,
            "seed": cfg.gen_seed,
        }
    return identity


@dataclass(frozen=True)
class CacheJob:
    """One cache to build, identified: what every process that writes it (a run, a job-array
    worker, a Ray replica, `--finalize`) computes the same way from the same inputs."""

    cfg: CacheConfig
    model: Path
    vocab_size: int
    backend: str
    why: str
    """Why this backend (`teacher/select.py`)."""
    data_id: dict[str, str]
    teacher_sha: str
    identity: dict[str, Any]
    fingerprint: str
    cache_dir: str
    """The cache directory: a local path or a URL (with `cfg.storage_options`)."""
    teacher_name: str
    probe: dict[str, Any] | None = None
    """A served teacher's behavioural probe (`teacher/server.py`): this run's answer, then,
    once `same_teacher` checked it, the one saved with the cache."""

    @property
    def layout(self) -> CacheDir:
        return CacheDir(self.cache_dir, self.cfg.storage_options)


def open_job(cfg: CacheConfig) -> tuple[CacheJob, Any, Any]:
    """The job `cfg` describes, with the teacher's tokenizer and the dataset's rows (a
    memory-mapped `datasets.Dataset`)."""
    from transformers import AutoTokenizer

    root = folder(cfg.cache_root, cfg.storage_options)
    check_writable(root)
    model = resolve_model(cfg)
    vocab_size = teacher_vocab_size(cfg, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = load_rows(cfg.dataset, cfg.split)
    backend, why = resolve_backend(cfg)
    data_id = dataset_identity(cfg.dataset, cfg.split, rows)
    probe = None
    if backend == "server":  # no weights here: what the servers say they are, and the probe
        served = make_backend(backend, model, cfg).served(tokenizer, cfg.top_k)  # type: ignore[attr-defined]
        cfg = replace(cfg, server_model=served.model)  # replicas and workers ask no more
        teacher = {"model": served.model, "max_model_len": served.max_model_len}
        teacher_sha = fingerprint(teacher)
        teacher_name, probe = served.model, served.probe
    else:
        home = local_home(cfg)
        home.mkdir(parents=True, exist_ok=True)
        teacher_sha = folder_sha256(model, home / ".hash-memo.json")
        teacher, teacher_name = None, model.name
    identity = cache_identity(cfg, teacher_sha, tokenizer, data_id, backend)
    if teacher is not None:
        identity["served_teacher"] = teacher
    fp = fingerprint(identity)
    name = f"{slug(teacher_name)}-{slug(data_id['source'])}-k{cfg.top_k}-{fp[:16]}"
    job = CacheJob(
        cfg,
        model,
        vocab_size,
        backend,
        why,
        data_id,
        teacher_sha,
        identity,
        fp,
        str(CacheDir(root.child(name)).path),
        teacher_name,
        probe,
    )
    return job, tokenizer, rows


def same_teacher(job: CacheJob, saved: dict[str, Any] | None = None) -> CacheJob:
    """For a served teacher: check this run's probe against the one saved with the cache
    (`saved`, else the cache's probe file, which the first run to get here writes) and
    return the job with the saved probe; refuse, naming the difference, if the model behind
    the URL changed. Other backends are identified by their weights' hash: `job` as is."""
    from rlkd_cache.teacher.server import probe_difference

    if job.probe is None:
        return job
    layout = job.layout
    if saved is None:
        saved = layout.read_probe()
    if saved is None:
        try:
            layout.write_probe(job.probe, create=True)
            return job
        except FileExistsError:  # a worker that started at the same moment wrote it
            saved = layout.read_probe()
    why = probe_difference(saved, job.probe)
    if why is not None:
        raise RlkdError(
            f"{layout}: the teacher behind --server-url is not the one this cache was made "
            f"with: {why}. The model behind the URL changed; shards of two teachers are never "
            "mixed: serve the first model again, or cache the new one under another --cache-root"
        )
    return replace(job, probe=saved)


class ShardScorer:
    """Scores planned shards: tokenizes a shard's rows again (`ShardPlan.sequences`) and runs
    the teacher over them in token-budget batches (`plan_window`). The one scoring path of a
    run, a job-array worker and a Ray replica; the teacher is loaded on first use."""

    def __init__(
        self,
        job: CacheJob,
        plan: ShardPlan,
        tokenizer: Any,
        rows: Any,
        backend: TeacherBackend | None = None,
    ):
        self.job, self.plan, self.tokenizer, self.rows = job, plan, tokenizer, rows
        self.how = Preparation.of(list(rows.column_names), tokenizer, job.cfg)
        self._backend = backend

    @property
    def backend(self) -> TeacherBackend:
        if self._backend is None:
            self._backend = make_backend(self.job.backend, self.job.model, self.job.cfg)
        return self._backend

    def block(self, index: int, done: Callable[[int, int], None] | None = None) -> codec.Block:
        """Shard `index`, scored; `done(sequences, tokens)` is told of every batch."""
        shard = self.plan.shards[index]
        cfg = self.job.cfg
        rows = rows_between(self.rows, shard.start, shard.stop)
        seqs = self.plan.sequences(index, rows, self.how, self.tokenizer, cfg)
        if getattr(self.backend, "streams", False):  # a served teacher: all in flight at once
            return to_block(seqs, self.backend.score(seqs, cfg.top_k, done))  # type: ignore[call-arg]
        lengths = np.array([len(s.input_ids) for s in seqs])
        outputs: list[TeacherOutput | None] = [None] * len(seqs)
        for batch in plan_window(lengths, cfg.batch_tokens):
            scored = self.backend.score([seqs[j] for j in batch], cfg.top_k)
            for j, out in zip(batch, scored, strict=True):
                outputs[j] = out
            if done:
                done(len(batch), int(lengths[batch].sum()))
        return to_block(seqs, outputs)  # type: ignore[arg-type]


def to_block(seqs: list[Sequence], outs: list[TeacherOutput]) -> codec.Block:
    """The block of `seqs`, with the teacher's output for each."""
    return codec.Block.from_sequences(
        [s.seq_id for s in seqs],
        [s.input_ids for s in seqs],
        [s.positions for s in seqs],
        [o.topk_ids for o in outs],
        [o.topk_logprobs for o in outs],
        [o.target_logprobs for o in outs],
    )


def run_cache(cfg: CacheConfig, progress: bool = True) -> Path | str:
    """Build (or find) the cache for `cfg`, or this worker's part of it, or finalize it;
    return its directory (a URL on an object store)."""
    started = time.time()
    validated(cfg)  # built by the CLI or a recipe, it was checked there; in code, here
    if cfg.responses == "teacher" and (cfg.ray or cfg.worker_index is not None or cfg.finalize):
        raise RlkdError(
            "--responses teacher runs in one process: the teacher writes every response "
            "before any shard is planned; run it without --ray, --worker-index and --finalize"
        )
    job, tokenizer, rows = open_job(cfg)
    cfg, layout = job.cfg, job.layout
    if layout.is_complete():
        return _already_cached(job)
    if cfg.finalize:
        return finalize(job, tokenizer)
    layout.create()
    worker = None if cfg.worker_index is None else (cfg.worker_index, cfg.num_workers)
    with layout.locked(cfg.lock_wait, worker):  # one writer per cache (per worker's shards)
        if layout.is_complete():  # the run that held the lock completed it meanwhile
            return _already_cached(job)
        if worker is None:
            layout.check_no_workers()  # a whole-cache run deletes every temp file
        job = same_teacher(job)
        log.info("teacher %s, backend %s (%s)", job.model, job.backend, job.why)
        backend = None
        if cfg.responses == "teacher":
            backend = make_backend(job.backend, job.model, cfg)
            rows = with_teacher_responses(rows, tokenizer, cfg, layout, backend, progress)
            if cfg.prompt_field and not cfg.response_field and not cfg.messages_field:
                cfg = replace(cfg, response_field="response")
                job = replace(job, cfg=cfg)
        plan = planned(job, tokenizer, rows, progress)
        owned = None if worker is None else plan.owned(*worker)
        with CacheWriter(layout, cfg.logprob_step, owned=owned) as writer:
            done = writer.resume(plan.shard_rows)
            mine = range(len(plan)) if owned is None else owned
            todo = [i for i in mine if i not in done]
            if done:
                log.info("resuming: %d of %d shards already complete", len(done), len(plan))
            if cfg.ray:
                from rlkd_cache.ray_cache import score_on_ray

                for index, entry in score_on_ray(job, plan, todo, progress):
                    writer.take(index, entry)
            elif todo:
                _score(ShardScorer(job, plan, tokenizer, rows, backend), todo, writer, progress)
        if worker is not None:
            log.info(
                "worker %d of %d: its %d shards are complete (%d scored now); once every worker "
                "is done, run the same command with --finalize instead of --worker-index",
                worker[0],
                worker[1],
                len(mine),
                len(todo),
            )
            return layout.path
        if cfg.ray:
            layout.remove_temp_files()  # of replicas killed mid-write: none is running now
        manifest = finish(job, plan, tokenizer, writer)
    _log_cached(manifest, plan, time.time() - started)
    return layout.path


def planned(job: CacheJob, tokenizer: Any, rows: Any, progress: bool) -> ShardPlan:
    """The cache's saved shard plan, else a new one (`ShardPlan.new`: one streaming pass over
    the rows, with a progress bar), saved."""
    from tqdm import tqdm

    def make() -> ShardPlan:
        how = Preparation.of(list(rows.column_names), tokenizer, job.cfg)
        with tqdm(
            total=len(rows),
            unit="row",
            desc="rlkd plan",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            return ShardPlan.new(rows, how, tokenizer, job.cfg, bar.update)

    return load_plan(job.layout, job.fingerprint, make)


def finish(job: CacheJob, plan: ShardPlan, tokenizer: Any, writer: CacheWriter) -> Manifest:
    """Write the manifest of `job`'s cache, last: the shards `writer` wrote or took over."""
    cfg = job.cfg
    return writer.finish(
        Manifest(
            fingerprint=job.fingerprint,
            identity=job.identity,
            config={k: v for k, v in saved(cfg).items() if k != "cache_root"},
            teacher=TeacherInfo(
                name=job.teacher_name,
                path=str(job.model),
                sha256=job.teacher_sha,
                probe=job.probe,
            ),
            tokenizer=TokenizerInfo(
                sha256=job.identity["tokenizer_sha256"],
                vocab_sha256=vocab_sha256(tokenizer),
                vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            ),
            dataset={**job.data_id, "shape": plan.shape, "template": plan.template},
            backend=BackendInfo(
                name=job.backend, why=job.why, version=backend_version(job.backend)
            ),
            vocab_size=job.vocab_size,
            k=cfg.top_k,
            logprob_step=cfg.logprob_step,
            responses=ResponsesInfo.found_in(job.layout),
            skipped=dict(plan.skipped),
            truncated=plan.truncated,
        )
    )


def finalize(job: CacheJob, tokenizer: Any) -> Path | str:
    """`--finalize`: under the cache's lock, check every shard of the saved plan (present,
    its sha256 the one its record holds, decodes, its rows the planned ones) and write the
    manifest; or fail naming each missing or bad shard and the worker that owns it."""
    cfg, layout = job.cfg, job.layout
    if layout.read_plan() is None:
        raise RlkdError(
            f"{layout}: no shard plan, so no worker has started this cache: run the workers "
            "(--num-workers N --worker-index I) first, then --finalize"
        )
    with layout.locked(cfg.lock_wait):
        if layout.is_complete():
            return _already_cached(job)
        job = same_teacher(job)
        where = layout.file(CacheDir.PLAN)
        plan = ShardPlan.from_json(layout.read_plan(), job.fingerprint, where)
        if plan is None:
            raise RlkdError(f"{where}: not a shard plan of this cache; rerun the workers")
        layout.check_no_workers()
        entries, problems = {}, []
        for index, shard in enumerate(plan.shards):
            entry, problem = _checked_shard(layout, index, shard, cfg)
            if entry is not None:
                entries[index] = entry
                continue
            owner = (
                f"worker {index % cfg.num_workers} of {cfg.num_workers}"
                if cfg.num_workers > 1
                else f"the worker whose --worker-index is {index} mod --num-workers"
            )
            problems.append(f"{layout.shard_name(index)}: {problem} (owned by {owner})")
        if problems:
            shown = problems[:20] + [f"... and {len(problems) - 20} more"] * (len(problems) > 20)
            raise RlkdError(
                f"{layout}: {len(problems)} of {len(plan)} planned shards are missing or bad; "
                "rerun their workers, then --finalize:\n  " + "\n  ".join(shown)
            )
        with CacheWriter(layout, cfg.logprob_step) as writer:  # removes dead writes' temp files
            for index, entry in entries.items():
                writer.take(index, entry)
            manifest = finish(job, plan, tokenizer, writer)
    log.info("finalized %s: %d shards", layout, manifest.totals.shards)
    return layout.path


def _checked_shard(
    layout: CacheDir, index: int, shard: PlannedShard, cfg: CacheConfig
) -> tuple[ShardEntry | None, str]:
    """Planned shard `index` of `layout`'s manifest entry, if it is there, matches its record
    (`writer.recorded`), decodes and holds the planned rows; else None and what is wrong."""
    name = layout.shard_name(index)
    if not layout.has(name):
        return None, "missing"
    data = layout.read_bytes(name)
    entry, problem = recorded(layout, index, shard.rows, data)
    if entry is None:
        return None, problem
    try:
        block = decode_bytes(data, "it", cfg.top_k, cfg.logprob_step)
    except RlkdError as e:
        return None, str(e)
    found = (len(block), int(block.pos_off[-1]), int(block.tok_off[-1]))
    if found != (shard.rows, shard.positions, shard.tokens):
        return None, (
            f"holds {found[0]} rows with {found[1]} positions; the plan has {shard.rows} rows "
            f"with {shard.positions}"
        )
    return entry, ""


def _already_cached(job: CacheJob) -> Path | str:
    """The directory of `job`'s complete cache, after checking its manifest (which raises,
    naming the file, if it is corrupt or foreign) and that a served teacher is the same."""
    layout = job.layout
    manifest = Cache(layout.files).info
    same_teacher(job, manifest.teacher.probe or {})
    log.info("already cached: %s", layout)
    return layout.path


def _log_cached(manifest: Manifest, plan: ShardPlan, seconds: float) -> None:
    t = manifest.totals
    log.info(
        "cached %d rows, %d positions (%d tokens) in %d shards: %.2f MiB, %.1f B/position, "
        "%.1f s; skipped %s, truncated %d",
        t.rows,
        t.positions,
        t.tokens,
        t.shards,
        t.bytes / 2**20,
        t.bytes_per_position,
        seconds,
        dict(plan.skipped) or "none",
        plan.truncated,
    )


class Rate:
    """Tokens scored over time: the progress bar's tokens/s and the closing log line."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.tokens = 0
        self.first: tuple[float, int] | None = None
        """When the first shard was done, and the tokens by then."""

    def add(self, tokens: int, shard_done: bool = False) -> None:
        self.tokens += tokens
        if shard_done and self.first is None:
            self.first = (time.time(), self.tokens)

    def __str__(self) -> str:
        return f"{self.tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s"

    def summary(self, who: str, shards: int) -> str:
        """One line: tokens/s of the whole scoring, and after the first shard (which also
        carries the teacher's start)."""
        seconds = time.time() - self.t0
        line = (
            f"{who}: {shards} shards, {self.tokens} tokens in {seconds:.1f} s, "
            f"{self.tokens / max(seconds, 1e-9):.0f} tokens/s"
        )
        if self.first is None or shards < 2:
            return line
        at, before = self.first
        steady = (self.tokens - before) / max(time.time() - at, 1e-9)
        return (
            f"{line} ({steady:.0f} tokens/s after the first shard, which took "
            f"{at - self.t0:.1f} s with the teacher's start)"
        )


def _score(scorer: ShardScorer, todo: list[int], writer: CacheWriter, progress: bool) -> None:
    """Score the shards in `todo`, handing each to the writer (which encodes and writes it
    in the background while the teacher scores the next)."""
    from tqdm import tqdm

    shards = scorer.plan.shards
    total = sum(s.rows for s in shards)
    bar = tqdm(
        total=total,
        initial=total - sum(shards[i].rows for i in todo),
        unit="seq",
        desc="rlkd cache",
        disable=not progress,
        dynamic_ncols=True,
    )
    rate = Rate()

    def done(sequences: int, tokens: int) -> None:
        rate.add(tokens)
        bar.update(sequences)
        in_flight = getattr(scorer.backend, "in_flight", None)  # a served teacher's requests
        bar.set_postfix_str(str(rate) + ("" if in_flight is None else f", {in_flight} in flight"))

    try:
        for index in todo:
            block = scorer.block(index, done)
            rate.add(0, shard_done=True)
            writer.submit(index, block)
    finally:
        bar.close()
    log.info("%s", rate.summary("scored", len(todo)))
