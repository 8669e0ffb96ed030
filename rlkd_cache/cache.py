"""`rlkd cache`: run a teacher over a dataset into a content-addressed, resumable cache.

Resolve the teacher (default: the embedded SmolLM2), load and fingerprint the data, and name
the cache directory by the fingerprint; an existing complete cache is returned at once.
Otherwise, holding the directory's lock (`store/lock.py`: a second run on the same cache
waits for the first, then finds it complete), tokenize, split rows into shards
deterministically (the plan is saved so a resumed run splits the same way), skip shards a
killed run completed, score the rest in token-budget batches, and write the manifest last.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache.config import CacheConfig, saved, validated
from rlkd_cache.data import Prepared, dataset_identity, load_rows, prepare
from rlkd_cache.default_teacher import default_teacher
from rlkd_cache.errors import RlkdError
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
    TeacherInfo,
    TokenizerInfo,
)
from rlkd_cache.store.reader import Cache
from rlkd_cache.store.writer import CacheWriter
from rlkd_cache.teacher import TeacherBackend, TeacherOutput
from rlkd_cache.teacher.select import make_backend, resolve_backend
from rlkd_cache.train.batching import plan_window

log = logging.getLogger("rlkd.cache")

POSITIONS_PER_SHARD = 262_144
"""Default shard size: big enough that the per-shard codebook costs ~0.1 B/position,
small enough that a killed run loses little work."""


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
    if cfg.model is None:
        return default_teacher(local_home(cfg))
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise RlkdError(
            f"model not found: {cfg.model} (expected a local Hugging Face model folder "
            "with config.json)"
        )
    return path


def teacher_vocab_size(cfg: CacheConfig, model: Path) -> int:
    """The teacher's vocabulary size, after checking the settings that depend on it."""
    from transformers import AutoConfig

    vocab_size = int(AutoConfig.from_pretrained(str(model)).vocab_size)
    if cfg.top_k > vocab_size:  # top_k >= 1 and the rest: `CacheConfig.validate`
        raise RlkdError(
            f"--top-k {cfg.top_k} must be between 1 and the teacher's vocabulary ({vocab_size})"
        )
    return vocab_size


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
        "dtype": cfg.dtype,
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
class ShardPlan:
    """Rows per shard: shard i holds the next `shard_rows[i]` rows of the prepared data."""

    shard_rows: list[int]

    @classmethod
    def new(cls, prepared: Prepared, hint: int | None) -> ShardPlan:
        """Contiguous runs of rows holding about equal numbers of positions: `hint` shards,
        else about POSITIONS_PER_SHARD positions each."""
        counts = np.array([len(s.positions) for s in prepared.sequences], dtype=np.int64)
        total = int(counts.sum())
        per_shard = math.ceil(total / hint) if hint else POSITIONS_PER_SHARD
        before = np.cumsum(counts) - counts
        shard_of_row = before // max(per_shard, 1)
        _, sizes = np.unique(shard_of_row, return_counts=True)
        return cls([int(s) for s in sizes])

    @classmethod
    def load(cls, layout: CacheDir, fp: str, prepared: Prepared, hint: int | None) -> ShardPlan:
        """The plan of an interrupted run if there is one, else a new one (saved)."""
        saved = layout.read_plan(fp)
        if saved is not None and sum(saved) == len(prepared.sequences):
            log.info("resuming %s with its saved shard plan (%d shards)", layout, len(saved))
            return cls(saved)
        plan = cls.new(prepared, hint)
        layout.write_plan(fp, plan.shard_rows)
        return plan

    def __len__(self) -> int:
        return len(self.shard_rows)

    def rows(self, index: int) -> range:
        """The rows of shard `index`."""
        start = sum(self.shard_rows[:index])
        return range(start, start + self.shard_rows[index])


def to_block(prepared: Prepared, rows: range, outputs: dict[int, TeacherOutput]) -> codec.Block:
    """The block of `rows`, with the teacher's output for each (by row index)."""
    seqs = [prepared.sequences[i] for i in rows]
    outs = [outputs[i] for i in rows]
    return codec.Block.from_sequences(
        [s.seq_id for s in seqs],
        [s.input_ids for s in seqs],
        [s.positions for s in seqs],
        [o.topk_ids for o in outs],
        [o.topk_logprobs for o in outs],
        [o.target_logprobs for o in outs],
    )


def run_cache(cfg: CacheConfig, progress: bool = True) -> Path | str:
    """Build (or find) the cache for `cfg`; return its directory (a URL on an object
    store)."""
    from transformers import AutoTokenizer

    started = time.time()
    validated(cfg)  # built by the CLI or a recipe, it was checked there; in code, here
    root = folder(cfg.cache_root, cfg.storage_options)
    check_writable(root)
    model = resolve_model(cfg)
    vocab_size = teacher_vocab_size(cfg, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = load_rows(cfg.dataset, cfg.split)
    backend_name, why = resolve_backend(cfg)
    data_id = dataset_identity(cfg.dataset, cfg.split, rows)
    home = local_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    teacher_sha = folder_sha256(model, home / ".hash-memo.json")
    identity = cache_identity(cfg, teacher_sha, tokenizer, data_id, backend_name)
    fp = fingerprint(identity)
    layout = CacheDir(
        root.child(f"{slug(model.name)}-{slug(data_id['source'])}-k{cfg.top_k}-{fp[:16]}")
    )
    if layout.is_complete():
        return _already_cached(layout)
    layout.create()
    with layout.locked(cfg.lock_wait):  # one writer per cache; the check above only reads
        if layout.is_complete():  # the run that held the lock completed it meanwhile
            return _already_cached(layout)
        log.info("teacher %s, backend %s (%s)", model, backend_name, why)
        backends: list[TeacherBackend] = []

        def backend() -> TeacherBackend:
            if not backends:
                backends.append(make_backend(backend_name, model, cfg))
            return backends[0]

        if cfg.responses == "teacher":
            rows = with_teacher_responses(rows, tokenizer, cfg, layout, backend(), progress)
            if cfg.prompt_field and not cfg.response_field and not cfg.messages_field:
                cfg = replace(cfg, response_field="response")
        prepared = prepare(rows, tokenizer, cfg)
        plan = ShardPlan.load(layout, fp, prepared, cfg.num_shards_hint)
        with CacheWriter(layout, cfg.logprob_step) as writer:
            done = writer.resume(plan.shard_rows)
            todo = [i for i in range(len(plan)) if i not in done]
            if done:
                log.info("resuming: %d of %d shards already complete", len(done), len(plan))
            _score(prepared, plan, todo, backend() if todo else None, cfg, writer, progress)
            manifest = writer.finish(
                Manifest(
                    fingerprint=fp,
                    identity=identity,
                    config={k: v for k, v in saved(cfg).items() if k != "cache_root"},
                    teacher=TeacherInfo(name=model.name, path=str(model), sha256=teacher_sha),
                    tokenizer=TokenizerInfo(
                        sha256=identity["tokenizer_sha256"],
                        vocab_sha256=vocab_sha256(tokenizer),
                        vocab_size=len(tokenizer),
                        eos_token_id=tokenizer.eos_token_id,
                    ),
                    dataset={**data_id, "shape": prepared.shape, "template": prepared.template},
                    backend=BackendInfo(
                        name=backend_name,
                        why=why,
                        version=backends[0].version() if backends else "(resumed: no shards left)",
                    ),
                    vocab_size=vocab_size,
                    k=cfg.top_k,
                    logprob_step=cfg.logprob_step,
                    responses=ResponsesInfo.found_in(layout),
                    skipped=dict(prepared.skipped),
                    truncated=prepared.truncated,
                )
            )
    _log_cached(manifest, prepared, time.time() - started)
    return layout.path


def _already_cached(layout: CacheDir) -> Path | str:
    """The directory of the complete cache `layout`, after checking its manifest (which
    raises, naming the file, if it is corrupt or foreign)."""
    Cache(layout.files)
    log.info("already cached: %s", layout)
    return layout.path


def _log_cached(manifest: Manifest, prepared: Prepared, seconds: float) -> None:
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
        dict(prepared.skipped) or "none",
        prepared.truncated,
    )


def _score(
    prepared: Prepared,
    plan: ShardPlan,
    todo: list[int],
    backend: TeacherBackend | None,
    cfg: CacheConfig,
    writer: CacheWriter,
    progress: bool,
) -> None:
    """Run the teacher over the shards in `todo` in token-budget batches (`plan_window`),
    handing each finished shard to the writer."""
    from tqdm import tqdm

    left = sum(plan.shard_rows[i] for i in todo)
    total = len(prepared.sequences)
    bar = tqdm(
        total=total,
        initial=total - left,
        unit="seq",
        desc="rlkd cache",
        disable=not progress,
        dynamic_ncols=True,
    )
    tokens, t0 = 0, time.time()
    try:
        for index in todo:
            assert backend is not None
            rows = plan.rows(index)
            lengths = np.array([len(prepared.sequences[i].input_ids) for i in rows])
            outputs: dict[int, TeacherOutput] = {}
            for batch in plan_window(lengths, cfg.batch_tokens):
                seqs = [prepared.sequences[rows[j]] for j in batch]
                for j, out in zip(batch, backend.score(seqs, cfg.top_k), strict=True):
                    outputs[rows[j]] = out
                tokens += int(lengths[batch].sum())
                bar.update(len(batch))
                bar.set_postfix_str(
                    f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s, shard {index}"
                )
            writer.submit(index, to_block(prepared, rows, outputs))
    finally:
        bar.close()
