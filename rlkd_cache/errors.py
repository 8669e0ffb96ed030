"""The one exception type for user errors.

Anything a user can cause (a bad path, a bad flag, a corrupt file) raises `RlkdError` with a
one-line message naming the thing and what was expected. The CLI prints it without a
traceback; everything else is a bug and keeps its traceback.
"""


class RlkdError(Exception):
    """A user-facing error: the message names the file, row, field or flag at fault."""
