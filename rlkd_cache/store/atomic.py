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
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_GLOB = ".*.tmp"
"""What every temp name matches (and nothing complete does)."""

FAULT_AT = os.environ.get("RLKD_FAULT_AT", "")
"""A test hook, read here only: `RLKD_FAULT_AT=before-rename:NAME` SIGKILLs this process
right before the atomic rename of the file or folder NAME (its temp written and fsynced),
`after-rename:NAME` right after it (the folder fsynced); with the prefix `pause:` it sends
SIGSTOP instead (the process, every thread, stops until SIGCONT). tests/test_faults.py and
tests/test_object_store.py kill or pause runs at exact points with it; unset, it does
nothing."""


def fault_point(when: str, name: str) -> None:
    """The test hook `FAULT_AT`: SIGKILL (or with `pause:`, SIGSTOP) this process if it names
    this point (on an object store, "rename" is the PUT: `store/files.py`)."""
    point = f"{when}:{name}"
    if point == FAULT_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    elif f"pause:{point}" == FAULT_AT:
        # to this thread: a stop sent to the process may take effect only after this thread
        # went on (a Ray replica has many threads), and the point would not be exact
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def temp_path(final: Path, owner: str | None = None) -> Path:
    """The hidden temp name `final` is written under, in its folder, carrying its owner: this
    process's pid, or `owner` for a write several processes share (a sharded checkpoint)."""
    return final.with_name(f".{final.name}.{owner or os.getpid()}.tmp")


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
        fault_point("before-rename", final.name)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(final.parent)
    fault_point("after-rename", final.name)


def begin_dir(final: Path, owner: str | None = None) -> Path:
    """The empty temp folder that will become the folder `final` (see `commit_dir`)."""
    tmp = temp_path(Path(final), owner)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """fsync every file and folder under `tmp`, replace the folder `final` with it, fsync the
    parent: `final` appears only complete."""
    final = Path(final)
    for folder, _, files in os.walk(tmp):
        for name in files:
            fsync(Path(folder) / name)
        fsync(Path(folder))
    if final.exists():
        shutil.rmtree(final)
    fault_point("before-rename", final.name)
    tmp.rename(final)
    fsync(final.parent)
    fault_point("after-rename", final.name)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """`atomic_path` for a folder: yield an empty temp folder to fill; when the block ends
    without error, `commit_dir` it. On an error the temp folder is removed and `final` is
    untouched. (A folder that several processes fill uses `begin_dir` and `commit_dir`.)"""
    tmp = begin_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(tmp: Path, value: Any) -> None:
    """Write `value` to the file `tmp` as indented, key-sorted JSON and a newline."""
    with tmp.open("w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as `write_json` does to `path`, atomically."""
    with atomic_path(path) as tmp:
        write_json(tmp, value)
