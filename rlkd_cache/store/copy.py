"""`rlkd copy`: move a complete cache between any two cache roots (local, S3, any fsspec URL).

Every file the manifest lists (the shards, and the teacher's responses where the cache has
them) is read from the source, checked against the manifest's sha256, and written to the
destination in one atomic write (`CacheDir.writing`), `THREADS` files at a time; a file
already at the destination with the manifest's size and sha256 is skipped, so an interrupted
copy resumes when rerun. The manifest, the same document, is written last: the copy is a
cache (found by `rlkd train`, `rlkd ls`) only then. A destination that already holds another
manifest under the cache's name is refused. The copy holds the destination's lock, as
`rlkd cache` does, so it never interleaves with a run writing that cache.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.files import StorageOptions, folder
from rlkd_cache.store.layout import CacheDir
from rlkd_cache.store.reader import Cache, checked_bytes
from rlkd_cache.store.tools import manifest_problems

log = logging.getLogger("rlkd.store")

THREADS = 8
"""Files copied at once (memory: that many shards)."""

CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What a cache directory's name is (`cache.py` names them `slug-slug-kK-FINGERPRINT`): one
path component, never `..`, a separator or a scheme."""


def copy(
    source: str | Path,
    root: str | Path,
    storage_options: StorageOptions | None = None,
    lock_wait: float = 3600.0,
    progress: bool = True,
) -> Path | str:
    """Copy the complete cache `source` into the cache root `root`; return the copy's
    directory (see the module docstring)."""
    from tqdm import tqdm

    cache = Cache(source, storage_options)
    problems = manifest_problems(cache)
    if problems:
        raise RlkdError(f"not copied: {problems[0]}")
    if not CACHE_NAME.fullmatch(cache.layout.name):
        raise RlkdError(f"{cache.layout}: {cache.layout.name!r} is not a cache directory name")
    dest = CacheDir(folder(root, storage_options).child(cache.layout.name))
    if _same_manifest(dest, cache):
        log.info("already there: %s", dest)
        return dest.path
    dest.create()
    files = [(e.name, e.bytes, e.sha256) for e in cache.info.shards]
    if cache.info.responses.sha256 is not None:
        files.append(
            (CacheDir.RESPONSES, cache.layout.size(CacheDir.RESPONSES), cache.info.responses.sha256)
        )
    with dest.locked(lock_wait):
        dest.remove_temp_files()
        if _same_manifest(dest, cache):
            return dest.path
        bar = tqdm(
            total=sum(size for _, size, _ in files),
            unit="B",
            unit_scale=True,
            desc="rlkd copy",
            disable=not progress,
            dynamic_ncols=True,
        )
        there = dest.sizes()
        pool = ThreadPoolExecutor(THREADS, thread_name_prefix="rlkd-copy")
        try:
            with bar:
                jobs = [pool.submit(_copy_file, cache.layout, dest, there, f, bar) for f in files]
                kept = sum(job.result() for job in jobs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        dest.write_manifest(cache.manifest)
    log.info(
        "copied %s to %s (%d of %d files were there already)", cache.layout, dest, kept, len(files)
    )
    return dest.path


def _same_manifest(dest: CacheDir, cache: Cache) -> bool:
    """True if `dest` is complete with `cache`'s manifest; raise `RlkdError` if it is complete
    with another one."""
    if not dest.is_complete():
        return False
    if dest.read_manifest() != cache.manifest:
        raise RlkdError(
            f"{dest} already holds another manifest under this cache's name: not overwritten "
            "(delete it to copy again)"
        )
    return True


def _copy_file(
    source: CacheDir, dest: CacheDir, there: dict[str, int], file: tuple[str, int, str], bar: Any
) -> bool:
    """Copy one (name, size, sha256) unless `dest` has it already (sizes in `there`); return
    whether it had."""
    name, size, sha = file
    kept = there.get(name) == size and dest.sha256(name) == sha
    if not kept:
        what = "shard" if CacheDir.shard_index(name) is not None else "file"
        dest.write_bytes(name, checked_bytes(source, name, sha, what))
    bar.update(size)
    return kept
