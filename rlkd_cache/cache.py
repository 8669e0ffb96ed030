"""`rlkd cache`: run a teacher over a dataset into a content-addressed, resumable cache.

Resolve the teacher (default: the embedded SmolLM2), load and fingerprint the data, and name
the cache directory by the fingerprint; an existing complete cache is returned at once.
Otherwise tokenize, split rows into shards deterministically (the plan is saved so a resumed
run splits the same way), skip shards a killed run completed, score the rest in token-budget
batches, and write the manifest last.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache import __version__
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Prepared, dataset_identity, load_rows, prepare
from rlkd_cache.default_teacher import default_teacher
from rlkd_cache.errors import RlkdError
from rlkd_cache.responses import RESPONSES, with_teacher_responses
from rlkd_cache.store import FORMAT_VERSION, codec
from rlkd_cache.store.fingerprint import (
    fingerprint,
    folder_sha256,
    slug,
    tokenizer_sha256,
    vocab_sha256,
)
from rlkd_cache.store.manifest import (
    FORMAT_NAME,
    MANIFEST,
    file_sha256,
    load_manifest,
    write_json_atomic,
)
from rlkd_cache.store.writer import CacheWriter
from rlkd_cache.teacher import TeacherBackend, make_batches
from rlkd_cache.teacher.select import make_backend, resolve_backend

log = logging.getLogger("rlkd.cache")

POSITIONS_PER_SHARD = 262_144
"""Default shard size: big enough that the per-shard codebook costs ~0.1 B/position,
small enough that a killed run loses little work."""


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".rlkd-probe-"):
            pass
    except OSError as e:
        raise RlkdError(f"cache root {root} is not writable ({e.strerror or e})") from None


def resolve_model(cfg: CacheConfig) -> Path:
    if cfg.model is None:
        return default_teacher(cfg.cache_root)
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise RlkdError(
            f"model not found: {cfg.model} (expected a local Hugging Face model folder "
            "with config.json)"
        )
    return path


def shard_plan(prepared: Prepared, hint: int | None) -> list[int]:
    """Rows per shard: contiguous runs of rows holding about equal numbers of positions."""
    counts = np.array([len(s.positions) for s in prepared.sequences], dtype=np.int64)
    total = int(counts.sum())
    per_shard = math.ceil(total / hint) if hint else POSITIONS_PER_SHARD
    before = np.cumsum(counts) - counts
    shard_of_row = before // max(per_shard, 1)
    _, sizes = np.unique(shard_of_row, return_counts=True)
    return [int(s) for s in sizes]


def load_plan(cache_dir: Path, fp: str, prepared: Prepared, hint: int | None) -> list[int]:
    """The shard plan of an interrupted run if there is one, else a new one (saved)."""
    path = cache_dir / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("fingerprint") == fp and sum(plan["shard_rows"]) == len(prepared.sequences):
            log.info(
                "resuming %s with its saved shard plan (%d shards)",
                cache_dir,
                len(plan["shard_rows"]),
            )
            return [int(n) for n in plan["shard_rows"]]
    rows = shard_plan(prepared, hint)
    write_json_atomic(path, {"fingerprint": fp, "shard_rows": rows})
    return rows


def to_block(prepared: Prepared, rows: range, outputs: dict[int, Any]) -> codec.Block:
    seqs = [prepared.sequences[i] for i in rows]
    outs = [outputs[i] for i in rows]
    return codec.Block(
        seq_ids=[s.seq_id for s in seqs],
        input_ids=np.concatenate([s.input_ids for s in seqs]).astype(np.int32),
        tok_off=codec.offsets(np.array([len(s.input_ids) for s in seqs])),
        positions=np.concatenate([s.positions for s in seqs]).astype(np.int32),
        pos_off=codec.offsets(np.array([len(s.positions) for s in seqs])),
        topk_ids=np.concatenate([o.topk_ids for o in outs]).astype(np.int32),
        topk_logprobs=np.concatenate([o.topk_logprobs for o in outs]).astype(np.float32),
        target_logprobs=np.concatenate([o.target_logprobs for o in outs]).astype(np.float32),
    )


def run_cache(cfg: CacheConfig, progress: bool = True) -> Path:
    """Build (or find) the cache for `cfg`; return its directory."""
    from transformers import AutoConfig, AutoTokenizer

    started = time.time()
    root = Path(cfg.cache_root).expanduser()
    check_writable(root)
    model = resolve_model(cfg)
    teacher_config = AutoConfig.from_pretrained(str(model))
    vocab_size = int(teacher_config.vocab_size)
    if cfg.top_k < 1 or cfg.top_k > vocab_size:
        raise RlkdError(
            f"--top-k {cfg.top_k} must be between 1 and the teacher's vocabulary ({vocab_size})"
        )
    if not 0 < cfg.logprob_step <= 1:
        raise RlkdError(f"--logprob-step {cfg.logprob_step} must be in (0, 1] nats")
    if cfg.max_length < 2:
        raise RlkdError(f"--max-length {cfg.max_length} must be at least 2 tokens")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = load_rows(cfg.dataset, cfg.split)
    backend_name, why = resolve_backend(cfg)
    data_id = dataset_identity(cfg.dataset, cfg.split, rows)
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher_sha256": folder_sha256(model, root / ".hash-memo.json"),
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
        "backend": backend_name,
        "dtype": cfg.dtype,
        "responses": cfg.responses,
    }
    if backend_name == "vllm" and cfg.vllm_engine_kwargs:
        identity["vllm_engine_kwargs"] = cfg.vllm_engine_kwargs  # may change numerics
    if cfg.responses == "teacher":
        identity["generation"] = {
            "max_new_tokens": cfg.gen_max_new_tokens,
            "temperature": cfg.gen_temperature,
            "top_p": cfg.gen_top_p,
            "seed": cfg.gen_seed,
        }
    fp = fingerprint(identity)
    name = f"{slug(model.name)}-{slug(data_id['source'])}-k{cfg.top_k}-{fp[:16]}"
    cache_dir = root / name
    if (cache_dir / MANIFEST).exists():
        load_manifest(cache_dir)  # raises, naming the file, if it is corrupt or foreign
        log.info("already cached: %s", cache_dir)
        return cache_dir
    log.info("teacher %s, backend %s (%s)", model, backend_name, why)
    cache_dir.mkdir(parents=True, exist_ok=True)
    backends: list[TeacherBackend] = []

    def backend() -> TeacherBackend:
        if not backends:
            backends.append(make_backend(backend_name, model, cfg))
        return backends[0]

    if cfg.responses == "teacher":
        rows = with_teacher_responses(rows, tokenizer, cfg, cache_dir, backend(), progress)
        if cfg.prompt_field and not cfg.response_field and not cfg.messages_field:
            cfg = replace(cfg, response_field="response")
    prepared = prepare(rows, tokenizer, cfg)
    shard_rows = load_plan(cache_dir, fp, prepared, cfg.num_shards_hint)
    starts = np.concatenate([[0], np.cumsum(shard_rows)]).astype(int)
    n_rows = len(prepared.sequences)
    with CacheWriter(cache_dir, cfg.logprob_step) as writer:
        done = writer.existing()
        writer.written.update(done)
        todo = [i for i in range(len(shard_rows)) if i not in done]
        done_rows = sum(shard_rows[i] for i in done)
        if done:
            log.info("resuming: %d of %d shards already complete", len(done), len(shard_rows))
        scorer = backend() if todo else None
        _score(prepared, shard_rows, starts, todo, scorer, cfg, writer, n_rows, done_rows, progress)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "identity": identity,
            "config": {k: v for k, v in asdict(cfg).items() if k != "cache_root"},
            "teacher": {
                "name": model.name,
                "path": str(model),
                "sha256": identity["teacher_sha256"],
            },
            "tokenizer": {
                "sha256": identity["tokenizer_sha256"],
                "vocab_sha256": vocab_sha256(tokenizer),
                "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id,
            },
            "dataset": {**data_id, "shape": prepared.shape, "template": prepared.template},
            "backend": {
                "name": backend_name,
                "why": why,
                "version": backends[0].version() if backends else "(resumed: no shards left)",
            },
            "vocab_size": vocab_size,
            "k": cfg.top_k,
            "logprob_step": cfg.logprob_step,
            "max_logprob_error": cfg.logprob_step / 2,
            "responses": _responses_entry(cache_dir),
            "skipped": dict(prepared.skipped),
            "truncated": prepared.truncated,
            "rlkd_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = writer.finish(manifest)
    t = manifest["totals"]
    elapsed = time.time() - started
    log.info(
        "cached %d rows, %d positions (%d tokens) in %d shards: %.2f MiB, %.1f B/position, "
        "%.1f s; skipped %s, truncated %d",
        t["rows"],
        t["positions"],
        t["tokens"],
        t["shards"],
        t["bytes"] / 2**20,
        t["bytes_per_position"],
        elapsed,
        dict(prepared.skipped) or "none",
        prepared.truncated,
    )
    return cache_dir


def _responses_entry(cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / RESPONSES
    if not path.is_file():
        return {"source": "dataset"}
    return {"source": "teacher", "file": RESPONSES, "sha256": file_sha256(path)}


def _score(
    prepared: Prepared,
    shard_rows: list[int],
    starts: np.ndarray,
    todo: list[int],
    backend: TeacherBackend | None,
    cfg: CacheConfig,
    writer: CacheWriter,
    n_rows: int,
    done_rows: int,
    progress: bool,
) -> None:
    """Run the teacher over the shards in `todo`, handing each finished shard to the writer."""
    from tqdm import tqdm

    bar = tqdm(
        total=n_rows,
        initial=done_rows,
        unit="seq",
        desc="rlkd cache",
        disable=not progress,
        dynamic_ncols=True,
    )
    tokens, t0 = 0, time.time()
    try:
        for index in todo:
            assert backend is not None
            rows = range(int(starts[index]), int(starts[index]) + shard_rows[index])
            lengths = [len(prepared.sequences[i].input_ids) for i in rows]
            outputs: dict[int, Any] = {}
            for batch in make_batches(lengths, cfg.batch_tokens):
                seqs = [prepared.sequences[rows[j]] for j in batch]
                for j, out in zip(batch, backend.score(seqs, cfg.top_k), strict=True):
                    outputs[rows[j]] = out
                tokens += sum(lengths[j] for j in batch)
                bar.update(len(batch))
                bar.set_postfix_str(
                    f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s, shard {index}"
                )
            writer.submit(index, to_block(prepared, rows, outputs))
    finally:
        bar.close()
