"""The exception types for user errors.

Anything a user can cause (a bad path, a bad flag, a corrupt file) raises `RlkdError` with a
one-line message naming the thing and what was expected. The CLI prints it without a
traceback; everything else is a bug and keeps its traceback.

`FieldError` is the configs' own check failing on one field: a `ValueError` where a config is
built in code, re-raised by `config.build_config` as an `RlkdError` that names the flag or the
YAML key the value came from.
"""


class RlkdError(Exception):
    """A user-facing error: the message names the file, row, field or flag at fault."""


class FieldError(ValueError):
    """Config field `name` holds a bad value; `problem` says what was expected, for example
    "must be > 0, got 0.0"."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem
