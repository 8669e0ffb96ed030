"""Reading a cache: check the manifest, verify each shard's sha256, decode.

`Cache` trusts only what the manifest lists (its digest checked, its shard names only shard
file names), and reads through `CacheDir`. A shard whose bytes do not match the manifest's
sha256 is refused with an error naming it; so is one whose in-file checks fail (Parquet page
checksums, the codec's content CRC: `decode_shard`) or whose k, step, counts or token ids
disagree with the manifest. Decoding works a shard at a time (`Block`, flat arrays);
`rows()` splits blocks into per-sequence `CacheRow`s for tools and tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.manifest import Manifest


@dataclass
class CacheRow:
    """One cached sequence, decoded."""

    seq_id: str
    input_ids: np.ndarray  # (T,) int32
    positions: np.ndarray  # (P,) int32; position t predicts input_ids[t + 1]
    topk_ids: np.ndarray  # (P, k) int32
    topk_logprobs: np.ndarray  # (P, k) float32, descending
    target_logprobs: np.ndarray  # (P,) float32


class Cache:
    """A complete cache directory, opened through its manifest: `manifest` is the document as
    read (for tools and tests), `info` its typed form (what the library reads)."""

    def __init__(self, path: str | Path):
        self.layout = CacheDir(path)
        self.dir = self.layout.path
        self.manifest: dict[str, Any] = self.layout.read_manifest()
        self.info = Manifest.from_json(self.manifest, self.layout.file(CacheDir.MANIFEST))

    @property
    def k(self) -> int:
        return self.info.k

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The manifest's shard entries, as in the document."""
        return list(self.manifest["shards"])

    def read_shard(self, index: int, verify: bool = True) -> codec.Block:
        """Decode shard `index`, after checking its sha256 against the manifest; refuse one
        that disagrees with the manifest (k, step, rows, positions, tokens, token ids)."""
        entry = self.info.shards[index]
        path = self.layout.file(entry.name)
        if not self.layout.has(entry.name):
            raise RlkdError(f"{path}: shard listed in the manifest is missing")
        if verify:
            actual = self.layout.sha256(entry.name)
            if actual != entry.sha256:
                raise RlkdError(
                    f"{path}: checksum mismatch (manifest sha256 {entry.sha256[:16]}..., "
                    f"file {actual[:16]}...): the shard is corrupt; delete the cache and rerun"
                )
        block = decode_shard(self.layout, entry.name, self.info.k, self.info.logprob_step)
        counts = (len(block), block.pos_off[-1], block.tok_off[-1])
        if counts != (entry.rows, entry.positions, entry.tokens):
            raise RlkdError(f"{path}: rows, positions or tokens differ from the manifest")
        for ids in (block.input_ids, block.topk_ids):
            if ids.size and not 0 <= ids.min() <= ids.max() < self.info.vocab_size:
                raise RlkdError(
                    f"{path}: token ids outside the manifest's vocabulary "
                    f"(vocab_size {self.info.vocab_size})"
                )
        return block

    def blocks(self, verify: bool = True) -> Iterator[codec.Block]:
        for index in range(len(self.info.shards)):
            yield self.read_shard(index, verify)

    def rows(self, verify: bool = True) -> Iterator[CacheRow]:
        for block in self.blocks(verify):
            yield from split_rows(block)


def decode_shard(
    layout: CacheDir, name: str, k: int | None = None, step: float | None = None
) -> codec.Block:
    """Read and decode the shard file `name` of `layout`, checking its page checksums and
    content CRC (where it has them) and, if given, its k and step; raise `RlkdError` naming
    the file for any damage."""
    path = layout.file(name)
    try:
        table = layout.read_table(name)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise RlkdError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    try:
        return codec.decode(table, k, step)
    except RlkdError as e:
        raise RlkdError(f"{path}: {e}") from None


def split_rows(block: codec.Block) -> Iterator[CacheRow]:
    """Per-sequence views of a decoded block."""
    for r, seq_id in enumerate(block.seq_ids):
        t0, t1 = block.tok_off[r], block.tok_off[r + 1]
        p0, p1 = block.pos_off[r], block.pos_off[r + 1]
        yield CacheRow(
            seq_id,
            block.input_ids[t0:t1],
            block.positions[p0:p1],
            block.topk_ids[p0:p1],
            block.topk_logprobs[p0:p1],
            block.target_logprobs[p0:p1],
        )
