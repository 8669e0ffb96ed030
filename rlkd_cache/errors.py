"""The exception types for user errors.

Anything a user can cause (a bad path, a bad flag, a corrupt file) raises `RlkdError` with a
one-line message naming the thing and what was expected. The CLI prints it without a
traceback; everything else is a bug and keeps its traceback.

`FieldError` is the configs' own check failing on one field: a `ValueError` where a config is
built in code, re-raised by `config.build_config` as an `RlkdError` that names the flag or the
YAML key the value came from.

A full disk is a user error too: `is_disk_full` recognizes one, `disk_full` says it.
"""

import errno
from pathlib import Path


class RlkdError(Exception):
    """A user-facing error: the message names the file, row, field or flag at fault."""


class FieldError(ValueError):
    """Config field `name` holds a bad value; `problem` says what was expected, for example
    "must be > 0, got 0.0"."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The errnos of a full disk and of a used-up quota."""


def is_disk_full(error: BaseException) -> bool:
    """True if `error`, or an error it was raised from or while handling, is a full disk or
    quota (`DISK_FULL`): torch.save reports one as a RuntimeError raised during the OSError."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def disk_full(what: str, folder: str | Path) -> RlkdError:
    """The one-line error for a write of `what` under `folder` that found the disk full: the
    write left nothing behind (it was atomic), so the same command resumes once there is room."""
    return RlkdError(
        f"no space left on device while writing {what} under {folder}: free space and rerun "
        "the same command; it resumes"
    )
