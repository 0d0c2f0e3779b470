"""Exceptions that carry a message fit to show a user as is.

The CLI prints ``error: <message>`` for any :class:`DmlgenError` and exits with status 2;
every other exception is a bug and keeps its traceback.
"""


class DmlgenError(ValueError):
    """Base class: bad input a user can fix (the message names the file, field or value)."""


class DataError(DmlgenError):
    """Unreadable, corrupt, inconsistent or empty data (images, labels, embeddings, splits)."""


class ConfigError(DmlgenError):
    """A configuration key, type or value that is not accepted."""


class CheckpointError(DmlgenError):
    """A checkpoint that cannot be read or does not match the model or run."""
