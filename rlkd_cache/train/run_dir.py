"""A run folder of `rlkd train`: its saved config, whether a new job may continue it, and
from which checkpoints; plus the learning-rate schedule the run's config defines.

`config.json` holds the resolved `TrainConfig`, the job's `world_size` and the student's
parameter counts (`trainable_parameters`, `parameters`, `trainable_share`). A job continues a
run only with the same run-defining settings (`NOT_RUN_DEFINING` lists those that may
change) and the same number of ranks; `--resume auto` then tries the run's checkpoints
newest first, `--resume PATH` exactly the one it names.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rlkd_cache.config import TrainConfig
from rlkd_cache.config import saved as saved_fields
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import lock
from rlkd_cache.store.atomic import write_json_atomic
from rlkd_cache.train.checkpoint import checkpoints

NOT_RUN_DEFINING = (
    "output",
    "resume",
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "keep_last",
    "log_every",
    "device",
    "eval_cache",
    "prefetch_shards",
    "local_cache",
    "local_cache_gib",
    "merge",
)
"""Config keys that may differ when a run is continued."""

LOCK = ".lock"
"""The run folder's lock file (hidden; nothing lists it as a checkpoint or a result)."""


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The run-defining keys in which a run folder's saved `config.json` differs from `cfg`.
    A key the saved config lacks (written by an rlkd that had no such option) counts as the
    option's default, so adding an option does not orphan existing runs."""
    defaults = saved_fields(TrainConfig())
    return sorted(
        k
        for k, value in saved_fields(cfg).items()
        if k not in NOT_RUN_DEFINING and saved.get(k, defaults[k]) != value
    )


def check_world_size(saved: int, world_size: int, where: str) -> None:
    """Refuse to continue, with `world_size` ranks, what `saved` ranks trained (`where`)."""
    if saved != world_size:
        raise RlkdError(
            f"{where} was trained by {saved} rank(s) and this job has {world_size}: resume it "
            f"with {saved} rank(s), since each rank's part of the cache and its reader position "
            "depend on the number of ranks; or train into another --output"
        )


BUSY_RUN = (
    "--output {folder} is being trained into by another rlkd run, {who}: wait for it to end "
    "(then rerun to continue it), or choose another --output"
)


def run_lock(output: str) -> AbstractContextManager[None]:
    """The lock of the run folder `output` (created if new), held by the job training into it
    (rank 0 of a torchrun job) for the whole run: a second job into the same folder fails at
    once naming the holder (`store/lock.py`; a killed job's lock is free)."""
    run = run_folder(output)
    run.mkdir(parents=True, exist_ok=True)
    return lock.hold(run / LOCK, wait_s=0, busy=BUSY_RUN)


def run_folder(output: str) -> Path:
    """`--output` as a path, refused (one line) when a file is there."""
    run = Path(output)
    if run.exists() and not run.is_dir():
        raise RlkdError(f"--output {run}: a file is there; expected a run folder (new or not)")
    return run


def prepare_run_dir(
    cfg: TrainConfig, world_size: int = 1, counted: dict[str, float] | None = None
) -> list[Path]:
    """Create the run folder; return the checkpoints to resume from, best first: the one
    `--resume` names, or with `auto` the run's own, newest first (none for a new run).
    A run or checkpoint of another number of ranks than `world_size` is refused. `counted`
    (the student's trainable and all parameters) is written into config.json too."""
    run = run_folder(cfg.output)
    saved_path = run / "config.json"
    resolved = {**saved_fields(cfg), "world_size": world_size, **(counted or {})}
    if cfg.resume not in ("auto", "never"):
        checkpoint = Path(cfg.resume)
        try:
            trainer = json.loads((checkpoint / "trainer.json").read_text())
        except (OSError, ValueError):
            raise RlkdError(
                f"--resume {cfg.resume}: not a checkpoint folder (no readable trainer.json)"
            ) from None
        check_world_size(trainer.get("world_size", 1), world_size, f"--resume {cfg.resume}")
    elif saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        differs = config_differences(saved, cfg)
        if cfg.resume == "never" or differs:
            what = f" (differs in: {', '.join(differs)})" if differs else ""
            raise RlkdError(
                f"{run} holds another run's config{what}: choose another --output, or pass "
                "--resume auto with the same settings, or --resume CHECKPOINT to continue from it"
            )
        check_world_size(saved.get("world_size", 1), world_size, f"the run in {run}")
        candidates = checkpoints(run)[::-1]
    else:
        candidates = []
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, resolved)
    return [checkpoint] if cfg.resume not in ("auto", "never") else candidates
