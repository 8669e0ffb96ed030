"""The lock of a cache folder on an object store: a lease object, taken with conditional writes.

An object store has no file locks, and a writer on another machine may die holding one. So
the lock is an object (`CacheDir.LOCK`) saying who holds it, changed only by conditional
writes, which the store applies atomically (of two racing writers exactly one wins):

- take: create it only if no object has its key (S3 `If-None-Match: *`), or replace a
  released or stale one only if it is still the version that was read (`If-Match: ETAG`);
- hold: a daemon thread renews it every `lease_s / 4` seconds, replacing its own version
  (`If-Match`). If the store refuses, another process took it as stale: the lease is lost,
  and `check` (called by `ObjectFiles.writing` before every PUT) raises, so this writer
  stops before writing anything more;
- stale: a waiter takes over a lock whose version has not changed for `lease_s` seconds of its
  own clock (no clocks are compared across machines), or at once when the holder it names is
  a process of this host that no longer runs (a killed run, rerun);
- release: replace it with a "released" record (`If-Match`). It is never deleted, so no
  delete can race a new holder.

Shards and the manifest are also written with `If-None-Match: *` (`CacheDir.writing` with
`create`), so even a writer whose lease was lost while it was paused cannot replace an object
another writer's manifest lists: what a manifest says of a shard is what the store holds.

Conditional writes exist on AWS S3 (since 2024), MinIO, Cloudflare R2 and moto; s3fs passes
them through. Other fsspec filesystems get a one-line error when a cache is written to them
(rlkd could not keep a second writer out); they can still be read, and `rlkd copy` fills them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from rlkd_cache.errors import RlkdError
from rlkd_cache.store.lock import POLL_S, Holder, describe

log = logging.getLogger("rlkd.lock")

LEASE_S = float(os.environ.get("RLKD_LOCK_LEASE", "60"))
"""Seconds a lock stays its holder's without a renewal (`$RLKD_LOCK_LEASE`, default 60; every
writer of a cache should use the same); renewed every quarter of that. Longer: a holder
survives longer stalls (a paused VM, a slow store); shorter: a dead holder on another machine
is taken over sooner."""

CONDITIONAL = ("s3", "s3a")
"""Protocols whose fsspec filesystem (s3fs) takes `If-None-Match` and `If-Match`."""


class Lease:
    """A lock this process holds: its key, the version (ETag) it last wrote, and whether it
    was lost to another process."""

    def __init__(self, fs: Any, key: str, lease_s: float, etag: str) -> None:
        self.fs, self.key, self.lease_s, self.etag = fs, key, lease_s, etag
        self.lost = False
        self._beat = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="rlkd-lease", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self._beat += 1
            try:
                self.etag = _replace(
                    self.fs, self.key, _record(self.lease_s, self._beat), self.etag
                )
            except _Refused:
                self.lost = True
                log.warning("warning: the lock %s was taken over by another process", self.key)
                return
            except OSError as e:  # transient: the next beat tries again, well within the lease
                log.warning("warning: renewing the lock %s failed (%s)", self.key, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost:
            try:
                _replace(self.fs, self.key, {"released": True}, self.etag)
            except (_Refused, OSError) as e:
                log.warning("warning: releasing the lock %s failed (%s)", self.key, e)


_HELD: dict[str, Lease] = {}
"""The locks this process holds, by key."""


class _Refused(Exception):
    """The store refused a conditional write: the object is not the version it was told."""


def _record(lease_s: float, beat: int = 0) -> dict[str, Any]:
    return {**asdict(Holder.me()), "lease_s": lease_s, "beat": beat}


def _etag(response: Any, fs: Any, key: str) -> str:
    etag = response.get("ETag") if isinstance(response, dict) else None
    return str(etag or fs.info(key, refresh=True)["ETag"])


def _create(fs: Any, key: str, value: dict[str, Any]) -> str | None:
    """Write `value` at `key` only if no object has it; its ETag, or None if one has."""
    try:
        return _etag(fs.pipe_file(key, json.dumps(value).encode(), mode="create"), fs, key)
    except FileExistsError:
        return None


def _replace(fs: Any, key: str, value: dict[str, Any], etag: str) -> str:
    """Replace the object at `key` with `value` if it is still version `etag`; the new ETag.
    Raise `_Refused` if it is not."""
    try:
        return _etag(fs.pipe_file(key, json.dumps(value).encode(), IfMatch=etag), fs, key)
    except OSError as e:
        if "precondition" in str(e).lower().replace("-", ""):
            raise _Refused(str(e)) from None
        raise


def _read(fs: Any, key: str) -> tuple[dict[str, Any], str] | None:
    """The lock's record and ETag (read consistently), or None if there is no lock object."""
    for _ in range(10):
        try:
            before = fs.info(key, refresh=True)["ETag"]
            value = fs.cat_file(key)
            after = fs.info(key, refresh=True)["ETag"]
        except FileNotFoundError:
            return None
        if before == after:
            try:
                record = json.loads(value)
            except ValueError:
                record = {}
            return (record if isinstance(record, dict) else {}), after
    raise RlkdError(f"{key}: the lock object keeps changing; is something rewriting it?")


def _holder(record: dict[str, Any]) -> Holder | None:
    try:
        return Holder(host=str(record["host"]), pid=int(record["pid"]), since=str(record["since"]))
    except (KeyError, TypeError, ValueError):
        return None


def check(prefix: str) -> None:
    """Raise `RlkdError` if a lock this process held under `prefix` was lost."""
    for key, held in list(_HELD.items()):
        if key.startswith(prefix + "/") and held.lost:
            raise RlkdError(
                f"{held.fs.unstrip_protocol(key)}: this run's lock expired and another process "
                "took over the cache "
                f"(no renewal within {held.lease_s:g} s): stopped before writing more; rerun "
                "to resume once it is done"
            )


@contextmanager
def hold(fs: Any, key: str, wait_s: float, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the lock object `key` of filesystem `fs` for the block (see the module docstring).
    While another live process holds it, wait up to `wait_s` seconds (logging once who holds
    it), then raise `RlkdError` naming the holder. Re-entrant within a process."""
    if key in _HELD:
        yield
        return
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in CONDITIONAL:
        raise RlkdError(
            f"{fs.unstrip_protocol(key)}: rlkd writes caches only to stores with conditional "
            f"writes ({', '.join(p + '://' for p in CONDITIONAL)}), which keep a second writer "
            "out; write the cache locally and `rlkd copy` it there"
        )
    try:
        etag = _acquire(fs, key, wait_s, lease_s)
    except OSError as e:  # no such bucket, no permission, the store unreachable
        raise RlkdError(f"{fs.unstrip_protocol(key)}: cannot take the lock ({e})") from None
    held = Lease(fs, key, lease_s, etag)
    _HELD[key] = held
    held._thread.start()
    try:
        yield
    finally:
        del _HELD[key]
        held.release()


def _acquire(fs: Any, key: str, wait_s: float, lease_s: float) -> str:
    """Take the lock; its ETag."""
    deadline = time.monotonic() + wait_s
    seen: tuple[str, float] | None = None  # (ETag, when first seen) of the holder's version
    said = False
    while True:
        etag = _create(fs, key, _record(lease_s))
        if etag is not None:
            return etag
        current = _read(fs, key)
        if current is None:
            continue  # deleted meanwhile: try to create it again
        record, version = current
        holder = _holder(record)
        if seen is None or seen[0] != version:
            seen = (version, time.monotonic())
        stale = time.monotonic() - seen[1] >= float(record.get("lease_s", lease_s))
        gone = holder is not None and holder.host == socket.gethostname() and holder.gone()
        if record.get("released") or holder is None or stale or gone:
            try:
                etag = _replace(fs, key, _record(lease_s), version)
            except _Refused:
                continue  # another process took it first
            if holder is not None and not record.get("released"):
                log.info(
                    "breaking the stale lock of pid %d on %s (taken %s by a run that did not "
                    "end cleanly)",
                    holder.pid,
                    holder.host,
                    holder.since,
                )
            return etag
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
            raise RlkdError(
                f"{fs.unstrip_protocol(key.rsplit('/', 1)[0])} is being written by another "
                f"rlkd run, {describe(holder)}{waited}: rerun when it is done (the cache is then "
                "complete), or give --lock-wait SECONDS to wait"
            )
        if not said:
            log.info(
                "%s is being written by another rlkd run, %s: waiting up to %g s for it",
                fs.unstrip_protocol(key.rsplit("/", 1)[0]),
                describe(holder),
                wait_s,
            )
            said = True
        time.sleep(min(POLL_S * 5, max(left, 0.01)))
