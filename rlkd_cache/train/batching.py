"""Token-budget batches with length bucketing, as tensors ready for the student.

Rows come from a `CacheStream`. The batcher fills a window with about `window_batches`
batches' worth of tokens, sorts the window by length (stable), and cuts it greedily into
batches whose padded size (rows x longest row) stays within `batch_tokens`; the window's
batches then go out in a seeded random order (`default_rng([seed, epoch, window])`), so
short and long batches alternate. A row longer than `batch_tokens` gets a batch of its own:
it is never dropped or truncated, so such a batch exceeds the budget.

Resume is re-generate-and-skip: the state is the epoch and the number of batches consumed
in it; loading it re-reads the epoch and skips that many batches without building their
tensors, so the batches after a resume are exactly those of the uninterrupted run.
`PaddingMeter` keeps the running padding fraction (padded slots / all slots) for the logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.reader import CacheRow
from rlkd_cache.train.stream import CacheStream

TENSORS = (
    "input_ids",
    "attention_mask",
    "row",
    "pos",
    "topk_ids",
    "topk_logprobs",
    "target_ids",
    "target_logprobs",
)


@dataclasses.dataclass
class Batch:
    """One batch; distilled positions are flattened over the batch (N of them)."""

    seq_ids: list[str]
    input_ids: torch.Tensor  # (B, T) int64, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    row: torch.Tensor  # (N,) int64, batch row of each distilled position
    pos: torch.Tensor  # (N,) int64, index into T; position t predicts token t + 1
    topk_ids: torch.Tensor  # (N, k) int64, the teacher's top-k token ids
    topk_logprobs: torch.Tensor  # (N, k) float32, descending
    target_ids: torch.Tensor  # (N,) int64, = input_ids[row, pos + 1]
    target_logprobs: torch.Tensor  # (N,) float32, teacher log-prob of target_ids
    n_tokens: int  # real tokens, = attention_mask.sum()
    n_positions: int  # N
    padding_fraction: float  # padded slots / (B * T)

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (what `DataLoader(pin_memory=True)` calls)."""
        return dataclasses.replace(self, **{f: getattr(self, f).pin_memory() for f in TENSORS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {f: getattr(self, f).to(device, non_blocking=non_blocking) for f in TENSORS}
        return dataclasses.replace(self, **moved)


def collate(rows: Sequence[CacheRow], k: int | None = None) -> Batch:
    """Stack rows into a `Batch`, keeping the first `k` top-k columns (all if None)."""
    lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)  # (B,)
    n_pos = np.array([len(r.positions) for r in rows], dtype=np.int64)  # (B,)
    width = int(lengths.max())
    mask = np.arange(width) < lengths[:, None]  # (B, T)
    input_ids = np.zeros(mask.shape, dtype=np.int64)  # (B, T)
    input_ids[mask] = np.concatenate([r.input_ids for r in rows])  # row-major = row order
    row = np.repeat(np.arange(len(rows), dtype=np.int64), n_pos)  # (N,)
    pos = np.concatenate([r.positions for r in rows]).astype(np.int64)  # (N,)
    n_tokens = int(lengths.sum())
    return Batch(
        seq_ids=[r.seq_id for r in rows],
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        row=torch.from_numpy(row),
        pos=torch.from_numpy(pos),
        topk_ids=torch.from_numpy(
            np.concatenate([r.topk_ids[:, :k] for r in rows]).astype(np.int64)
        ),
        topk_logprobs=torch.from_numpy(np.concatenate([r.topk_logprobs[:, :k] for r in rows])),
        target_ids=torch.from_numpy(input_ids[row, pos + 1]),
        target_logprobs=torch.from_numpy(np.concatenate([r.target_logprobs for r in rows])),
        n_tokens=n_tokens,
        n_positions=len(pos),
        padding_fraction=1.0 - n_tokens / mask.size,
    )


def plan_window(lengths: np.ndarray, batch_tokens: int, bucketing: bool = True) -> list[list[int]]:
    """Cut a window of rows with `lengths` (R,) into batches of row indices, in order of
    length (bucketing) or of arrival, each batch's rows x longest <= batch_tokens (a row
    longer than that alone)."""
    order = np.argsort(lengths, kind="stable") if bucketing else np.arange(len(lengths))
    plans: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        longest = max(longest, int(lengths[i]))
        if current and (len(current) + 1) * longest > batch_tokens:
            plans.append(current)
            current, longest = [], int(lengths[i])
        current.append(i)
    if current:
        plans.append(current)
    return plans


class PaddingMeter:
    """Running padding fraction over the batches seen: padded slots / all slots."""

    def __init__(self) -> None:
        self.slots = 0
        self.padded = 0

    def update(self, batch: Batch) -> None:
        self.slots += batch.input_ids.numel()
        self.padded += batch.input_ids.numel() - batch.n_tokens

    def fraction(self) -> float:
        """Padded slots / all slots so far (0.0 before the first batch)."""
        return self.padded / self.slots if self.slots else 0.0


class TokenBatcher:
    """Batches of about `batch_tokens` padded tokens from a stream, epoch after epoch.

    `batches(epochs)` iterates from the current position and stops when `epochs` epochs are
    complete (never, if None); `epoch` is the epoch of the last batch. The batch order is
    seeded by the stream's seed. `k` keeps the first k of the cache's top-k columns.
    `pin_memory` pins each batch (only where CUDA is available). `padding` is the running
    `PaddingMeter` of the batches yielded (kept across resumes).
    """

    def __init__(
        self,
        stream: CacheStream,
        *,
        batch_tokens: int,
        k: int | None = None,
        window_batches: int = 64,
        bucketing: bool = True,
        pin_memory: bool = False,
    ):
        if batch_tokens < 1 or window_batches < 1:
            raise RlkdError(f"batch_tokens {batch_tokens} and window_batches must be >= 1")
        if k is not None and not 1 <= k <= stream.cache.k:
            raise RlkdError(
                f"k={k} asked, but the cache {stream.cache.layout} has k={stream.cache.k}"
            )
        self.stream = stream
        self.batch_tokens = batch_tokens
        self.k = k
        self.window_batches = window_batches
        self.bucketing = bucketing
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.padding = PaddingMeter()
        self.epoch = 0
        self._batches = 0  # batches of `epoch` consumed

    def epoch_plans(self, epoch: int) -> Iterator[list[CacheRow]]:
        """The rows of each batch of one epoch, in emission order."""
        window: list[CacheRow] = []
        tokens, index = 0, 0
        for row in self.stream.epoch_rows(epoch):
            window.append(row)
            tokens += len(row.input_ids)
            if tokens >= self.window_batches * self.batch_tokens:
                yield from self._cut(window, epoch, index)
                window, tokens, index = [], 0, index + 1
        if window:
            yield from self._cut(window, epoch, index)

    def _cut(self, window: list[CacheRow], epoch: int, index: int) -> Iterator[list[CacheRow]]:
        lengths = np.array([len(r.input_ids) for r in window], dtype=np.int64)
        plans = plan_window(lengths, self.batch_tokens, self.bucketing)
        rng = np.random.default_rng([self.stream.seed, epoch, index])
        for b in rng.permutation(len(plans)).tolist():
            yield [window[i] for i in plans[b]]

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """One epoch of batches, after skipping (unbuilt) its first `skip` batches."""
        for n, rows in enumerate(self.epoch_plans(epoch), start=1):
            if n > skip:
                batch = collate(rows, self.k)
                yield batch.pin_memory() if self.pin_memory else batch

    def batches(self, epochs: int | None = None) -> Iterator[Batch]:
        """Batches from the current position on, until `epochs` epochs are complete."""
        while epochs is None or self.epoch < epochs:
            for batch in self.epoch_batches(self.epoch, skip=self._batches):
                self._batches += 1
                self.padding.update(batch)
                yield batch
            self.epoch, self._batches = self.epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data: `epoch`, `batches` consumed in it, the running padding counts,
        the settings that must match on resume, and the stream's state (`stream`: where
        the reader is, read-ahead window included; informational)."""
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "batch_tokens": self.batch_tokens,
            "k": self.k,
            "window_batches": self.window_batches,
            "bucketing": self.bucketing,
            "padding": {"slots": self.padding.slots, "padded": self.padding.padded},
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`; refuses a state taken with other settings (naming both)."""
        for key in ("batch_tokens", "k", "window_batches", "bucketing"):
            if state[key] != getattr(self, key):
                raise RlkdError(
                    f"cannot resume the batcher: the saved state has {key}={state[key]!r}, "
                    f"this batcher has {key}={getattr(self, key)!r}"
                )
        self.stream.load_state_dict(state["stream"])
        self.epoch, self._batches = int(state["epoch"]), int(state["batches"])
        self.padding.slots = int(state["padding"]["slots"])
        self.padding.padded = int(state["padding"]["padded"])


class EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of a batcher's batches for `DataLoader(dataset, batch_size=None,
    num_workers=W)`: each worker batches its own part of the rows (see `stream.py`). The
    batcher in the main process does not advance, so exact resume needs in-process
    iteration (`TokenBatcher.batches`)."""

    def __init__(self, batcher: TokenBatcher, epoch: int):
        self.batcher = batcher
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.batcher.epoch_batches(self.epoch)
