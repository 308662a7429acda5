"""Errors that a user's input can cause: main.py ends each with one line and status 1.

Each message names the field, file or folder at fault and what to do.
`checkpoints.ModelMismatchError` / `NoCheckpointError` and `nonfinite.NonFiniteError` are
the others of the kind; they live beside the code that detects them.
"""


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field and what it may be."""


class DataError(ValueError):
    """A dataset is missing, incomplete or unreadable; the message names the path at fault.

    The data readers raise it (data/png.py, data/sources.py; also `sources.DataError`), so
    that `data.skip_bad_files` can skip such a file and main.py prints it in one line.
    """
