"""Identity of a cache: hashes of everything that changes its content.

The cache directory is named by `fingerprint(identity)`: the same teacher, tokenizer, data,
template, max length, positions, k, quantization and backend give the same directory, so a
second `rlkd cache` is a no-op and experiments share one cache by pointing at it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from rlkd_cache.store.atomic import write_json_atomic


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `identity`."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def folder_sha256(folder: Path, memo_file: Path | None = None) -> str:
    """Hash of every file in a model folder (names and bytes). Results are memoized by
    (path, size, mtime) in `memo_file`, so re-hashing a large teacher is skipped when
    nothing changed."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = canonical_json(
        [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    )
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    key = hashlib.sha256(stamp.encode()).hexdigest()
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(folder)).encode() + b"\0")
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    if memo_file is not None:
        memo[key] = value
        with contextlib.suppress(OSError):  # the memo is an optimization only
            write_json_atomic(memo_file, memo)
    return value


def vocab_sha256(tokenizer: Any) -> str:
    """Hash of the vocabulary alone (token -> id): what student and cache must share."""
    return fingerprint(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of the vocabulary itself (token -> id), the special tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = {"vocab": vocab, "special": special, "chat_template": tokenizer.chat_template}
    return fingerprint(payload)


def slug(text: str) -> str:
    """A short, filesystem-safe name part."""
    name = Path(text.rstrip("/")).name if text else "data"
    name = re.sub(r"\.(jsonl|json|parquet|csv)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()[:40] or "data"
