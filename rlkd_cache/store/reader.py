"""Reading a cache: check the manifest, verify each shard's sha256, decode.

`Cache` trusts only what the manifest lists (its digest checked, its shard names only shard
file names), and reads through `CacheDir`. A shard whose bytes do not match the manifest's
sha256 is refused with an error naming it; so is one whose in-file checks fail (Parquet page
checksums, the codec's content CRC: `decode_shard`) or whose k, step, counts or token ids
disagree with the manifest. Decoding works a shard at a time (`Block`, flat arrays);
`rows()` splits blocks into per-sequence `CacheRow`s for tools and tests.

A cache on an object store is read the same way: each shard in one GET (retried when
transient, `store/files.py`), its sha256 checked on the bytes, decoded from memory. `blocks`
fetches and decodes the next `prefetch` shards in background threads while the caller works
on the current one (memory: that many decoded shards). With a `ShardCache` (`--local-cache`),
a shard's verified bytes are kept on local disk by sha256, so a second epoch or a second
student on the machine reads them from there.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.files import Files, StorageOptions
from rlkd_cache.store.layout import CacheDir, table_of
from rlkd_cache.store.manifest import Manifest
from rlkd_cache.store.shard_cache import ShardCache


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
    """A complete cache directory (a local folder or an fsspec URL), opened through its
    manifest: `manifest` is the document as read (for tools and tests), `info` its typed
    form (what the library reads)."""

    def __init__(
        self,
        path: str | Path | Files,
        storage_options: StorageOptions | None = None,
        local_cache: ShardCache | None = None,
    ):
        self.layout = CacheDir(path, storage_options)
        self.local_cache = local_cache
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

    def shard_bytes(self, index: int, verify: bool = True) -> bytes:
        """Shard `index`'s bytes, checked against the manifest's sha256 (from the local cache
        if it holds them, else read from the cache and then kept there)."""
        entry = self.info.shards[index]
        if self.local_cache is not None and (kept := self.local_cache.get(entry.sha256)):
            return kept
        data = checked_bytes(self.layout, entry.name, entry.sha256 if verify else None)
        if verify and self.local_cache is not None:
            self.local_cache.put(entry.sha256, data)
        return data

    def read_shard(self, index: int, verify: bool = True, data: bytes | None = None) -> codec.Block:
        """Decode shard `index` (or its bytes `data`, if read already), after checking its
        sha256 against the manifest; refuse one that disagrees with the manifest (k, step,
        rows, positions, tokens, token ids)."""
        entry = self.info.shards[index]
        path = self.layout.file(entry.name)
        if data is None:
            data = self.shard_bytes(index, verify)
        block = decode_bytes(data, path, self.info.k, self.info.logprob_step)
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

    def blocks(
        self, verify: bool = True, indices: Sequence[int] | None = None, prefetch: int = 1
    ) -> Iterator[codec.Block]:
        """The decoded shards `indices` (default: all, in manifest order), the next
        `prefetch` of them read and decoded in background threads (0: none)."""
        order = list(range(len(self.info.shards)) if indices is None else indices)
        if prefetch < 1:
            yield from (self.read_shard(i, verify) for i in order)
            return
        pool = ThreadPoolExecutor(prefetch, thread_name_prefix="rlkd-prefetch")
        later = iter(order[prefetch:])
        try:
            ahead = deque(pool.submit(self.read_shard, i, verify) for i in order[:prefetch])
            while ahead:
                block = ahead.popleft().result()
                for i in itertools.islice(later, 1):  # keep `prefetch` shards on the way
                    ahead.append(pool.submit(self.read_shard, i, verify))
                yield block
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def rows(self, verify: bool = True) -> Iterator[CacheRow]:
        for block in self.blocks(verify):
            yield from split_rows(block)


def checked_bytes(layout: CacheDir, name: str, sha256: str | None, what: str = "shard") -> bytes:
    """The bytes of the file `name` (a `what`) that `layout`'s manifest lists with `sha256`
    (None: not checked); raise `RlkdError` naming it when it is missing or its bytes have
    another sha256."""
    path = layout.file(name)
    try:
        data = layout.read_bytes(name)
    except FileNotFoundError:
        raise RlkdError(f"{path}: {what} listed in the manifest is missing") from None
    actual = hashlib.sha256(data).hexdigest() if sha256 is not None else None
    if actual != sha256:
        raise RlkdError(
            f"{path}: checksum mismatch (manifest sha256 {sha256[:16]}..., file {actual[:16]}...):"
            f" the {what} is corrupt; delete the cache and rerun"
        )
    return data


def decode_shard(
    layout: CacheDir, name: str, k: int | None = None, step: float | None = None
) -> codec.Block:
    """Read and decode the shard file `name` of `layout` (`decode_bytes`)."""
    return decode_bytes(layout.read_bytes(name), layout.file(name), k, step)


def decode_bytes(
    data: bytes, path: str | Path, k: int | None = None, step: float | None = None
) -> codec.Block:
    """Decode the bytes of the shard file `path`, checking its page checksums and content CRC
    (where it has them) and, if given, its k and step; raise `RlkdError` naming the file for
    any damage."""
    try:
        table = table_of(data)
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
