"""`rlkd eval`: how closely a student matches a cached teacher on held-out positions.

A deterministic pass over every distilled position of the cache, batched as in training-time
eval (`train/evaluate.py`): the student's decoder gives the final hidden states at the cached
positions, and the LM head is applied `chunk_size` positions at a time, so (N, V) logits never
exist at once. Each chunk of logits goes to `AlignmentMeter` (the metrics of rlkd-method.md);
the student runs in fp32 with its full LM head, as in training.

The student is a model folder, or an `rlkd train` run folder (its `final/` student). A run
folder keeps its results in `eval.json`, keyed by the eval cache's fingerprint and stamped with
the sha256 of the student folder, so `rlkd eval --compare` over many runs only measures what
changed; `recompute=True` ignores saved results. With `generate`, greedy generations are scored
by ROUGE-L (`generate.py`); those are never saved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.config import EvalConfig, pick_device
from rlkd_cache.errors import RlkdError
from rlkd_cache.eval.generate import check_source, rouge_report
from rlkd_cache.eval.metrics import AlignmentMeter
from rlkd_cache.store.atomic import write_json_atomic
from rlkd_cache.store.fingerprint import folder_sha256
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import TokenBatcher
from rlkd_cache.train.lora import MERGED, merged_model
from rlkd_cache.train.step import student_hidden
from rlkd_cache.train.stream import CacheStream
from rlkd_cache.train.student import check_compatible, lm_head, load_student

log = logging.getLogger("rlkd.eval")

RESULTS = "eval.json"
"""File in a run folder holding saved results, keyed by cache fingerprint."""

SHA_MEMO = ".eval-sha256-memo.json"
"""File in a run folder memoizing the student folder's sha256 by file sizes and times."""

RESULTS_VERSION = 1
"""Bumped when the metrics change meaning, so older saved results are not reused."""


def resolve_student(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) of `path`: a run folder of `rlkd train` gives its
    `final/` student (of a LoRA run, `final/merged/`, else the adapter in `final/`); a
    Hugging Face model folder is used as it is."""
    folder = Path(path)
    for final in (folder / "final", folder / "final" / MERGED):  # a LoRA run: its merged model
        if (final / "config.json").is_file():
            return final, folder
    if (folder / "final" / "adapter_config.json").is_file() and (folder / "config.json").is_file():
        return folder / "final", folder  # a LoRA run's adapter, on its base (`load_evaluated`)
    if (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file():
        raise RlkdError(
            f"{folder} is an `rlkd train` run folder without a final/ student (is training "
            "finished?): finish the run, or pass a Hugging Face model folder"
        )
    if not (folder / "config.json").is_file():
        raise RlkdError(
            f"student not found: {path} (expected a Hugging Face model folder or an "
            "`rlkd train` run folder with final/)"
        )
    return folder, None


@torch.no_grad()
def alignment(
    model: Any,
    cache: Cache,
    *,
    batch_tokens: int,
    chunk_size: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, float]:
    """`AlignmentMeter.result()` of `model` over every distilled position of `cache`."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    head = lm_head(model)
    meter = AlignmentMeter()
    total = cache.info.totals.positions
    bar = tqdm(total=total, unit="pos", desc="eval", disable=not progress)
    batcher = TokenBatcher(CacheStream(cache, seed=0, shuffle_buffer=1), batch_tokens=batch_tokens)
    for batch in batcher.epoch_batches(0):
        batch = batch.to(device)
        hidden = student_hidden(model, batch)  # (N, H), the training step's forward, fp32
        for start in range(0, batch.n_positions, chunk_size):
            end = start + chunk_size
            logits = head.logits(hidden[start:end])  # (n, V)
            meter.update(
                logits,
                batch.topk_ids[start:end],
                batch.topk_logprobs[start:end],
                batch.target_ids[start:end],
            )
        bar.update(batch.n_positions)
    bar.close()
    model.train(was_training)
    return meter.result()


def load_evaluated(folder: Path, run: Path | None, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of `resolve_student`'s folder: a LoRA run's adapter is merged, in
    memory, into the base student named by the run's config.json (`--student`)."""
    if run is None or not (folder / "adapter_config.json").is_file():
        return load_student(folder, device)
    base = json.loads((run / "config.json").read_text()).get("student")
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        raise RlkdError(
            f"{run} is a LoRA run whose base student ({base!r} in its config.json) is not a model "
            "folder here: evaluate final/merged/ (train with --merge) or restore the base"
        )
    from transformers import AutoTokenizer

    return merged_model(base, folder).to(device), AutoTokenizer.from_pretrained(str(folder))


def _saved(run: Path, fingerprint: str, student_sha: str) -> dict[str, Any] | None:
    """The saved metrics of `run` on the cache `fingerprint`, if they are for this student."""
    path = run / RESULTS
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get(fingerprint)
    except (OSError, ValueError, AttributeError):
        log.warning("ignoring unreadable %s", path)
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("version") != RESULTS_VERSION
        or entry.get("student_sha256") != student_sha
    ):
        return None
    return entry.get("metrics")


def _save(run: Path, fingerprint: str, student_sha: str, metrics: dict[str, Any]) -> None:
    """Add (or replace) this cache's entry in the run's `eval.json`."""
    path = run / RESULTS
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        results = {}
    if not isinstance(results, dict):
        results = {}
    results[fingerprint] = {
        "version": RESULTS_VERSION,
        "student_sha256": student_sha,
        "metrics": metrics,
    }
    write_json_atomic(path, results)


def run_eval(
    student: str | Path, cache_dir: str | Path, cfg: EvalConfig, progress: bool = False
) -> dict[str, Any]:
    """Evaluate `student` (model or run folder) on the cache at `cache_dir` as `cfg` says.

    Returns `student` and `cache` (paths), every `AlignmentMeter` key, and with `generate`
    (a JSONL file or `cache`, see `generate.py`) also `rouge_l` and `generations`.
    """
    generate = cfg.generate
    folder, run = resolve_student(student)
    cache = cfg.open_cache(str(cache_dir))
    if generate is not None:
        check_source(generate, cache)
    fingerprint = cache.info.fingerprint
    student_sha = None
    if run is not None and fingerprint:
        student_sha = folder_sha256(folder, memo_file=run / SHA_MEMO)
    metrics = None
    if student_sha is not None and not cfg.recompute:
        metrics = _saved(run, fingerprint, student_sha)
        if metrics is not None:
            log.info("reusing the saved result in %s", run / RESULTS)
    target = pick_device(cfg.device)
    model = tokenizer = None
    if metrics is None or generate is not None:
        model, tokenizer = load_evaluated(folder, run, target)
        check_compatible(cache, tokenizer, model, rank_k=1, label="eval")
    if metrics is None:
        metrics = alignment(
            model,
            cache,
            batch_tokens=cfg.batch_tokens,
            chunk_size=cfg.chunk_size,
            device=target,
            progress=progress,
        )
        if student_sha is not None:
            _save(run, fingerprint, student_sha, metrics)
    out: dict[str, Any] = {"student": str(folder), "cache": str(cache.layout), **metrics}
    if generate is not None:
        report = rouge_report(
            model,
            tokenizer,
            generate,
            cache,
            max_new_tokens=cfg.max_new_tokens,
            limit=cfg.limit,
            batch_tokens=cfg.batch_tokens,
            device=target,
            progress=progress,
        )
        out.update(report)
    return out
