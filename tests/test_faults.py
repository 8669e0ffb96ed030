"""The fault and hostile-input suite: each defect a probe found, kept fixed.

Every case runs the `rlkd` command as a user would and checks the promise: a one-line error
(`rlkd: error: ...`, exit 1, no traceback) that names the file, line, field or flag, and
nothing lost. See docs/reliability.md for what is promised and how each promise is tested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result
from fuzz.fuzz_shard import MUTATIONS, blocks_equal, mutate
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE, fails
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import codec, tools
from rlkd_cache.store.atomic import TEMP_GLOB
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import Cache, decode_shard
from rlkd_cache.store.writer import parquet_options
from rlkd_cache.train.checkpoint import checkpoints
from rlkd_cache.train.run_dir import run_lock
from rlkd_cli.main import app


def cache_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["cache", "--model", str(model), "--dataset", str(data), "--cache-root", str(root)]


BAD_DATA = {
    "empty.jsonl": (b"", "the dataset file is empty"),
    "one_bad_line.jsonl": (b'{"text": "a b c"}\nnot json\n{"text": "d e"}\n', "line 2: not a JSON"),
    "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "line 1: not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_a_bad_dataset_file_is_named_with_its_line_not_called_missing(name, tmp_path, tiny_teacher):
    content, expected = BAD_DATA[name]
    data = tmp_path / name
    data.write_bytes(content)
    line = fails(*cache_args(tiny_teacher, data, tmp_path / "root"), "--text-field", "text")
    assert str(data) in line and expected in line
    assert "not found" not in line


def test_a_folder_of_files_with_different_columns_says_so(tmp_path, tiny_teacher):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    line = fails(*cache_args(tiny_teacher, folder, tmp_path / "root"))
    assert str(folder) in line and "share one set of columns" in line
    assert "not found" not in line


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    from conftest import shallow_copy
    from rlkd_cache.cache import run_cache
    from rlkd_cache.config import CacheConfig

    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(SAMPLE),
        split="train[:24]",
        top_k=16,
        positions="response",
        cache_root=str(tmp_path_factory.mktemp("caches")),
    )
    student = shallow_copy(tiny_teacher, tmp_path_factory.mktemp("student"))
    return {"cache": run_cache(cfg, progress=False), "student": student}


def train_args(setup: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--cache",
        str(setup["cache"]),
        "--student",
        str(setup["student"]),
        "--output",
        str(output),
        "--lr",
        "3e-3",
        "--max-steps",
        "8",
        "--batch-tokens",
        "512",
        "--save-every",
        "2",
        "--keep-last",
        "10",
        "--no-progress",
        *extra,
    ]


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(train_setup, tmp_path):
    import shutil

    from safetensors.torch import load_file

    whole = CliRunner().invoke(app, train_args(train_setup, tmp_path / "a"))
    assert whole.exit_code == 0, whole.stderr
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    newest = tmp_path / "b" / "checkpoints" / "step-00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # --resume PATH stays strict: the damaged checkpoint it names is an error
    line = fails(*train_args(train_setup, tmp_path / "b", "--resume", str(newest.parent)))
    assert str(newest.parent) in line
    resumed = CliRunner().invoke(app, train_args(train_setup, tmp_path / "b"))
    assert resumed.exit_code == 0, resumed.stderr
    assert "skipping a damaged checkpoint" in resumed.stderr and "step-00000006" in resumed.stderr
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_a_second_training_into_a_busy_output_is_refused_and_a_killed_ones_lock_is_free(
    train_setup, tmp_path, caplog
):
    output = tmp_path / "run"
    first = start(train_args(train_setup, output, "--max-steps", "100000"), tmp_path / "a.log")
    try:
        deadline = time.monotonic() + 300
        while not (output / "metrics.jsonl").exists():  # past setup: the folder's lock is held
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        saved = (output / "config.json").read_bytes()
        line = fails(*train_args(train_setup, output))
        assert f"--output {output} is being trained into by another rlkd run, pid {first.pid}" in (
            line
        )
        assert (output / "config.json").read_bytes() == saved
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    logging.getLogger("rlkd").addHandler(caplog.handler)  # the CLI stops it propagating
    try:
        with caplog.at_level(logging.INFO, logger="rlkd.lock"), run_lock(str(output)):
            assert f"breaking the stale lock of pid {first.pid}" in caplog.text
    finally:
        logging.getLogger("rlkd").removeHandler(caplog.handler)


def test_output_naming_an_existing_file_is_one_line(train_setup, tmp_path):
    output = tmp_path / "taken"
    output.write_text("not a run folder\n")
    line = fails(*train_args(train_setup, output))
    assert str(output) in line and "a file is there" in line
    assert output.read_text() == "not a run folder\n"


def test_a_student_whose_config_disagrees_with_its_weights_is_one_line(
    train_setup, tmp_path, tiny_tokenizer
):
    from conftest import build_llama

    student = build_llama(tmp_path / "student", tiny_tokenizer, layers=1)
    config = json.loads((student / "config.json").read_text())
    config["vocab_size"] += 116  # the embedding and head keep their 384 rows
    (student / "config.json").write_text(json.dumps(config))
    args = train_args({**train_setup, "student": student}, tmp_path / "run")
    line = fails(*args)
    assert str(student) in line and "do not fit its config.json" in line


# --- the cache's own files, damaged or edited (issue 15) ---------------------------------------


def sharded_args(model: Path, root: Path) -> list[str]:
    """`rlkd cache` of the sample's first 24 rows in 6 shards."""
    return [
        *cache_args(model, SAMPLE, root),
        "--split",
        "train[:24]",
        "--top-k",
        "8",
        "--num-shards-hint",
        "6",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_teacher) -> Path:
    """The root of a complete 6-shard cache; tests damage copies of it (`copy_of`)."""
    root = tmp_path_factory.mktemp("sharded") / "root"
    result = CliRunner().invoke(app, sharded_args(tiny_teacher, root))
    assert result.exit_code == 0, result.stderr
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    """The cache directory of a copy of the cache root `root`."""
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    (cache,) = (p for p in copy.iterdir() if p.is_dir())
    return cache


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    bad = bytearray(data)
    bad[offset] ^= mask
    return bytes(bad)


def exported(cache: Path, out: Path) -> pa.Table:
    result = CliRunner().invoke(app, ["export", str(cache), str(out)])
    assert result.exit_code == 0, result.stderr
    return pq.read_table(out)


def edit_manifest(cache: Path, edit: Callable[[dict], object], redigest: bool = True) -> None:
    """Edit manifest.json in place; with `redigest`, set its `digest` to match the edit, as a
    tool that rewrites manifests would (sha256 of the canonical JSON of the other keys)."""
    path = cache / "manifest.json"
    document = json.loads(path.read_text())
    edit(document)
    if redigest:
        rest = {k: v for k, v in document.items() if k != "digest"}
        canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
        document["digest"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(document))


def verified(cache: Path) -> Result:
    return CliRunner().invoke(app, ["verify", str(cache)])


@pytest.mark.parametrize("damage", ["flip", "truncate", "no record"])
def test_resume_redoes_a_damaged_or_unrecorded_shard_and_says_so(
    damage, sharded, tmp_path, tiny_teacher
):
    cache = copy_of(sharded, tmp_path)
    before = exported(cache, tmp_path / "before.parquet")
    shards = json.loads((cache / "manifest.json").read_text())["shards"]
    (cache / "manifest.json").unlink()
    (cache / "shard-00005.parquet").unlink()
    shard = cache / "shard-00001.parquet"
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(flip(data, len(data) // 2))
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:  # a shard whose write was not recorded (or written by an rlkd that kept no record)
        next(cache.glob("shard-00001.parquet?*")).unlink()
    rerun = CliRunner().invoke(app, sharded_args(tiny_teacher, tmp_path / "root"))
    assert rerun.exit_code == 0, rerun.stderr
    warned = [line for line in rerun.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and str(shard) in warned[0] and "redoing it" in warned[0], warned
    assert verified(cache).exit_code == 0
    assert json.loads((cache / "manifest.json").read_text())["shards"] == shards
    assert exported(cache, tmp_path / "after.parquet").equals(before)


def test_a_shard_beyond_the_plan_is_ignored_with_a_warning(sharded, tmp_path, tiny_teacher):
    cache = copy_of(sharded, tmp_path)
    names = [s["name"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]
    (cache / "manifest.json").unlink()
    (cache / "shard-00005.parquet").unlink()
    shutil.copy(cache / "shard-00001.parquet", cache / "shard-00007.parquet")
    rerun = CliRunner().invoke(app, sharded_args(tiny_teacher, tmp_path / "root"))
    assert rerun.exit_code == 0, rerun.stderr
    assert f"warning: {cache / 'shard-00007.parquet'}: not in the shard plan" in rerun.stderr
    assert [s["name"] for s in json.loads((cache / "manifest.json").read_text())["shards"]] == names
    assert verified(cache).exit_code == 0


def column_chunk_bytes(shard: Path) -> list[int]:
    """Offsets of every byte of a shard's column chunks (its pages, headers included)."""
    row_group = pq.ParquetFile(shard).metadata.row_group(0)
    offsets: list[int] = []
    for c in range(row_group.num_columns):
        chunk = row_group.column(c)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        offsets += range(start, start + chunk.total_compressed_size)
    return offsets


def test_no_flipped_byte_of_a_shards_pages_decodes_even_with_the_manifest_hash_updated(
    sharded, tmp_path
):
    """sha256 is not the only check: page checksums (and the codec's content check) refuse
    every flip, so a damaged shard is never decoded to different ids or log-probs."""
    cache = copy_of(sharded, tmp_path)
    shard = cache / "shard-00001.parquet"
    good = shard.read_bytes()
    chunk = column_chunk_bytes(shard)
    tried = chunk[:: max(1, len(chunk) // 400)]
    caught = by_page_crc = 0
    for i, offset in enumerate(tried):
        bad = flip(good, offset, mask=1 + i % 255)
        shard.write_bytes(bad)
        sha = hashlib.sha256(bad).hexdigest()
        edit_manifest(cache, lambda d, sha=sha: d["shards"][1].update(sha256=sha))
        try:
            Cache(cache).read_shard(1)
        except RlkdError as e:
            assert str(shard) in str(e)
            caught += 1
            by_page_crc += "CRC" in str(e)
    print(f"{caught} of {len(tried)} flips caught ({by_page_crc} by the page checksums)")
    assert caught == len(tried)
    assert by_page_crc > len(tried) // 2  # the page checksums are written, and checked


def test_a_shard_without_page_checksums_or_content_check_still_reads(tmp_path):
    """Shards written before both checks existed read as before (the checks are skipped)."""

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, size=9) for _ in range(3)]
    positions = [np.arange(8) for _ in ids]
    topk = [np.stack([rng.permutation(50)[:4] for _ in range(8)]) for _ in ids]
    logprobs = [-np.sort(rng.exponential(2.0, size=(8, 4)), axis=1) for _ in ids]
    block = codec.Block.from_sequences(
        ["a", "b", "c"], ids, positions, topk, logprobs, [lp[:, -1] - 1 for lp in logprobs]
    )
    table = codec.encode(block, 0.01)
    old_meta = {k: v for k, v in table.schema.metadata.items() if k != codec.CHECK_KEY}
    options = {**parquet_options(3), "write_page_checksum": False}
    with pq.ParquetWriter(tmp_path / "old.parquet", table.schema.remove_metadata(), **options) as w:
        w.write_table(table.replace_schema_metadata(None))
        w.add_key_value_metadata(old_meta)
    decoded = decode_shard(CacheDir(tmp_path), "old.parquet")
    np.testing.assert_array_equal(decoded.topk_ids, block.topk_ids)


EVIL_NAMES = [
    "{tmp}/x/evil.parquet",
    "../../x/evil.parquet",
    "../../../etc/passwd",
    "file:///x/shard-00000.parquet",
    "shard-00000.parquet/../shard-00000.parquet",
    "shard-0.parquet",
    "shard-00000.parquet ",
]


@pytest.mark.parametrize("template", EVIL_NAMES)
def test_a_shard_name_that_is_a_path_is_refused_before_anything_reads_it(
    template, sharded, tmp_path
):
    cache = copy_of(sharded, tmp_path)
    (tmp_path / "x").mkdir()
    shutil.copy(cache / "shard-00000.parquet", tmp_path / "x" / "evil.parquet")
    name = template.format(tmp=tmp_path)
    edit_manifest(cache, lambda d: d["shards"][0].update(name=name))
    for command in (["verify", str(cache)], ["export", str(cache), str(tmp_path / "out.parquet")]):
        line = fails(*command)
        assert str(cache / "manifest.json") in line and repr(name) in line, line
    with pytest.raises(RlkdError, match="shard name"):
        Cache(cache)


MANIFEST_EDITS = {
    "fingerprint": (lambda d: d.update(fingerprint="0" * 64), "fingerprint"),
    "k": (lambda d: d.update(k=d["k"] - 1), "k=8, the manifest says 7"),
    "logprob_step": (lambda d: d.update(logprob_step=0.02), "step"),
    "vocab_size": (lambda d: d.update(vocab_size=3), "vocabulary"),
    "key name": (lambda d: d.update(responzes=d.pop("responses")), None),
}


@pytest.mark.parametrize("field", sorted(MANIFEST_EDITS))
def test_an_edited_manifest_fails_verify_by_its_digest(field, sharded, tmp_path):
    cache = copy_of(sharded, tmp_path)
    edit_manifest(cache, MANIFEST_EDITS[field][0], redigest=False)
    line = fails("verify", str(cache))
    assert str(cache / "manifest.json") in line and "digest" in line


@pytest.mark.parametrize("field", sorted(f for f, (_, found) in MANIFEST_EDITS.items() if found))
def test_an_edited_manifest_with_a_matching_digest_fails_verify_by_its_shards(
    field, sharded, tmp_path
):
    """A manifest rewritten with a fresh digest is still checked against the directory
    name and against the shards' own metadata."""
    cache = copy_of(sharded, tmp_path)
    edit, found = MANIFEST_EDITS[field]
    edit_manifest(cache, edit)
    result = verified(cache)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert found in result.stderr, result.stderr


@pytest.mark.parametrize("totals", ["kept", "zero"])
def test_a_manifest_without_shards_fails_verify(totals, sharded, tmp_path):
    cache = copy_of(sharded, tmp_path)

    def empty(d: dict) -> None:
        d["shards"] = []
        if totals == "zero":
            d["totals"] = {key: 0 for key in d["totals"]}

    edit_manifest(cache, empty)
    result = verified(cache)
    assert result.exit_code == 1 and "no shards" in result.stderr, result.stderr


def test_a_manifest_without_a_digest_verifies_with_a_warning(sharded, tmp_path):
    cache = copy_of(sharded, tmp_path)
    edit_manifest(cache, lambda d: d.pop("digest", None), redigest=False)
    result = verified(cache)
    assert result.exit_code == 0, result.stderr
    assert f"warning: {cache / 'manifest.json'}: no digest" in result.stderr


def test_the_digest_is_not_part_of_the_cache_identity(sharded, tiny_teacher):
    (cache,) = (p for p in sharded.iterdir() if p.is_dir())
    document = json.loads((cache / "manifest.json").read_text())
    canonical = json.dumps(document["identity"], sort_keys=True, separators=(",", ":"))
    assert document["fingerprint"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert cache.name.endswith(document["fingerprint"][:16]) and "digest" in document
    again = CliRunner().invoke(app, sharded_args(tiny_teacher, sharded))
    assert "already cached" in again.stderr


def test_manifest_k_above_the_shards_k_is_one_line_in_train(train_setup, tmp_path):
    cache = tmp_path / train_setup["cache"].name
    shutil.copytree(train_setup["cache"], cache)
    edit_manifest(cache, lambda d: d.update(k=24))
    setup = {**train_setup, "cache": cache}
    line = fails(*train_args(setup, tmp_path / "run", "--rank-k", "20"))
    assert "shard-00000.parquet" in line and "k=16, the manifest says 24" in line


# --- fuzzing: the shard decoder and the manifest parser (hypothesis; atheris: tests/fuzz) ----
# Counts of the last run (derandomized, so stable): shard decoder, 2000 mutations: 1966
# refused with RlkdError, 34 decoded unchanged, none different; manifest parser, 1000 edits:
# 786 refused, 87 read with verify problems, 127 read clean; no other exception. Beyond CI,
# an exhaustive scan of one shard (every byte xor 0x01 and 0xFF: 37,310 flips, plus 9 masks
# per footer byte: 13,761) found no other exception and no different data either.


def test_fuzz_the_shard_decoder_only_refuses_or_decodes_unchanged(sharded, tmp_path):
    layout = CacheDir(copy_of(sharded, tmp_path))
    good = layout.file("shard-00001.parquet").read_bytes()
    reference = decode_shard(layout, "shard-00001.parquet")
    outcomes: Counter[str] = Counter()

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(MUTATIONS), st.integers(0, len(good)), st.binary(min_size=1, max_size=8))
    def one(kind: str, offset: int, value: bytes) -> None:
        layout.file("shard-00001.parquet").write_bytes(mutate(good, kind, offset, value))
        try:
            block = decode_shard(layout, "shard-00001.parquet")
        except RlkdError:
            outcomes["refused"] += 1
            return
        assert blocks_equal(block, reference), (kind, offset, value)
        outcomes["unchanged"] += 1

    one()
    print(f"shard fuzz: {sum(outcomes.values())} cases, {dict(outcomes)}")
    assert outcomes["refused"] > 0


def json_paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (keys and list indices)."""
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += json_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += json_paths(item, (*path, i))
    return paths


def test_fuzz_the_manifest_parser_only_refuses_or_reads(sharded, tmp_path):
    fuzz_cache = copy_of(sharded, tmp_path)
    manifest = fuzz_cache / "manifest.json"
    original = json.loads(manifest.read_text())
    paths = [p for p in json_paths(original) if p]
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    values = st.recursive(
        leaves,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
        max_leaves=6,
    )
    outcomes: Counter[str] = Counter()

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(paths), st.sampled_from(["replace", "delete"]), values, st.booleans())
    def one(path: tuple, action: str, value: object, redigest: bool) -> None:
        def edit(document: dict) -> None:
            parent = document
            for step in path[:-1]:
                parent = parent[step]
            if action == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value

        manifest.write_text(json.dumps(original))
        edit_manifest(fuzz_cache, edit, redigest=redigest)
        try:
            tools.summary(Cache(fuzz_cache))
            problems = tools.verify(fuzz_cache)
        except RlkdError:
            outcomes["refused"] += 1
            return
        outcomes["problems" if problems else "clean"] += 1

    one()
    print(f"manifest fuzz: {sum(outcomes.values())} cases, {dict(outcomes)}")
    assert outcomes["refused"] > 0


# --- one writer per cache, a full disk, kills at chosen points (issue 15) ---------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HOST = socket.gethostname()


def rlkd(*args: str) -> list[str]:
    """The command line of `rlkd ARGS` in a fresh process."""
    return [sys.executable, "-m", "rlkd_cli.main", *args]


def start(args: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    """Start `rlkd ARGS` in its own process group with its stderr in `log`; `fault` sets the
    test hook RLKD_FAULT_AT (store/atomic.py) that SIGKILLs it at that point."""
    env = {**ENV, "RLKD_FAULT_AT": fault} if fault else ENV
    with log.open("w") as err:
        return subprocess.Popen(
            rlkd(*args), env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


def wait_for(condition: Callable[[], object], procs: list[subprocess.Popen], what: str) -> object:
    """Poll `condition` until it is true (and return it) while all of `procs` run."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if value := condition():
            return value
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"{ended} ended before {what}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def the_cache(root: Path) -> Path:
    """The one cache directory under the cache root `root`."""
    (cache,) = (p for p in root.iterdir() if p.is_dir())
    return cache


def lock_holder(cache: Path) -> int | None:
    """The pid the lock file of `cache` names, if any."""
    try:
        return int(json.loads((cache / CacheDir.LOCK).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


PEER = """
import os, sys, time
from rlkd_cache.store.layout import CacheDir

cache = CacheDir(sys.argv[1])
cache.create()
with cache.locked(0):
    (cache.path / f".shard-00000.parquet.{os.getpid()}.tmp").write_bytes(b"half a shard")
    print("holding", flush=True)
    time.sleep(600)
"""
"""A peer writing a cache: it holds the lock and has a temp file in the directory."""


def test_a_live_peers_lock_and_temp_file_are_kept_and_a_dead_ones_broken(
    sharded, tmp_path, tiny_teacher
):
    root = tmp_path / "root"
    cache = root / the_cache(sharded).name
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(cache)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert peer.stdout is not None and peer.stdout.readline() == "holding\n"
        temp = cache / f".shard-00000.parquet.{peer.pid}.tmp"
        holder = f"pid {peer.pid} on {HOST}"
        line = fails(*sharded_args(tiny_teacher, root), "--lock-wait", "0")
        assert str(cache) in line and holder in line and "--lock-wait" in line, line
        waited = CliRunner().invoke(app, [*sharded_args(tiny_teacher, root), "--lock-wait", "0.5"])
        assert waited.exit_code == 1 and "(waited 0.5 s)" in waited.stderr, waited.stderr
        assert waited.stderr.count(f"{holder} (since ") == 2  # once waiting, once failing
        with pytest.raises(RlkdError, match=holder):
            CacheDir(cache).remove_temp_files()
        assert temp.read_bytes() == b"half a shard"
    finally:
        peer.kill()
        peer.wait()
    rerun = CliRunner().invoke(app, sharded_args(tiny_teacher, root))
    assert rerun.exit_code == 0, rerun.stderr
    assert f"breaking the stale lock of pid {peer.pid} on {HOST}" in rerun.stderr
    assert not temp.exists() and not list(cache.glob(TEMP_GLOB))
    assert lock_holder(cache) is None  # released cleanly: the file names no one
    reference = exported(the_cache(sharded), tmp_path / "reference.parquet")
    assert exported(cache, tmp_path / "rerun.parquet").equals(reference)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_cache_do_the_work_once(sharded, tmp_path, tiny_teacher):
    """Both start together; whichever takes the lock is frozen (SIGSTOP) until the other says
    it waits for it, so the runs overlap however loaded the machine is."""
    root = tmp_path / "root"
    cache = root / the_cache(sharded).name
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [start(sharded_args(tiny_teacher, root), log) for log in logs]
    try:
        pids = [p.pid for p in runs]

        def holder() -> int | None:
            pid = lock_holder(cache)
            return pid if pid in pids else None

        first = pids.index(wait_for(holder, runs, "a run took the lock"))
        os.kill(pids[first], signal.SIGSTOP)
        other = logs[1 - first]
        wait_for(lambda: f"pid {pids[first]} on {HOST}" in other.read_text(), runs, "the wait")
        os.kill(pids[first], signal.SIGCONT)
        for run in runs:
            run.wait(timeout=300)
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    worked, waited = logs[first].read_text(), logs[1 - first].read_text()
    assert [r.returncode for r in runs] == [0, 0], worked + waited
    assert "cached 24 rows" in worked and "already cached" not in worked
    assert "waiting up to 3600 s" in waited and f"already cached: {cache}" in waited
    assert "cached 24 rows" not in waited and "backend hf" not in waited  # no teacher ran
    assert verified(cache).exit_code == 0
    reference = exported(the_cache(sharded), tmp_path / "reference.parquet")
    assert exported(cache, tmp_path / "both.parquet").equals(reference)


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """Mount a small tmpfs of a given size (`mount -t tmpfs`, as root) under tmp_path; each is
    unmounted after the test. Fails loudly, with mount's own words, where mounting is refused:
    the disk-full promise is then untested, which must not pass unnoticed."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as e:
            pytest.fail(f"cannot mount a tmpfs here (the disk-full tests need root and tmpfs): {e}")
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        done = subprocess.run(["umount", str(point)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:  # busy: detach it anyway, and fail saying so
            subprocess.run(["umount", "--lazy", str(point)], check=True, timeout=60)
            raise AssertionError(f"{point} was busy at teardown: {done.stderr.strip()}")


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem at `disk` with one file until `leave` bytes are free; return it."""
    filler = disk / "filler"
    filler.write_bytes(b"\1" * max(shutil.disk_usage(disk).free - leave, 0))
    return filler


def test_a_full_disk_while_caching_is_one_line_and_the_rerun_resumes(
    sharded, tmpfs, tmp_path, tiny_teacher
):
    disk = tmpfs("2M")
    reference = the_cache(sharded)
    shard_bytes = sum(p.stat().st_size for p in reference.glob(CacheDir.SHARD_GLOB))
    filler = fill(disk, leave=shard_bytes // 2)
    root = disk / "root"
    cache = root / reference.name
    line = fails(*sharded_args(tiny_teacher, root))
    assert line.startswith("rlkd: error: no space left on device while writing "), line
    assert line.endswith(f"under {cache}: free space and rerun the same command; it resumes")
    kept = len(CacheDir(cache).complete_shards())
    assert 0 < kept < 6 and not list(cache.glob(TEMP_GLOB))
    filler.unlink()
    rerun = CliRunner().invoke(app, sharded_args(tiny_teacher, root))
    assert rerun.exit_code == 0, rerun.stderr
    assert f"resuming: {kept} of 6 shards already complete" in rerun.stderr
    assert verified(cache).exit_code == 0
    assert exported(cache, tmp_path / "rerun.parquet").equals(
        exported(reference, tmp_path / "reference.parquet")
    )


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes(
    train_setup, tmpfs, tmp_path
):
    from safetensors.torch import load, load_file

    whole = CliRunner().invoke(app, train_args(train_setup, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.stderr
    state = tmp_path / "whole" / "checkpoints" / "step-00000002" / "state.pt"
    disk = tmpfs("32M")
    filler = fill(disk, leave=state.stat().st_size * 3 // 2)  # room for one checkpoint
    run = disk / "run"

    def train() -> subprocess.CompletedProcess:  # in its own process: no file left open here
        command = rlkd(*train_args(train_setup, run))
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)

    failed = train()
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.splitlines()[-1] == (
        "rlkd: error: no space left on device while writing checkpoint step-00000004 under "
        f"{run}: free space and rerun the same command; it resumes"
    )
    assert [p.name for p in checkpoints(run)] == ["step-00000002"]
    assert not list((run / "checkpoints").glob(TEMP_GLOB))
    filler.unlink()
    resumed = train()
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "step-00000002" in resumed.stderr
    wa = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    wb = load((run / "final" / "model.safetensors").read_bytes())  # no map: tmpfs unmounts
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


KILL_SEED = 5
"""Seed of the kill points below, the same on every run (of seeds 1-11, one whose points
differ most: a record's rename among them, timed kills not right after a rename)."""


def killed_args(model: Path, root: Path) -> list[str]:
    """`rlkd cache` of the sample's first 48 rows in 12 shards, for the kill tests."""
    return [
        *cache_args(model, SAMPLE, root),
        "--split",
        "train[:48]",
        "--top-k",
        "8",
        "--num-shards-hint",
        "12",
        "--no-progress",
    ]


def kill_mid_step(proc: subprocess.Popen, progress: Callable[[], int], fraction: float) -> int:
    """SIGKILL the process group of `proc` `fraction` of the way through a step of its work:
    `progress()` counts the steps done; the kill comes after two more, timed by the second,
    so that it lands inside the next at any machine speed. Return the steps done by then."""
    before = progress()
    wait_for(lambda: progress() > before, [proc], "a step to time")
    started = time.monotonic()
    wait_for(lambda: progress() > before + 1, [proc], "the step timed")
    time.sleep(fraction * (time.monotonic() - started))
    os.killpg(proc.pid, signal.SIGKILL)
    return before + 2


def assert_sigkilled(proc: subprocess.Popen, log: Path, point: str) -> str:
    """Wait for `proc`; assert SIGKILL ended it (at `point`); return its stderr."""
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == -signal.SIGKILL, f"not killed {point} ({proc.returncode}): {text}"
    return text


def assert_at_point(folder: Path, fault: str, pid: int) -> None:
    """Check that the RLKD_FAULT_AT kill `fault` (WHEN:NAME) happened where it says: before a
    rename, the temp of NAME is complete and NAME absent; after it, NAME is there."""
    when, _, name = fault.partition(":")
    if when == "before-rename":
        assert not (folder / name).exists() and (folder / f".{name}.{pid}.tmp").exists(), fault
    else:
        assert (folder / name).exists(), fault


def shards_kept(root: Path) -> list[int]:
    """The complete shards of the one cache under the cache root `root` (none before it is
    made)."""
    caches = [p for p in root.glob("*") if p.is_dir()]
    return sorted(CacheDir(caches[0]).complete_shards()) if caches else []


@pytest.mark.slow
def test_rlkd_cache_killed_at_five_seeded_points_resumes_to_the_same_export(tmp_path, tiny_teacher):
    """SIGKILL one `rlkd cache` five times in a row, each rerun resuming the last: right after
    a shard's rename, at a random time, at a random rename (before or after that of a shard or
    of its record), at a random time, and before the manifest's rename (its temp written).
    After each kill every file under a final name is byte for byte the uninterrupted run's;
    the last rerun's export equals its export."""
    clean = CliRunner().invoke(app, killed_args(tiny_teacher, tmp_path / "clean"))
    assert clean.exit_code == 0, clean.stderr
    reference = the_cache(tmp_path / "clean")
    shards = len(CacheDir(reference).complete_shards())
    root = tmp_path / "killed"
    rng = random.Random(KILL_SEED)
    points: list[str] = []
    previous: int | None = None
    for n, kind in enumerate(["after a shard", "time", "a rename", "time", "the manifest"]):
        kept = shards_kept(root)
        ahead = [i for i in range(len(kept) + 2) if i not in kept][:2]
        fault = None
        if kind == "after a shard":
            fault = f"after-rename:{CacheDir.shard_name(rng.choice(ahead))}"
        elif kind == "a rename":
            i = rng.choice(ahead)
            # a timed kill between a record's rename and its shard's leaves the record: it is
            # written again (the same bytes), but its rename is no longer a first appearance
            present = {p.name for p in root.glob("*/shard-*")}
            names = [CacheDir.shard_name(i), CacheDir.record_name(i)]
            name = rng.choice([n for n in names if n not in present])
            fault = f"{rng.choice(['before-rename', 'after-rename'])}:{name}"
        elif kind == "the manifest":
            fault = f"before-rename:{CacheDir.MANIFEST}"
        log = tmp_path / f"run{n}.log"
        proc = start(killed_args(tiny_teacher, root), log, fault)
        point = fault or ""
        if fault is None:
            fraction = rng.uniform(0.1, 0.6)
            shards_done = kill_mid_step(proc, lambda: len(shards_kept(root)), fraction)
            point = f"{fraction:.2f} of a shard's time after shard {shards_done}"
        text = assert_sigkilled(proc, log, point)
        if previous is not None:
            assert f"breaking the stale lock of pid {previous} on {HOST}" in text, text
        previous = proc.pid
        cache = the_cache(root)
        assert cache.name == reference.name and not CacheDir(cache).is_complete()
        for final in cache.glob("shard-*"):  # shards and their records, never temp files
            assert final.read_bytes() == (reference / final.name).read_bytes(), final
        if fault is not None:
            assert_at_point(cache, fault, proc.pid)
        points.append(f"{point} ({len(shards_kept(root))} of {shards} shards kept)")
    final = subprocess.run(
        rlkd(*killed_args(tiny_teacher, root)), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stderr
    assert f"breaking the stale lock of pid {previous} on {HOST}" in final.stderr
    assert f"resuming: {shards} of {shards} shards already complete" in final.stderr
    assert verified(cache).exit_code == 0 and not list(cache.glob(TEMP_GLOB))
    assert exported(cache, tmp_path / "killed.parquet").equals(
        exported(reference, tmp_path / "clean.parquet")
    )
    print(f"rlkd cache: {len(points)} of {len(points)} kills resumed: " + "; ".join(points))


def newest_step(run: Path) -> int:
    """The step of the newest complete checkpoint of the run folder `run` (0: none)."""
    return max((int(p.name.removeprefix("step-")) for p in checkpoints(run)), default=0)


@pytest.mark.slow
def test_rlkd_train_killed_at_three_seeded_points_resumes_to_the_same_weights(
    train_setup, tmp_path
):
    """SIGKILL one `rlkd train` three times in a row, each rerun resuming the last: during a
    checkpoint write (its temp folder complete, not renamed), at a random time, and right
    after a later checkpoint's rename. The final weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    more = ("--max-steps", "12", "--keep-last", "3")  # later flags win over train_args'
    clean = CliRunner().invoke(app, train_args(train_setup, tmp_path / "clean", *more))
    assert clean.exit_code == 0, clean.stderr
    run = tmp_path / "killed"
    rng = random.Random(KILL_SEED)
    points: list[str] = []
    for n, kind in enumerate(["during a checkpoint", "time", "after a checkpoint"]):
        newest = newest_step(run)
        fault = None
        if kind == "during a checkpoint":
            fault = f"before-rename:step-{rng.choice([2, 4]):08d}"
        elif kind == "after a checkpoint":
            fault = f"after-rename:step-{rng.choice(range(newest + 2, 13, 2)):08d}"
        log = tmp_path / f"run{n}.log"
        proc = start(train_args(train_setup, run, *more), log, fault)
        point = fault or ""
        if fault is None:
            fraction = rng.uniform(0.1, 0.6)
            saves = kill_mid_step(proc, lambda: newest_step(run) // 2, fraction)  # every 2 steps
            point = f"{fraction:.2f} of a checkpoint interval after step {2 * saves}"
        text = assert_sigkilled(proc, log, point)
        if newest:
            assert f"resuming from {run / 'checkpoints' / f'step-{newest:08d}'}" in text, text
        assert not (run / "final").exists(), f"killed {point} only after training: {text}"
        if fault is not None:
            assert_at_point(run / "checkpoints", fault, proc.pid)
        points.append(f"{point} (newest checkpoint then: step {newest_step(run)})")
    final = subprocess.run(
        rlkd(*train_args(train_setup, run, *more)),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0 and "resuming from" in final.stderr, final.stderr
    assert not list((run / "checkpoints").glob(TEMP_GLOB))  # a killed save's temp is removed
    wa = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    wb = load_file(run / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    print(f"rlkd train: {len(points)} of {len(points)} kills resumed: " + "; ".join(points))
