"""Training on many processes (torchrun): the process group, DDP / FSDP2 wrapping, collectives.

`init_world` starts the process group when torchrun's variables say there are 2+ ranks
(`WORLD_SIZE`, `RANK`, `LOCAL_RANK`): NCCL on `cuda:LOCAL_RANK`, gloo on the CPU. Without
them, or with one rank, `World()` is the single process and every collective below is the
identity, so one-process training runs exactly the code it ran before.

Wrapping (`wrap`). The student goes inside `StepModule`, whose forward runs a step function
(`step.micro_step`, `evaluate.batch_sums`) on it, so DDP and FSDP2 see every micro-step as
the forward of the module they wrap; their hooks need that (DDP prepares its reducer there;
FSDP2 all-gathers the embeddings, final norm and LM head there and keeps them gathered until
the backward, so `distill_loss` can apply the head weight, tied or not, a chunk at a time).
- DDP: gradients SUMMED over ranks by a comm hook (`_sum_hook`), not averaged; the loss is
  already divided by the global count of distilled positions.
- FSDP2 (`fully_shard`): each decoder layer (the student's `_no_split_modules`) is one unit,
  and `StepModule` the root unit holding the embeddings, final norm and LM head; gradients
  summed too (divide factor 1, sum-only reductions).
Gradient accumulation: `grad_sync` turns synchronization off (DDP `no_sync`, FSDP2
`set_requires_gradient_sync(False)`) on every micro-batch but the step's last.

Lockstep. Collectives need every rank to run the same number of forwards and backwards: a
rank that has no batch left runs `empty_batch()` (one token, no distilled position: loss sum
0, count 0, zero gradients) while another rank still has data (`lockstep`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rlkd_cache.config import Parallel, pick_device
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.batching import Batch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, computing on `device`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """Whether `init_world` started the process group (and `close` ends it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder's files."""
        return self.rank == 0

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64: counts stay exact up to 2**53)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 only; its result, or the `RlkdError` it raised, on every rank
        (so a refusal stops every rank with the same one line, and no rank waits for it)."""
        if self.size == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except RlkdError as e:
                box[0] = (False, str(e))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise RlkdError(value)
        return value

    def agree(self, identities: dict[str, str]) -> None:
        """Refuse, on every rank, a job whose ranks differ in one of `identities` (what the
        rank trains on: config, caches, student), naming it and both values."""
        first, *others = self.gather(identities)
        for rank, theirs in enumerate(others, start=1):
            for what, value in first.items():
                if theirs.get(what) != value:
                    raise RlkdError(
                        f"rank {rank} and rank 0 differ in {what} ({theirs.get(what)} vs "
                        f"{value}): every rank must run the same command on the same cache "
                        "and student"
                    )

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group, if `init_world` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: str) -> World:
    """The world torchrun describes (a process group started on the right device and
    backend), or the single process when there is no torchrun or only one rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device)
    if size <= 1:
        return World(device=chosen)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        if chosen.index is not None:
            raise RlkdError(
                f"--device {device} names one GPU; under torchrun every rank takes "
                "cuda:LOCAL_RANK: use --device cuda (or auto)"
            )
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    elif chosen.type != "cpu":
        raise RlkdError(f"--device {device}: torchrun training runs on CUDA (nccl) or cpu (gloo)")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local, chosen, owns)


class StepModule(torch.nn.Module):
    """The student, inside a module whose forward runs `fn(student, *args)`: what DDP and
    FSDP2 wrap, so a micro-step is their module's forward (see the module docstring)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.student, *args)


def _sum_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP comm hook (state: None, bucket: dist.GradBucket) -> Future[Tensor]: all-reduce a
    gradient bucket as a SUM (DDP's default averages). Not annotated: DDP compares the
    annotations with the real classes, and this module's are strings (PEP 563)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def decoder_layers(student: torch.nn.Module) -> list[torch.nn.Module]:
    """The student's repeated blocks (the classes its `_no_split_modules` names)."""
    names = set(getattr(student, "_no_split_modules", None) or ())
    layers = [m for m in student.modules() if type(m).__name__ in names]
    if not layers:
        raise RlkdError(
            f"--parallel fsdp: cannot find the decoder layers of {type(student).__name__} "
            "(it names no _no_split_modules); use --parallel ddp"
        )
    return layers


def wrap(student: torch.nn.Module, parallel: Parallel, world: World) -> torch.nn.Module:
    """The model the training step runs: the student itself in one process, else the student
    in a `StepModule` under DDP or FSDP2 (gradients summed over ranks in both)."""
    if world.size == 1:
        return student
    module = StepModule(student)
    if parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.13 renames the flag; older torch lacks the new
            warnings.simplefilter("ignore", FutureWarning)
            # buffers (rotary tables) stay each rank's own: no broadcast before every forward
            ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(student):
        fully_shard(layer)
    fully_shard(module)
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return module


def unwrap(model: torch.nn.Module) -> Any:
    """The student inside `model` (a `wrap` result)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.student if isinstance(model, StepModule) else model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is an FSDP2-sharded `wrap` result."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def call(model: torch.nn.Module, fn: Callable[..., T], *args: Any) -> T:
    """`fn(student, *args)`, through the wrapper's forward when `model` is wrapped."""
    if isinstance(model, (DistributedDataParallel, StepModule)):
        return model(fn, *args)
    return fn(model, *args)


def grad_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """The context of one micro-batch: gradients synchronized across ranks only if `sync`
    (the step's last micro-batch); a no-op for an unwrapped student."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    return contextlib.nullcontext()


def empty_batch(k: int) -> Batch:
    """The padding micro-batch: one token (id 0, attended), no distilled position."""
    none = torch.zeros(0, dtype=torch.int64)
    return Batch(
        seq_ids=[],
        input_ids=torch.zeros(1, 1, dtype=torch.int64),
        attention_mask=torch.ones(1, 1, dtype=torch.int64),
        row=none,
        pos=none,
        topk_ids=torch.zeros(0, k, dtype=torch.int64),
        topk_logprobs=torch.zeros(0, k),
        target_ids=none,
        target_logprobs=torch.zeros(0),
        n_tokens=0,
        n_positions=0,
        padding_fraction=0.0,
    )


def lockstep(batches: Iterable[Batch], world: World, pad: Batch) -> Iterator[Batch]:
    """`batches`, then `pad` as long as another rank still has batches: every rank yields
    the same number (one small all-reduce per batch; the identity in one process)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not world.max([batch is not None])[0]:
            return
        yield pad if batch is None else batch


def student_checksum(student: torch.nn.Module) -> str:
    """Names, shapes, dtypes and an exact integer checksum of the weights' bit patterns (a
    sum of integers does not depend on the order it is taken in, unlike a float sum)."""
    digest = hashlib.sha256()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, tensor in student.state_dict().items():
        flat = tensor.detach().contiguous().reshape(-1).view(bits[tensor.element_size()])
        total = int(flat.sum(dtype=torch.int64))
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {total};".encode())
    return digest.hexdigest()[:16]


def cache_identity(cache: Cache) -> str:
    """A cache's fingerprint (its folder name) and the sha256 of its shard list."""
    shards = json.dumps(cache.shards, sort_keys=True, default=str).encode()
    return f"{cache.layout.name} (shards {hashlib.sha256(shards).hexdigest()[:12]})"
