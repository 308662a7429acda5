"""Errors that a user's input can cause: main.py ends each with one line and status 1.

Each message names the field, file or folder at fault and what to do. The data layer's
`sources.DataError`, `checkpoints.ModelMismatchError` / `NoCheckpointError` and
`nonfinite.NonFiniteError` are the others of the kind; they live beside the code that
detects them.
"""


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field and what it may be."""
