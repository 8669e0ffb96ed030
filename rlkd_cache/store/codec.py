"""Encoding of teacher top-k rows into Arrow tables (one Parquet shard) and back.

Per distilled position the teacher gives k token ids with log-probs sorted descending, and
the log-prob of the actual next token. Stored per sequence (one Parquet row):

- `seq_id` string; `input_ids` list<int32>; `positions` list<int32> (sorted, t predicts t+1).
- `topk_codes` list<int32>: the top-k ids as codes of a per-shard codebook that sorts ids by
  how often they occur in the shard's top-k lists (frequent ids get small codes, so their
  high bytes are zero). Where the actual next token is in the top-k its code is left out:
  the reader restores it from `input_ids` (it is the target ~80% of the time on real text).
- `target_rank` list<int32>: rank of the actual next token in the top-k, or k if outside.
- `lp_top` list<int32> and `lp_gaps` list<int32>: log-probs quantized to `step` nats,
  q = round(-lp / step); `lp_top` holds q of rank 0 per position and `lp_gaps` the k - 1 gaps
  q[r] - q[r-1] along rank (small, non-negative). The largest decoding error is step / 2.
- `target_extra` list<int32>: for positions whose target is outside the top-k, its quantized
  log-prob minus the k-th quantized value (small, usually >= 0).

The integer columns use Parquet's BYTE_STREAM_SPLIT encoding, so zstd sees each byte plane
separately (the high planes are nearly all zero). Every column stays readable by stock
Parquet tools; `rlkd export` writes the plain decoded form. Decoding is vectorized over a
whole table. Figures are in `docs/cache-format.md` (from `benchmarks/store.py`).

Integrity: the metadata carries a CRC-32 of the table's content (`CHECK_KEY`), which
`decode` checks before decoding. Parquet page checksums cover page data only; this covers
what they leave out (page headers, the footer: row counts, types, offsets, the codebook and
the step), so a damaged shard is refused instead of decoding to different values.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import zstandard

from rlkd_cache.errors import RlkdError

MAX_Q = 2**30
"""Quantized values are clipped here: -inf log-probs are stored as -MAX_Q * step."""

INT_COLUMNS = (
    "input_ids",
    "positions",
    "topk_codes",
    "target_rank",
    "lp_top",
    "lp_gaps",
    "target_extra",
)

SCHEMA = pa.schema([("seq_id", pa.string())] + [(c, pa.list_(pa.int32())) for c in INT_COLUMNS])

CODEBOOK_KEY = b"rlkd.codebook"
K_KEY = b"rlkd.k"
STEP_KEY = b"rlkd.step"
CHECK_KEY = b"rlkd.crc32"
"""CRC-32 (hex) of the content: the codec metadata and every column (`content_crc`)."""


@dataclass
class Block:
    """Decoded rows of many sequences as flat arrays (what the codec works on).

    Row r owns `input_ids[tok_off[r]:tok_off[r+1]]` and positions `pos_off[r]:pos_off[r+1]`
    of `positions`, `topk_ids`, `topk_logprobs` and `target_logprobs`.
    """

    seq_ids: list[str]
    input_ids: np.ndarray  # (N_tok,) int32
    tok_off: np.ndarray  # (R + 1,) int64
    positions: np.ndarray  # (N_pos,) int32, relative to the row's first token
    pos_off: np.ndarray  # (R + 1,) int64
    topk_ids: np.ndarray  # (N_pos, k) int32
    topk_logprobs: np.ndarray  # (N_pos, k) float32, descending
    target_logprobs: np.ndarray  # (N_pos,) float32

    @classmethod
    def from_sequences(
        cls,
        seq_ids: Sequence[str],
        input_ids: Sequence[np.ndarray],
        positions: Sequence[np.ndarray],
        topk_ids: Sequence[np.ndarray],
        topk_logprobs: Sequence[np.ndarray],
        target_logprobs: Sequence[np.ndarray],
    ) -> Block:
        """A block of R sequences from their own arrays, row r's being `input_ids[r]` (T_r,),
        `positions[r]` (P_r,), `topk_ids[r]` and `topk_logprobs[r]` (P_r, k) and
        `target_logprobs[r]` (P_r,)."""
        return cls(
            seq_ids=list(seq_ids),
            input_ids=np.concatenate(input_ids).astype(np.int32),
            tok_off=offsets(np.array([len(t) for t in input_ids])),
            positions=np.concatenate(positions).astype(np.int32),
            pos_off=offsets(np.array([len(p) for p in positions])),
            topk_ids=np.concatenate(topk_ids).astype(np.int32),
            topk_logprobs=np.concatenate(topk_logprobs).astype(np.float32),
            target_logprobs=np.concatenate(target_logprobs).astype(np.float32),
        )

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def __len__(self) -> int:
        return len(self.seq_ids)

    def next_tokens(self) -> np.ndarray:
        """The actual next token at every position: input_ids[t + 1] of its row. (N_pos,)"""
        row = np.repeat(np.arange(len(self)), np.diff(self.pos_off))
        return self.input_ids[self.tok_off[:-1][row] + self.positions + 1]


ARRAYS = tuple(f.name for f in fields(Block) if f.name != "seq_ids")
"""The names of a `Block`'s arrays, in field order (what two blocks compare equal on)."""


def offsets(lengths: np.ndarray) -> np.ndarray:
    """Offsets (R + 1,) from per-row lengths (R,)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(values: np.ndarray, offs: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(offs.astype(np.int32)), pa.array(values.astype(np.int32))
    )


def build_codebook(ids: np.ndarray) -> np.ndarray:
    """Token ids in code order: by frequency bucket (floor(log2(count)), most frequent first),
    then by id. Buckets instead of exact counts keep the stored codebook small (sorted ids
    delta-code well) while frequent ids still get small codes."""
    counts = np.bincount(ids.ravel())
    used = np.flatnonzero(counts)
    bucket = np.floor(np.log2(counts[used])).astype(np.int64)
    return used[np.lexsort((used, -bucket))]


def encode_codebook(order: np.ndarray) -> bytes:
    """Serialize a codebook: run lengths of its ascending runs, then the id deltas within
    runs, as little-endian uint32 byte planes under zstd, base64 for the metadata."""
    starts = np.flatnonzero(np.r_[True, np.diff(order) <= 0])  # ascending runs (buckets)
    runs = np.diff(np.append(starts, len(order)))
    deltas = np.diff(order, prepend=0)
    deltas[starts] = order[starts]
    words = np.concatenate([[len(runs)], runs, deltas]).astype("<u4")
    planes = words.view(np.uint8).reshape(-1, 4).T.tobytes()
    return base64.b64encode(zstandard.compress(planes, 19))


def decode_codebook(blob: bytes) -> np.ndarray:
    planes = np.frombuffer(zstandard.decompress(base64.b64decode(blob)), dtype=np.uint8)
    words = planes.reshape(4, -1).T.copy().view("<u4").ravel().astype(np.int64)
    n_runs = int(words[0])
    runs, deltas = words[1 : 1 + n_runs], words[1 + n_runs :]
    run_start = offsets(runs)[:-1]
    deltas = deltas.copy()
    # cumulative sum that restarts at every run: subtract the running total at run starts
    total = np.cumsum(deltas)
    base = np.repeat(total[run_start] - deltas[run_start], runs)
    return (total - base).astype(np.int32)


def encode(block: Block, step: float) -> pa.Table:
    """Encode a block as an Arrow table (with the codebook in its schema metadata)."""
    k = block.k
    ids, lp = block.topk_ids.astype(np.int64), block.topk_logprobs
    if lp.size and np.any(np.diff(lp, axis=1) > 0):
        raise RlkdError("teacher log-probs must be sorted descending along rank")
    order = build_codebook(ids)
    code_of = np.zeros(max(int(ids.max(initial=0)) + 1, 1), dtype=np.int64)
    code_of[order] = np.arange(len(order))
    nxt = block.next_tokens().astype(np.int64)
    match = ids == nxt[:, None]  # (N_pos, k); at most one True per row (ids are distinct)
    in_top = match.any(axis=1)
    rank = np.where(in_top, match.argmax(axis=1), k)
    q = np.clip(np.rint(-lp.astype(np.float64) / step), 0, MAX_Q).astype(np.int64)  # (N_pos, k)
    gaps = np.diff(q, axis=1)  # (N_pos, k - 1), >= 0
    q_target = np.clip(np.rint(-block.target_logprobs.astype(np.float64) / step), 0, MAX_Q)
    extra = (q_target.astype(np.int64) - q[:, -1])[~in_top]
    row_pos = np.diff(block.pos_off)
    row_of_pos = np.repeat(np.arange(len(block)), row_pos)
    kept = (~match).sum(axis=1)
    arrays = [
        pa.array(block.seq_ids, pa.string()),
        _list(block.input_ids, block.tok_off),
        _list(block.positions, block.pos_off),
        _list(
            code_of[ids[~match]],
            offsets(np.bincount(row_of_pos, kept, len(block)).astype(np.int64)),
        ),
        _list(rank, block.pos_off),
        _list(q[:, 0], block.pos_off),
        _list(gaps.ravel(), block.pos_off * (k - 1)),
        _list(extra, offsets(np.bincount(row_of_pos, ~in_top, len(block)).astype(np.int64))),
    ]
    meta = {
        CODEBOOK_KEY: encode_codebook(order),
        K_KEY: str(k).encode(),
        STEP_KEY: repr(step).encode(),
    }
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    meta[CHECK_KEY] = content_crc(meta, *_columns(table)).encode()
    return table.replace_schema_metadata(meta)


Columns = dict[str, tuple[np.ndarray, np.ndarray]]
"""Each integer column's (values, offsets from 0), as Parquet decoded them (`_columns`)."""


def _columns(table: pa.Table) -> tuple[list[str], Columns]:
    """A table's seq ids and integer columns, flat, whatever their chunking."""
    try:
        seq_ids = table.column("seq_id").to_pylist()
    except UnicodeDecodeError:
        raise RlkdError("shard seq ids are not UTF-8") from None
    columns = {}
    for name in INT_COLUMNS:
        col = table.column(name).combine_chunks()
        offs = col.offsets.to_numpy().astype(np.int64)
        columns[name] = (col.values.to_numpy()[offs[0] : offs[-1]], offs - offs[0])
    return seq_ids, columns


def content_crc(meta: Mapping[bytes, bytes], seq_ids: list[str], columns: Columns) -> str:
    """CRC-32 (8 hex digits) of a shard's content: the codec metadata, the seq ids, and each
    integer column's offsets and values, each part prefixed by its size."""
    parts: list[bytes | np.ndarray] = [meta[CODEBOOK_KEY], meta[K_KEY], meta[STEP_KEY]]
    parts.append(json.dumps(seq_ids).encode())
    for name in INT_COLUMNS:
        values, offs = columns[name]
        parts += [offs.astype("<i8"), values.astype("<i4", copy=False)]
    crc = 0
    for part in parts:
        crc = zlib.crc32(len(part).to_bytes(8, "little"), crc)
        crc = zlib.crc32(memoryview(part).cast("B"), crc)
    return f"{crc:08x}"


def _checked(table: pa.Table) -> tuple[list[str], Columns]:
    """`_columns`, after checking the table has the columns of `SCHEMA` and, if its metadata
    has a content CRC (shards written before it have none), that its content matches it;
    raise `RlkdError` otherwise."""
    try:
        types = {f.name: f.type for f in table.schema}
    except UnicodeDecodeError:
        raise RlkdError("shard column names are not UTF-8") from None
    for field in SCHEMA:
        if types.get(field.name) != field.type:
            raise RlkdError(f"shard column {field.name!r} is missing or not {field.type}")
    seq_ids, columns = _columns(table)
    meta = table.schema.metadata or {}
    if CHECK_KEY in meta:
        try:
            actual = content_crc(meta, seq_ids, columns)
        except KeyError as e:
            raise RlkdError(f"shard metadata is missing {e}") from None
        if actual.encode() != meta[CHECK_KEY]:
            raise RlkdError(
                f"shard content fails its check (CRC-32 {actual}, recorded "
                f"{meta[CHECK_KEY][:8]!r}): the file is damaged"
            )
    return seq_ids, columns


def decode(table: pa.Table, k: int | None = None, step: float | None = None) -> Block:
    """Decode a table written by `encode` (metadata included) back to a Block, after its
    content check; with `k` or `step`, a table encoded with another k or step is refused."""
    seq_ids, columns = _checked(table)
    meta = table.schema.metadata or {}
    try:
        shard_k, shard_step = int(meta[K_KEY]), float(meta[STEP_KEY])
        codebook = decode_codebook(meta[CODEBOOK_KEY])
    except (KeyError, ValueError, IndexError, zstandard.ZstdError) as e:
        raise RlkdError(f"shard metadata is missing or corrupt ({e})") from None
    if shard_k < 1 or not 0 < shard_step < float("inf"):
        raise RlkdError(f"shard metadata is corrupt (k={shard_k}, step={shard_step})")
    for name, value, expected in (("k", shard_k, k), ("step", shard_step, step)):
        if expected is not None and value != expected:
            raise RlkdError(f"shard has {name}={value}, the manifest says {expected}")
    return _decode(seq_ids, columns, shard_k, shard_step, codebook)


def _decode(
    seq_ids: list[str], columns: Columns, k: int, step: float, codebook: np.ndarray
) -> Block:
    """The body of `decode`: a Block from the columns of a shard with this k, step and
    codebook."""
    input_ids, tok_off = columns["input_ids"]
    positions, pos_off = columns["positions"]
    codes, _ = columns["topk_codes"]
    rank, _ = columns["target_rank"]
    top, _ = columns["lp_top"]
    gaps, _ = columns["lp_gaps"]
    extra, _ = columns["target_extra"]
    n = len(positions)
    row_len = np.diff(tok_off)[np.repeat(np.arange(len(tok_off) - 1), np.diff(pos_off))]
    if (
        len(rank) != n
        or len(top) != n
        or len(gaps) != n * (k - 1)
        or np.any((rank < 0) | (rank > k))
        or np.any((positions < 0) | (positions >= row_len - 1))  # t + 1 is in its row
    ):
        raise RlkdError("shard columns are inconsistent (positions, ranks and log-probs differ)")
    block = Block(
        seq_ids,
        input_ids,
        tok_off,
        positions,
        pos_off,
        np.empty((n, k), np.int32),
        np.empty((n, k), np.float32),
        np.empty(n, np.float32),
    )
    dq = np.empty((n, k), dtype=np.int64)
    dq[:, 0], dq[:, 1:] = top, gaps.reshape(n, k - 1)
    q = np.cumsum(dq, axis=1)  # (N_pos, k)
    block.topk_logprobs[:] = q * -step
    in_top = rank < k
    elided = np.zeros((n, k), dtype=bool)
    elided[np.flatnonzero(in_top), rank[in_top]] = True
    if codes.size != n * k - in_top.sum() or extra.size != n - in_top.sum():
        raise RlkdError("shard columns are inconsistent (codes or targets of the wrong length)")
    if codes.size and (codes.min() < 0 or codes.max() >= len(codebook)):
        raise RlkdError("shard codes fall outside its codebook")
    nxt = block.next_tokens()
    block.topk_ids[~elided] = codebook[codes]
    block.topk_ids[elided] = nxt[in_top]
    target = np.empty(n, dtype=np.float32)
    target[in_top] = block.topk_logprobs[in_top, rank[in_top]]
    target[~in_top] = (q[~in_top, -1] + extra) * -step
    block.target_logprobs[:] = target
    return block
