"""Checkpoints of a torchrun job (2+ ranks): every rank's position, one atomic folder.

Every rank calls `save_ranks`; the per-rank state (reader position, RNG) is gathered, so the
folder holds all of it: `trainer.json` has `world_size` and `batchers` (one reader state per
rank, in rank order), `state.pt` has `rngs` (one RNG state per rank) besides the schedule
and the loss scaler.
- DDP: every rank holds the same weights and optimizer state, so rank 0 writes them into
  `state.pt` with the one-process writer (`checkpoint.save_checkpoint`: temp folder, fsync,
  rename, prune).
- FSDP2: model and optimizer state stay sharded: every rank writes its shards with
  `torch.distributed.checkpoint` (DCP) into `sharded/` of a temp folder
  `.step-N.sharded.tmp`; after they all finished, rank 0 adds `state.pt` and `trainer.json`,
  fsyncs, renames the folder to `step-N` and prunes. A job killed at any point leaves only
  the temp folder, which `checkpoints()` does not list and the next save removes.
Both layouts have `state.pt` and `trainer.json`, so `checkpoint.checkpoints` lists them and
`checkpoint.load_checkpoint` reads their common part. A checkpoint resumes only with the world
size that wrote it (`run_dir.prepare_run_dir` refuses another): each rank's part of the cache
and its reader position depend on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.errors import RlkdError, disk_full, is_disk_full
from rlkd_cache.store.atomic import TEMP_GLOB, begin_dir, commit_dir, temp_path
from rlkd_cache.train.checkpoint import checkpoints, rng_state, save_checkpoint
from rlkd_cache.train.distributed import World, is_sharded, unwrap

SHARDS = "sharded"
"""The DCP folder of an FSDP2 checkpoint (model and optimizer shards, `.metadata`)."""


def save_ranks(
    run_dir: Path,
    step: int,
    world: World,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    common: dict[str, Any],
    batcher: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of the job (every rank calls this): `common` (schedule,
    scaler: the same on every rank), each rank's `batcher` state and RNG, and the weights and
    optimizer state as DDP or FSDP2 holds them. Returns the checkpoint's folder."""
    ranks = world.gather({"batcher": batcher, "rng": rng_state()})
    trainer = {"world_size": world.size, "batchers": [r["batcher"] for r in ranks]}
    tensors = {**common, "rngs": [r["rng"] for r in ranks]}
    if is_sharded(model):
        return _save_sharded(run_dir, step, world, model, optimizer, tensors, trainer, keep_last)

    def write() -> Path:
        weights = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
        return save_checkpoint(run_dir, step, {**weights, **tensors}, trainer, keep_last)

    return world.on_main(write)


def _save_sharded(
    run_dir: Path,
    step: int,
    world: World,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, Any],
    trainer: dict[str, Any],
    keep_last: int,
) -> Path:
    """The FSDP2 checkpoint: DCP shards from every rank, then rank 0 completes the folder."""
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"  # the name `save_checkpoint` gives
    tmp = temp_path(final, owner="sharded")  # one name for every rank

    def fresh() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TEMP_GLOB):  # killed saves' (one save at a time per run)
            shutil.rmtree(stale, ignore_errors=True)
        (begin_dir(final, owner="sharded") / SHARDS).mkdir()

    def complete() -> Path:
        try:
            with (tmp / "state.pt").open("wb") as fh:  # a file, so a full disk's OSError shows
                torch.save(tensors, fh)
            (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step}, indent=2))
            commit_dir(tmp, final)
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full(f"checkpoint {final.name}", run_dir) from None
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    world.on_main(fresh)
    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDS))
    return world.on_main(complete)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The FSDP2 model's and optimizer's state dicts as DCP saves and loads them (sharded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optim}


def load_weights(
    checkpoint: Path,
    tensors: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load a checkpoint's weights and optimizer state into `model` (a `wrap` result) and
    `optimizer`: from `tensors` (`state.pt`: one process, DDP) or from the DCP shards (FSDP2)."""
    sharded = is_sharded(model)
    if sharded == ("model" in tensors):
        held = "whole (one process or DDP)" if "model" in tensors else "sharded (FSDP2)"
        wanted = "sharded (FSDP2)" if sharded else "whole (one process or DDP)"
        raise RlkdError(
            f"{checkpoint} holds {held} weights, but this job's model is {wanted}: resume it "
            "with the --parallel it was written with"
        )
    if not sharded:
        unwrap(model).load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDS))
    except Exception as e:  # DCP wraps every rank's failure in its own exception types
        raise RlkdError(f"cannot load the shards of checkpoint {checkpoint}: {e}") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def rank_state(
    tensors: dict[str, Any], trainer: dict[str, Any], rank: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RNG state, reader state) of `rank` in a checkpoint: the per-rank lists of a job's
    checkpoint, or the single entries of a one-process checkpoint."""
    if "rngs" in tensors:
        return tensors["rngs"][rank], trainer["batchers"][rank]
    return tensors["rng"], trainer["batcher"]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The student's whole state dict, gathered from the FSDP2 shards onto rank 0's CPU
    (other ranks get an empty dict; every rank must call this); None if not sharded. A tied
    weight is kept once, under its first name, as `save_pretrained` keeps it in one process
    (the gathered copies no longer share memory, so it could not tell)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    student = unwrap(model)
    first = {name for name, _ in student.named_parameters()}
    aliases = {n for n, _ in student.named_parameters(remove_duplicate=False)} - first
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    named = ((name.removeprefix("student."), tensor) for name, tensor in state.items())
    return {name: tensor for name, tensor in named if name not in aliases}
