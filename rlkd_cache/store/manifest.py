"""The manifest: the last file a cache gets, and the only one readers trust.

`manifest.json` lists the format version, the resolved config, the teacher, tokenizer and
dataset identities, the backend, vocab size, k, and per shard its name, rows, positions,
bytes and sha256, plus totals and the rows skipped or truncated with reasons.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rlkd_cache.errors import RlkdError
from rlkd_cache.store import FORMAT_VERSION

MANIFEST = "manifest.json"
FORMAT_NAME = "rlkd-cache"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temp file, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Read and check a cache's manifest; raise `RlkdError` naming the file otherwise."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.is_dir():
        raise RlkdError(f"cache not found: {cache_dir} (expected a cache directory)")
    if not path.is_file():
        raise RlkdError(
            f"{cache_dir} is not a complete cache: it has no {MANIFEST} "
            "(an interrupted `rlkd cache` resumes when rerun with the same arguments)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RlkdError(f"{path}: corrupt manifest, expected JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise RlkdError(f'{path}: not an rlkd cache manifest (expected "format": "{FORMAT_NAME}")')
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise RlkdError(
            f"{path}: cache format version {version!r} is not supported "
            f"(this rlkd reads version {FORMAT_VERSION})"
        )
    for key in ("shards", "k", "vocab_size", "tokenizer", "totals"):
        if key not in manifest:
            raise RlkdError(f"{path}: corrupt manifest, missing {key!r}")
    return manifest
