"""Streaming reader: a cache's rows in a seeded order, one shard in memory at a time.

Order of one epoch (a pure function of seed, epoch and partition):
1. the shards are visited in `rng.permutation` order, `rng = default_rng([seed, epoch])`;
2. a shard is decoded whole (sha256 checked), this reader's rows of it are permuted, and they
   pass through a shuffle buffer of `shuffle_buffer` rows: once the buffer is full, every new
   row replaces a uniformly drawn buffered row, which is yielded; at the end of the epoch the
   buffer is drained in random order. Rows can thus cross shard boundaries.

Partitioning. Every row has a global index `g` in `[0, N)` (manifest order: shard 0's rows,
then shard 1's, ...). With `world_size` ranks and, inside a `torch.utils.data.DataLoader`, `W`
workers per rank, there are `C = world_size * W` readers; reader `slot = rank * W + worker`
keeps the contiguous range `slot * N // C <= g < (slot + 1) * N // C`. The parts are disjoint,
cover the cache, differ in size by at most one row, and need no shard boundaries: with fewer
shards than readers, a shard is split between readers. A reader decodes only the shards that
overlap its range (about S / C + 1 of S), so adding readers does not multiply decoding (a
strided `g % C` split would make every reader decode every shard). A reader keeps the same
range every epoch; its rows are reshuffled. A reader whose range is empty (more readers than
rows) raises.

Memory: the decoded shard being read, the next `prefetch` shards (read and decoded in
background threads while this one trains: `Cache.blocks`), plus the buffered rows (copied
out of their shard, so a buffered row does not keep its whole shard alive).

Position and resume: `state_dict()` holds the epoch and how many rows of it this reader has
consumed (plus the shard and row of the last one, for humans). `load_state_dict()` makes the
next `rows()` re-read that epoch and skip the consumed rows, so the rows after a resume are
exactly those of the uninterrupted run. Inside DataLoader workers each worker iterates its
own copy of the reader, so the object in the main process does not advance: exact resume is
for in-process iteration (what the trainer does; see `batching.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.utils.data

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.reader import Cache, CacheRow, split_rows

Located = tuple[int, int, CacheRow]
"""(shard index in the manifest, row index within the shard, the row)."""


def reader_slot(rank: int, world_size: int) -> tuple[int, int]:
    """(slot, number of readers) of the calling process among ranks x DataLoader workers."""
    info = torch.utils.data.get_worker_info()
    workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
    return rank * workers + worker, world_size * workers


def _own(row: CacheRow) -> CacheRow:
    """A copy of `row` that does not hold a view of its shard's arrays."""
    return CacheRow(
        row.seq_id,
        row.input_ids.copy(),
        row.positions.copy(),
        row.topk_ids.copy(),
        row.topk_logprobs.copy(),
        row.target_logprobs.copy(),
    )


class CacheStream:
    """The rows of a cache, reshuffled every epoch, this reader's part only.

    `rows(epochs)` iterates from the current position (epoch 0, row 0 unless a state was
    loaded) and stops when `epochs` epochs are complete (never, if None); `epoch` says which
    epoch the last row came from. `epoch_rows(epoch)` is one epoch, independent of the
    position. `max_tokens` caps an epoch: it ends once this reader has read that many tokens
    (the row that reaches the cap is included); None reads the whole part.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        seed: int,
        shuffle_buffer: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        prefetch: int = 2,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise RlkdError(f"rank {rank} must be in [0, world_size={world_size})")
        if shuffle_buffer < 1:
            raise RlkdError(f"shuffle_buffer {shuffle_buffer} must be at least 1 row")
        if prefetch < 0:
            raise RlkdError(f"prefetch {prefetch} must be >= 0 shards")
        if max_tokens is not None and max_tokens < 1:
            raise RlkdError(f"max_tokens {max_tokens} must be at least 1 (or None)")
        self.cache = cache
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.max_tokens = max_tokens
        self.prefetch = prefetch
        shard_rows = np.array([s["rows"] for s in cache.shards], dtype=np.int64)
        self._first_row = codec.offsets(shard_rows)  # (S + 1,) global index of shard starts
        self.epoch = 0
        self._rows = 0  # rows of `epoch` consumed
        self._last: tuple[int, int] | None = None  # (shard, row) of the last row yielded

    def _located(self, epoch: int) -> Iterator[Located]:
        """This reader's rows of one epoch, shuffled, with where each comes from."""
        slot, readers = reader_slot(self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, epoch])
        total = int(self._first_row[-1])
        lo, hi = slot * total // readers, (slot + 1) * total // readers  # this reader's rows
        if lo == hi:
            raise RlkdError(
                f"reader {slot} of {readers} (rank {self.rank} of {self.world_size}) gets no "
                f"rows: {self.cache.layout} holds only {total} rows"
            )
        visits = []  # (shard, its rows of this reader in read order, buffer slots)
        for shard in rng.permutation(len(self._first_row) - 1).tolist():
            first, end = int(self._first_row[shard]), int(self._first_row[shard + 1])
            mine = rng.permutation(np.arange(max(first, lo), min(end, hi)) - first)
            picks = rng.integers(self.shuffle_buffer, size=len(mine))
            if len(mine):
                visits.append((shard, mine.tolist(), picks.tolist()))
        buffer: list[Located] = []
        blocks = self.cache.blocks(indices=[v[0] for v in visits], prefetch=self.prefetch)
        for (shard, mine, picks), block in zip(visits, blocks, strict=True):
            rows = list(split_rows(block))
            for r, j in zip(mine, picks, strict=True):
                item = (shard, r, _own(rows[r]))
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                out, buffer[j] = buffer[j], item
                yield out
        for j in rng.permutation(len(buffer)).tolist():
            yield buffer[j]

    def epoch_rows(self, epoch: int, skip: int = 0) -> Iterator[CacheRow]:
        """One epoch of this reader's rows, after skipping its first `skip` rows."""
        tokens = 0
        for n, (shard, r, row) in enumerate(self._located(epoch), start=1):
            tokens += len(row.input_ids)
            if n > skip:
                self.epoch, self._rows, self._last = epoch, n, (shard, r)
                yield row
            if self.max_tokens is not None and tokens >= self.max_tokens:
                return

    def rows(self, epochs: int | None = None) -> Iterator[CacheRow]:
        """Rows from the current position on, until `epochs` epochs are complete."""
        while epochs is None or self.epoch < epochs:
            yield from self.epoch_rows(self.epoch, skip=self._rows)
            self.epoch, self._rows = self.epoch + 1, 0

    def __iter__(self) -> Iterator[CacheRow]:
        return self.rows()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data: `epoch`, `rows` consumed in it, `shard`/`row` of the last row
        (manifest shard index and row within it; None before the first), and the settings
        that must match on resume."""
        shard, row = self._last if self._last is not None else (None, None)
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "rows": self._rows,
            "shard": shard,
            "row": row,
            "shuffle_buffer": self.shuffle_buffer,
            "rank": self.rank,
            "world_size": self.world_size,
            "max_tokens": self.max_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`; refuses a state taken with other settings (naming both)."""
        for key in ("seed", "shuffle_buffer", "rank", "world_size", "max_tokens"):
            if state[key] != getattr(self, key):
                raise RlkdError(
                    f"cannot resume the reader: the saved state has {key}={state[key]!r}, "
                    f"this reader has {key}={getattr(self, key)!r}"
                )
        self.epoch, self._rows = int(state["epoch"]), int(state["rows"])
        has_last = state["shard"] is not None
        self._last = (int(state["shard"]), int(state["row"])) if has_last else None
