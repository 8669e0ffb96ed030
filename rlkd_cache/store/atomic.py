"""Atomic writes: the one place that writes a file (or folder) under a temp name, fsyncs it
and renames it over its final name.

A reader sees either the old file or the complete new one, never a part: the new content is
written to a hidden temp name in the same folder (`.NAME.PID.tmp`, so two processes never
share one), flushed and fsynced, renamed over the final name, and the folder is fsynced so
the rename survives a crash. On an error the temp file is removed and the old file is left
as it was. Temp files of killed processes match `TEMP_GLOB`; their owners delete them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"
"""What every temp name matches (and nothing complete does)."""


def temp_path(final: Path) -> Path:
    """The hidden temp name `final` is written under, in its folder, carrying the pid."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield the temp path to write `final`'s content to; when the block ends without error,
    fsync it and rename it over `final`. On an error it is removed and `final` is untouched.

        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    """
    final = Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(final.parent)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """`atomic_path` for a folder: yield an empty temp folder to fill; when the block ends
    without error, fsync its entries and itself, replace `final` (a folder) with it and fsync
    the parent. On an error the temp folder is removed and `final` is untouched."""
    final = Path(final)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            fsync(path)
        fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(final.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented, key-sorted JSON (and a newline) to `path`, atomically."""
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
