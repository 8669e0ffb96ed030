"""`rlkd cache --ray`: the planned shards scored by teacher replicas on Ray Data.

The driver (`run_cache`) plans the shards, holds the cache's lock, and hands the shards left
to do to `score_on_ray`: a Ray Dataset of shard indices, mapped by an actor pool of
`--replicas` `Replica`s (`map_batches` with a callable class: each actor loads the tokenizer,
the dataset and the teacher once, with `--gpus-per-replica` GPUs and `--cpus-per-replica`
CPUs, a CPU teacher running that many threads). A replica scores one whole shard at a time
with the same `ShardScorer` a single process uses and writes it straight into the cache
(`write_shard`: atomic, create-only, its record first), then returns its manifest entry; the
driver shows shards done and tokens/s over all replicas, and writes the manifest last.

Failures: Ray Data restarts an actor that dies (a killed process, a lost node) and runs its
shard again on another (Ray Data's actor pool retries tasks of dead actors without limit); the
killed write left only a temp file, which the driver removes at the end. An error raised by
our own code in a replica (bad data, a full disk) is not retried: it ends the run with its
one-line message. A killed driver takes its local Ray and replicas with it; rerunning the
command keeps the complete shards and redoes the rest, as without Ray.

Every node needs rlkd installed, and the teacher folder and dataset at the same paths (or a
hub name / object-store URL); the cache root must be shared (a shared disk or an object
store) for the shards to meet.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from rlkd_cache.cache import Rate
from rlkd_cache.errors import RlkdError
from rlkd_cache.plan import ShardPlan
from rlkd_cache.store.manifest import ShardEntry

log = logging.getLogger("rlkd.cache")

FORWARDED_ENV = ("HF_", "RLKD_", "AWS_", "FSSPEC_", "VLLM_", "TOKENIZERS_PARALLELISM")
"""Environment variables (by prefix) the driver passes on to its replicas (`runtime_env`):
hub and cache settings, object-store credentials, test hooks."""


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # Ray Data ships in `ray[data]`
    except ImportError as e:
        raise RlkdError(
            f"--ray needs Ray Data, which is not installed ({e}): pip install 'rlkd[ray]'"
        ) from None
    return ray


class Replica:
    """One teacher replica: a Ray Data actor that scores and writes whole shards."""

    def __init__(self, job: Any, plan: ShardPlan) -> None:
        import torch
        from transformers import AutoTokenizer

        from rlkd_cache.cache import ShardScorer
        from rlkd_cache.data import load_rows

        torch.set_num_threads(max(1, int(job.cfg.cpus_per_replica)))
        tokenizer = AutoTokenizer.from_pretrained(str(job.model))
        rows = load_rows(job.cfg.dataset, job.cfg.split)
        self.job = job
        self.scorer = ShardScorer(job, plan, tokenizer, rows)
        self.scorer.backend  # noqa: B018  (load the teacher once, now)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from rlkd_cache.store.writer import write_shard

        layout, step = self.job.layout, self.job.cfg.logprob_step
        shards, entries = [], []
        for index in (int(i) for i in batch["shard"]):
            try:
                entry = write_shard(layout, index, self.scorer.block(index), step)
            except RlkdError as e:  # ours: not worth a retry; one line on the driver
                entry = {"error": str(e)}
            shards.append(index)
            entries.append(json.dumps(entry if isinstance(entry, dict) else asdict(entry)))
        return {"shard": shards, "entry": entries}


def gpus_per_replica(ray: Any, cfg: Any) -> float:
    """`--gpus-per-replica`, or by default the teacher's tensor-parallel size on a cluster
    with GPUs and 0 on one without (and for a served teacher, which runs elsewhere)."""
    if cfg.gpus_per_replica is not None:
        return float(cfg.gpus_per_replica)
    if cfg.backend == "server":
        return 0.0
    return float(cfg.vllm_tensor_parallel_size) if ray.cluster_resources().get("GPU") else 0.0


def _check_fits(ray: Any, replicas: int, cpus: float, gpus: float, started: bool) -> None:
    """Fail (on a local Ray this run started) or warn (on a cluster, which may grow) when the
    replicas need more CPUs or GPUs than the cluster has: Ray would wait for them."""
    have = ray.cluster_resources()
    for what, each in (("CPU", cpus), ("GPU", gpus)):
        need, there = replicas * each, float(have.get(what, 0))
        if need <= there:
            continue
        line = (
            f"--replicas {replicas} with --{what.lower()}s-per-replica {each:g} need {need:g} "
            f"{what}s; the Ray cluster has {there:g}"
        )
        if started:
            raise RlkdError(f"{line}: lower --replicas or --{what.lower()}s-per-replica")
        log.warning("warning: %s: waiting for the cluster to grow", line)


def connect(ray: Any, cfg: Any) -> bool:
    """Use the Ray this process runs, else join the cluster `--ray-address` names ("auto":
    `$RAY_ADDRESS` or the one running on this machine), else start a local one for this run;
    True if this call started or joined it (and `ray.shutdown` is ours)."""
    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    try:
        ray.init(
            address=cfg.ray_address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,  # Ray's own narration; its logs stay in its folder
            runtime_env={"env_vars": env},
        )
    except ConnectionError as e:
        raise RlkdError(
            f"--ray-address {cfg.ray_address}: cannot join the Ray cluster ({e})"
        ) from None
    return True


def score_on_ray(
    job: Any, plan: ShardPlan, todo: list[int], progress: bool
) -> Iterator[tuple[int, ShardEntry]]:
    """Score and write the shards `todo` of `plan` on Ray replicas; yield (index, entry) of
    each as it completes."""
    if not todo:
        return
    from tqdm import tqdm

    ray = import_ray()
    ours = connect(ray, job.cfg)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # rlkd's bar counts shards and tokens
        context.print_on_execution_start = False
        # Ray Data narrates every execution at INFO and WARNING (its logs stay in Ray's
        # session folder, /tmp/ray/session_*/logs); rlkd's own lines say what matters
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        replicas = min(job.cfg.replicas, len(todo))
        gpus = gpus_per_replica(ray, job.cfg)
        _check_fits(
            ray, replicas, job.cfg.cpus_per_replica, gpus, started=ours and not job.cfg.ray_address
        )
        log.info(
            "scoring %d shards on Ray: %d replicas, %g GPUs and %g CPUs each",
            len(todo),
            replicas,
            gpus,
            job.cfg.cpus_per_replica,
        )
        shards = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        scored = shards.map_batches(
            Replica,
            fn_constructor_kwargs={"job": job, "plan": plan},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_cpus=job.cfg.cpus_per_replica,
            num_gpus=gpus,
        )
        total = len(plan)
        bar = tqdm(
            total=total,
            initial=total - len(todo),
            unit="shard",
            desc="rlkd cache (ray)",
            disable=not progress,
            dynamic_ncols=True,
        )
        rate = Rate()
        try:
            for row in _rows(scored):
                index, value = int(row["shard"]), json.loads(row["entry"])
                if "error" in value:
                    raise RlkdError(value["error"])
                rate.add(plan.shards[index].tokens, shard_done=True)
                bar.update(1)
                bar.set_postfix_str(str(rate))
                yield index, ShardEntry.from_json(value)
        finally:
            bar.close()
        log.info("%s (over all replicas, their start included)", rate.summary("Ray", len(todo)))
    finally:
        if ours:
            ray.shutdown()


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """The dataset's rows; an error in a replica (other than ours, which come back as rows)
    becomes one `RlkdError` with its message."""
    try:
        yield from dataset.iter_rows()
    except RlkdError:
        raise
    except Exception as e:  # Ray wraps a replica's failure in its own exception types
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise RlkdError(
            f"a Ray replica failed ({type(cause).__name__}: {' '.join(str(cause).split())[:500]})"
        ) from e
