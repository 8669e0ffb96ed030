"""One owner of the cache directory: `store/` names every file in it, writes go through the
one atomic helper, and the manifest is read typed. Pure filesystem and numpy: no teacher."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec
from rlkd_cache.store.atomic import TEMP_GLOB, atomic_dir, atomic_path, write_json_atomic
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.manifest import (
    BackendInfo,
    Manifest,
    ResponsesInfo,
    TeacherInfo,
    TokenizerInfo,
)
from rlkd_cache.store.reader import Cache, split_rows
from rlkd_cache.store.writer import CacheWriter
from rlkd_cache.train.batching import plan_window

LAYOUT_NAMES = ("manifest.json", "plan.json", "probe.json", "responses.parquet", "shard-", ".tmp")


def sources_outside_store() -> list[Path]:
    store = REPO / "rlkd_cache" / "store"
    files = [*(REPO / "rlkd_cache").rglob("*.py"), *(REPO / "cli").rglob("*.py")]
    files += (REPO / "benchmarks").glob("*.py")
    return [p for p in files if store not in p.parents]


def code_strings(tree: ast.AST) -> list[str]:
    """Every string constant of a module except docstrings (bare string statements)."""
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def is_manifest(node: ast.AST) -> bool:
    """`X.manifest`: the raw manifest document, which the library reads as `X.info`."""
    return isinstance(node, ast.Attribute) and node.attr == "manifest"


@pytest.mark.parametrize("path", sources_outside_store(), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_outside_store_knows_the_layout_or_writes_by_hand(path: Path):
    tree = ast.parse(path.read_text())
    for text in code_strings(tree):
        for name in LAYOUT_NAMES:
            assert name not in text, f"{path} names {name!r} in {text!r}: ask store/ instead"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("fsync", "getpid"), (
                f"{path}:{node.lineno}: hand-made atomic write; use rlkd_cache.store.atomic"
            )
        if isinstance(node, ast.Subscript):
            assert not is_manifest(node.value), f"{path}:{node.lineno}: use `cache.info`"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert not is_manifest(node.func.value), f"{path}:{node.lineno}: use `cache.info`"


def test_atomic_path_replaces_only_on_success(tmp_path: Path):
    final = tmp_path / "out.json"
    final.write_text("old")
    with pytest.raises(ValueError), atomic_path(final) as tmp:
        assert tmp.parent == final.parent and str(os.getpid()) in tmp.name
        assert tmp.match(TEMP_GLOB)
        tmp.write_text("half")
        raise ValueError("killed mid-write")
    assert final.read_text() == "old" and sorted(tmp_path.iterdir()) == [final]
    write_json_atomic(final, {"b": 1, "a": [2]})
    assert final.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(tmp_path.iterdir()) == [final]


def test_atomic_dir_replaces_a_folder_only_on_success(tmp_path: Path):
    final = tmp_path / "step-1"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("two")
        raise OSError("disk full")
    assert (final / "a.txt").read_text() == "one" and sorted(tmp_path.iterdir()) == [final]
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def random_sequences(rng: np.random.Generator, rows: int, k: int) -> list[dict[str, np.ndarray]]:
    """Per-sequence teacher rows as a teacher gives them: the target's log-prob is its top-k
    entry when the next token is in the top-k, else below the k-th."""
    out = []
    for _ in range(rows):
        length = int(rng.integers(2, 30))
        input_ids = rng.integers(0, 50, size=length)
        positions = np.sort(
            rng.choice(length - 1, size=int(rng.integers(0, length)), replace=False)
        )
        ids = np.array([rng.choice(50, k, replace=False) for _ in positions]).reshape(-1, k)
        logprobs = -np.sort(rng.exponential(2.0, size=(len(positions), k)), axis=1)
        match = ids == input_ids[positions + 1][:, None]  # (P, k)
        below = logprobs[:, -1] - rng.exponential(1.0, size=len(positions))
        target = np.where(match.any(axis=1), (logprobs * match).sum(axis=1), below)
        out.append(
            {
                "input_ids": input_ids,
                "positions": positions,
                "topk_ids": ids,
                "topk_logprobs": logprobs,
                "target_logprobs": target,
            }
        )
    return out


def test_block_from_sequences_round_trips_through_the_codec():
    seqs = random_sequences(np.random.default_rng(0), rows=20, k=6)
    fields = ("input_ids", "positions", "topk_ids", "topk_logprobs", "target_logprobs")
    ids = [f"s{i}" for i in range(len(seqs))]
    block = codec.Block.from_sequences(ids, *([s[f] for s in seqs] for f in fields))
    assert block.k == 6 and block.input_ids.dtype == np.int32
    step = 0.01
    decoded = codec.decode(codec.encode(block, step))
    for row, seq, seq_id in zip(split_rows(decoded), seqs, ids, strict=True):
        assert row.seq_id == seq_id
        np.testing.assert_array_equal(row.input_ids, seq["input_ids"])
        np.testing.assert_array_equal(row.positions, seq["positions"])
        np.testing.assert_array_equal(row.topk_ids, seq["topk_ids"])
        np.testing.assert_allclose(row.topk_logprobs, seq["topk_logprobs"], atol=step / 2 + 1e-5)
        np.testing.assert_allclose(
            row.target_logprobs, seq["target_logprobs"], atol=step / 2 + 1e-5
        )


def greedy_reference(lengths: list[int], budget: int) -> list[list[int]]:
    """The teacher's batching as it was written before it moved to `plan_window`."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    return [*batches, current] if current else batches


@pytest.mark.parametrize("budget", [1, 50, 96, 300, 4096])
def test_plan_window_is_the_teachers_greedy_length_sorted_batching(budget: int):
    lengths = np.random.default_rng(budget).integers(1, 200, size=300)
    lengths[:40] = 37  # many ties: order within equal lengths is by index
    assert plan_window(lengths, budget) == greedy_reference(lengths.tolist(), budget)


def test_shard_names_and_complete_shards(tmp_path: Path):
    layout = CacheDir(tmp_path)
    assert layout.shard_index(layout.shard_name(42)) == 42
    for name in ("shard-00003.parquet", ".shard-00004.parquet.123.tmp", "shard-x.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert layout.complete_shards() == {3: "shard-00003.parquet"}
    assert layout.is_started() and not layout.is_complete()
    layout.remove_temp_files()
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_plan_is_saved_once_and_a_corrupt_one_is_named(tmp_path: Path):
    layout = CacheDir(tmp_path)
    assert layout.read_plan() is None
    layout.write_plan({"fingerprint": "abc"}, create=True)
    assert layout.read_plan() == {"fingerprint": "abc"}
    with pytest.raises(FileExistsError):
        layout.write_plan({"fingerprint": "other"}, create=True)
    assert layout.read_plan() == {"fingerprint": "abc"}
    layout.file(CacheDir.PLAN).write_text("[1, 2")
    with pytest.raises(RlkdError, match=r"plan\.json"):
        layout.read_plan()


def test_a_worker_removes_only_its_own_shards_temp_files(tmp_path: Path):
    layout = CacheDir(tmp_path)
    names = [".shard-00001.parquet.7.tmp", ".shard-00001.parquet.json.7.tmp"]
    peers = [".shard-00002.parquet.8.tmp", ".shard-00010.parquet.9.tmp"]
    for name in names + peers:
        (tmp_path / name).write_bytes(b"")
    layout.remove_temp_files([1])
    assert sorted(p.name for p in tmp_path.glob(TEMP_GLOB)) == sorted(peers)


def facts(k: int = 6) -> Manifest:
    return Manifest(
        fingerprint="f" * 64,
        identity={"top_k": k},
        config={"top_k": k},
        teacher=TeacherInfo(name="t", path="/t", sha256="a" * 64),
        tokenizer=TokenizerInfo(sha256="b" * 64, vocab_size=50, eos_token_id=0, vocab_sha256="c"),
        dataset={"source": "d", "split": "train", "content_sha256": "e"},
        backend=BackendInfo(name="hf", why="asked", version="x 1"),
        vocab_size=50,
        k=k,
        logprob_step=0.01,
        responses=ResponsesInfo("dataset"),
        skipped={},
        truncated=0,
    )


def test_writer_resumes_its_complete_shards_and_writes_the_manifest_last(tmp_path: Path):
    seqs = random_sequences(np.random.default_rng(1), rows=12, k=6)
    fields = ("input_ids", "positions", "topk_ids", "topk_logprobs", "target_logprobs")

    def block(rows: range) -> codec.Block:
        part = [seqs[i] for i in rows]
        return codec.Block.from_sequences(
            [str(i) for i in rows], *([s[f] for s in part] for f in fields)
        )

    layout = CacheDir(tmp_path / "cache")
    with CacheWriter(layout, 0.01) as writer:
        assert writer.resume([4, 8]) == []
        writer.submit(1, block(range(4, 12)))
    (layout.path / ".shard-00000.parquet.1.tmp").write_bytes(b"partial")  # a killed write
    assert not layout.is_complete()
    with CacheWriter(layout, 0.01) as writer:
        assert writer.resume([4, 8]) == [1]
        writer.submit(0, block(range(4)))
        manifest = writer.finish(facts())
    assert [s.name for s in manifest.shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not list(layout.path.glob(TEMP_GLOB))
    cache = Cache(layout.path)
    assert cache.info == manifest and cache.manifest == manifest.to_json()
    assert cache.manifest["totals"]["rows"] == 12 == cache.info.totals.rows
    assert [r.seq_id for r in cache.rows()] == [str(i) for i in range(12)]


def test_manifest_missing_a_field_is_refused_naming_the_file(tmp_path: Path):
    layout = CacheDir(tmp_path)
    document = facts().to_json()
    del document["tokenizer"]["sha256"], document["digest"]  # the digest would refuse it first
    layout.write_manifest(document)
    with pytest.raises(RlkdError, match=r"manifest\.json: corrupt manifest, missing 'sha256'"):
        Cache(tmp_path)
    older = facts().to_json()
    del older["responses"], older["tokenizer"]["vocab_sha256"]  # caches from before both
    del older["digest"]  # and from before the digest
    layout.write_manifest(older)
    info = Cache(tmp_path).info
    assert info.responses.source == "dataset" and info.tokenizer.vocab_sha256 is None
    assert json.loads(layout.file(CacheDir.MANIFEST).read_text())["format"] == "rlkd-cache"
