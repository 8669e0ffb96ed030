"""The shard plan: which rows of the dataset each shard holds, made in one streaming pass.

`ShardPlan.new` reads, templates and tokenizes the rows one at a time and keeps only two
integers per row (its positions and tokens; 0 for a skipped row), in a local temp file, not
in memory; a second pass over that file cuts the rows into shards of about equal positions.
No process holds the tokenized dataset: a shard's rows are tokenized again when it is scored
(`ShardPlan.sequences`), so memory is a shard's worth of rows whatever the dataset's size.

Shard i holds the dataset rows `[start, stop)` of its `PlannedShard` (the usable ones among
them, in order): contiguous runs of rows, cut where the running count of positions crosses
a multiple of the shard size. The plan is saved in the cache (`CacheDir.PLAN`) before any
shard is written, so a resumed run, every job-array worker and every Ray replica score the
same rows into the same shard; it also carries what `--finalize` needs for the manifest
(row shape, template, rows skipped by reason, rows truncated).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rlkd_cache.config import CacheConfig
from rlkd_cache.data import Preparation, Sequence, prepare_row
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.layout import CacheDir

log = logging.getLogger("rlkd.cache")

POSITIONS_PER_SHARD = 262_144
"""Default shard size: big enough that the per-shard codebook costs ~0.1 B/position,
small enough that a killed run loses little work."""

ROWS_PER_READ = 65_536
"""Rows of the planning pass's per-row counts written or read at once."""


@dataclass(frozen=True)
class PlannedShard:
    """One shard: the dataset rows `[start, stop)` (indices in the split), of which `rows`
    are usable, with `positions` distilled positions and `tokens` tokens in all."""

    start: int
    stop: int
    rows: int
    positions: int
    tokens: int


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one cache, and what planning found in the data."""

    shards: tuple[PlannedShard, ...]
    shape: str
    template: str
    skipped: dict[str, int]
    truncated: int

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def shard_rows(self) -> list[int]:
        return [s.rows for s in self.shards]

    @classmethod
    def new(
        cls,
        rows: Iterable[dict[str, Any]],
        how: Preparation,
        tokenizer: Any,
        cfg: CacheConfig,
        progress: Callable[[int], None] | None = None,
    ) -> ShardPlan:
        """Plan `rows` (the split, in order) in one streaming pass: `cfg.num_shards_hint`
        shards, else about `POSITIONS_PER_SHARD` positions each. `progress(n)` is told of
        every `n` rows read."""
        skipped: Counter[str] = Counter()
        truncated = 0
        with tempfile.TemporaryFile(prefix="rlkd-plan-") as counts:
            buffer: list[tuple[int, int]] = []
            for index, row in enumerate(rows):
                done = prepare_row(row, index, how, tokenizer, cfg)
                truncated += done.truncated
                seq = done.sequence
                if seq is None:
                    skipped[done.skipped or ""] += 1
                buffer.append((0, 0) if seq is None else (len(seq.positions), len(seq.input_ids)))
                if len(buffer) == ROWS_PER_READ:
                    counts.write(np.asarray(buffer, dtype=np.int32).tobytes())
                    buffer.clear()
                    if progress:
                        progress(ROWS_PER_READ)
            counts.write(np.asarray(buffer, dtype=np.int32).reshape(-1, 2).tobytes())
            if progress:
                progress(len(buffer))
            counts.seek(0)
            total = sum(int(chunk[:, 0].sum()) for chunk in _chunks(counts))
            if total == 0:
                raise RlkdError(
                    f"no usable rows in the dataset; skipped by reason: {dict(skipped)}"
                )
            hint = cfg.num_shards_hint
            per_shard = max(math.ceil(total / hint) if hint else POSITIONS_PER_SHARD, 1)
            counts.seek(0)
            shards = tuple(_cut(_chunks(counts), per_shard))
        return cls(shards, how.shape, how.template, dict(skipped), truncated)

    def owned(self, worker: int, workers: int) -> range:
        """The shards job-array worker `worker` of `workers` scores: worker, worker + workers,
        ..."""
        return range(worker, len(self.shards), workers)

    def sequences(
        self,
        index: int,
        rows: Iterable[dict[str, Any]],
        how: Preparation,
        tokenizer: Any,
        cfg: CacheConfig,
    ) -> list[Sequence]:
        """Shard `index`'s sequences, from `rows` (the dataset rows `[start, stop)` of the
        shard, in order), checked against the plan."""
        shard = self.shards[index]
        seqs = []
        for i, row in zip(range(shard.start, shard.stop), rows, strict=True):
            seq = prepare_row(row, i, how, tokenizer, cfg).sequence
            if seq is not None:
                seqs.append(seq)
        found = (len(seqs), sum(len(s.positions) for s in seqs))
        if found != (shard.rows, shard.positions):
            raise RlkdError(
                f"rows {shard.start}-{shard.stop - 1} of the dataset give {found[0]} sequences "
                f"with {found[1]} positions, but the cache's shard plan says {shard.rows} with "
                f"{shard.positions}: the data or tokenizer changed under the same name since "
                "the plan was made"
            )
        return seqs

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "shape": self.shape,
            "template": self.template,
            "skipped": self.skipped,
            "truncated": self.truncated,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, value: Any, fingerprint: str, where: object) -> ShardPlan | None:
        """The plan in a saved document; None if it is of another fingerprint or an older
        format (then planned again). `where` names the file in the error for a corrupt one."""
        if not isinstance(value, dict) or "shards" not in value:
            return None
        if value.get("fingerprint") != fingerprint:
            return None
        try:
            return cls(
                shards=tuple(PlannedShard(**s) for s in value["shards"]),
                shape=str(value["shape"]),
                template=str(value["template"]),
                skipped={str(k): int(v) for k, v in value["skipped"].items()},
                truncated=int(value["truncated"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RlkdError(f"{where}: corrupt shard plan ({e}); delete it and rerun") from None


def _chunks(counts: Any) -> Iterator[np.ndarray]:
    """The planning pass's (positions, tokens) per row, `ROWS_PER_READ` rows at a time."""
    while data := counts.read(ROWS_PER_READ * 8):
        yield np.frombuffer(data, dtype=np.int32).reshape(-1, 2)


def _cut(chunks: Iterable[np.ndarray], per_shard: int) -> Iterator[PlannedShard]:
    """Shards of consecutive rows: a usable row goes to shard number (positions before it) //
    `per_shard`, numbered densely; a skipped row goes with the row before it (the first shard
    starts at row 0)."""
    start = rows = positions = tokens = 0
    key: int | None = None
    before = 0
    index = 0
    for chunk in chunks:
        for p, t in chunk.tolist():
            if p:
                here = before // per_shard
                if key is not None and here != key:
                    yield PlannedShard(start, index, rows, positions, tokens)
                    start, rows, positions, tokens = index, 0, 0, 0
                key = here
                before += p
                rows += 1
                positions += p
                tokens += t
            index += 1
    yield PlannedShard(start, index, rows, positions, tokens)


def load_plan(layout: CacheDir, fingerprint: str, make: Callable[[], ShardPlan]) -> ShardPlan:
    """The cache's saved shard plan, else `make()`'s, saved. Where another worker saved one
    meanwhile, that one is used after checking that it is the same."""
    saved = layout.read_plan()
    where = layout.file(CacheDir.PLAN)
    plan = ShardPlan.from_json(saved, fingerprint, where)
    if plan is not None:
        log.info("using the saved shard plan of %s (%d shards)", layout, len(plan))
        return plan
    plan = make()
    try:
        layout.write_plan(plan.to_json(fingerprint), create=saved is None)
    except FileExistsError:
        theirs = ShardPlan.from_json(layout.read_plan(), fingerprint, where)
        if theirs != plan:
            raise RlkdError(
                f"{where}: another worker saved a different shard plan for the same inputs "
                "(the dataset or tokenizer differs between the machines?)"
            ) from None
    return plan
