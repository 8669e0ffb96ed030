"""Checkpoints: atomic, resumable, no pickled arbitrary objects.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` with `state.pt` (model, optimizer,
scheduler and grad-scaler state dicts and RNG states: tensors and plain containers only,
loaded with `weights_only=True`) and `trainer.json` (step, reader position, metrics). It is
written atomically (`store.atomic.atomic_dir`: a hidden temp folder, fsynced and renamed), so
a folder under its final name is complete; the newest `keep_last` are kept. The temp folder of
a killed save is removed by the next save, and a full disk is one line naming the run folder
(the checkpoints before are kept, and the same command resumes from the newest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.errors import RlkdError, disk_full, is_disk_full
from rlkd_cache.store.atomic import TEMP_GLOB, atomic_dir


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, Any], trainer: dict[str, Any], keep_last: int
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    First remove the temp folders in `checkpoints/`: a run saves one checkpoint at a time, so
    any there is a killed save's (two runs training into one folder at once are not
    supported). A full disk (or quota) raises `RlkdError` naming the run folder; the temp
    folder is removed and the checkpoints before are kept.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TEMP_GLOB):
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(final) as tmp:
            with (tmp / "state.pt").open("wb") as fh:  # a file, so a full disk's OSError shows
                torch.save(tensors, fh)
            (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step}, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError from the OSError
        if not is_disk_full(e):
            raise
        raise disk_full(f"checkpoint {final.name}", run_dir) from None
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of killed writes are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step-*")
        if (p / "trainer.json").is_file() and (p / "state.pt").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, trainer state) of a checkpoint folder."""
    try:
        tensors = torch.load(path / "state.pt", map_location=device, weights_only=True)
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise RlkdError(f"cannot load checkpoint {path}: {e}") from None
    return tensors, trainer
