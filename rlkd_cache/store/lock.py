"""One lock per cache directory, so that two `rlkd cache` runs never write one cache at once.

The lock is an OS file lock (`fcntl.flock`, exclusive) on the hidden file `CacheDir.LOCK`
inside the cache directory; no glob of shards, records or temp files matches its name, and
nothing reads it but this module. `run_cache` holds it around every write into the directory
(responses, plan, shards, manifest); finding a cache complete ("already cached") reads only
and takes no lock. The holder writes its host, pid and the time it took the lock into the
file, so that another run can say who holds it: that run waits (saying so once) up to
`CacheConfig.lock_wait` seconds, then fails with one line naming the holder; 0 fails at once.

The kernel releases a flock when the process holding it dies, so a killed run's lock is free
at once. Its file still names the killed run (a clean release empties the file): the next
holder logs that it breaks that stale lock. Within one process the lock is re-entrant:
`CacheDir.remove_temp_files` takes it too, which is a no-op where `run_cache` holds it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlkd_cache.errors import RlkdError, disk_full, is_disk_full

log = logging.getLogger("rlkd.lock")

POLL_S = 0.2
"""Seconds between tries while another process holds the lock."""

_HELD: set[Path] = set()
"""The lock files this process holds (resolved paths)."""


def pid_alive(pid: int) -> bool:
    """True if a process `pid` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds (or, in a killed run's file, held) a cache's lock: what the file says."""

    host: str
    pid: int
    since: str
    """When it took the lock (ISO 8601, UTC)."""

    @classmethod
    def me(cls) -> Holder:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(host=socket.gethostname(), pid=os.getpid(), since=now)

    @classmethod
    def read(cls, fd: int) -> Holder | None:
        """The holder the open lock file names; None when it is empty (released cleanly, or
        just locked and not written yet) or not a holder's record."""
        try:
            value = json.loads(os.pread(fd, 4096, 0))
            return cls(host=str(value["host"]), pid=int(value["pid"]), since=str(value["since"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def gone(self) -> bool:
        """True when the holder is a process of this host that no longer runs."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.since})"


def describe(holder: Holder | None) -> str:
    """Who holds a lock, for messages; a holder that is gone yet holds the lock has left a
    child process (forked with the lock file open) that holds it."""
    if holder is None:
        return "a process that has not written its name yet"
    if holder.gone():
        return f"{holder}, which has exited: a process it started still holds the lock"
    return str(holder)


def holder_of(lock_file: Path) -> str | None:
    """Who holds the lock `lock_file` now (as `describe` says it), or None if nobody does."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe(Holder.read(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


BUSY_CACHE = (
    "{folder} is being written by another rlkd run, {who}{waited}: rerun when it is done (the "
    "cache is then complete), or give --lock-wait SECONDS to wait"
)
"""The error when a cache's lock stays held: `{folder}`, `{who}` and `{waited}` filled in."""


@contextmanager
def hold(lock_file: Path, wait_s: float, busy: str = BUSY_CACHE) -> Iterator[None]:
    """Hold the lock `lock_file` (in an existing folder: a cache's, a training run's) for the
    block. While another process holds it, wait up to `wait_s` seconds (logging once who holds
    it), then raise `RlkdError` with `busy` (naming the folder and the holder); `wait_s` 0
    fails at once. Re-entrant within a process."""
    key = lock_file.resolve()
    if key in _HELD:
        yield
        return
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(lock_file.name, lock_file.parent) from None
        raise
    try:
        _acquire(fd, lock_file.parent, wait_s, busy)
        stale = Holder.read(fd)
        if stale is not None:
            log.info(
                "breaking the stale lock of pid %d on %s (taken %s by a run that did not end "
                "cleanly)",
                stale.pid,
                stale.host,
                stale.since,
            )
        _write(fd, lock_file)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)  # released cleanly: the next holder finds no stale name
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, folder: Path, wait_s: float, busy: str) -> None:
    """Take the flock on `fd`, waiting up to `wait_s` seconds for its holder."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        who = describe(Holder.read(fd))
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
            raise RlkdError(busy.format(folder=folder, who=who, waited=waited))
        if not said:
            log.info(
                "%s is being written by another rlkd run, %s: waiting up to %g s for it",
                folder,
                who,
                wait_s,
            )
            said = True
        time.sleep(min(POLL_S, left))


def _write(fd: int, lock_file: Path) -> None:
    """Write this process into the lock file it holds, replacing what was there."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.me())).encode(), 0)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(lock_file.name, lock_file.parent) from None
        raise
