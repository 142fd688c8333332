"""One exception hierarchy whose messages are written for users.

Every error a user can cause (a bad path, missing weights, a broken model
file) is an :class:`ImgrankError`. The CLI prints ``str(error)`` without a
traceback and exits with ``error.exit_code``.
"""

from __future__ import annotations


class ImgrankError(Exception):
    """Base class: the message is shown to the user as is."""

    #: Process exit code the CLI uses for this kind of error.
    exit_code: int = 1


class UsageError(ImgrankError):
    """The command line asks for something inconsistent or impossible."""

    exit_code = 2


class NoImagesRankedError(ImgrankError):
    """A run found no image it could rank (none found, or all failed to decode)."""

    exit_code = 3


class ModelError(ImgrankError):
    """A backbone, adapter or weights file cannot be built or loaded."""

    exit_code = 4


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable (typically offline)."""


class AdapterMismatchError(ModelError):
    """An adapter was asked to run on a backbone or checkpoint it does not fit."""


class ImageDecodeError(ImgrankError):
    """One image file cannot be read or decoded; the run skips it and goes on."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DataError(ImgrankError):
    """A label table or rated folder cannot be used for training or evaluation."""

    exit_code = 5


class UnsafeOperationError(ImgrankError):
    """A file operation was refused because it could lose or overwrite a user's file."""

    exit_code = 6


class OutputWriteError(ImgrankError):
    """An output file or folder cannot be written (disk full, read-only, permissions).

    Nothing half-written is left behind; the message names the file.
    """

    exit_code = 1


class UnfinishedRunError(UnsafeOperationError):
    """An interrupted rename run must be recovered before anything else writes."""


class CacheError(ImgrankError):
    """The embedding cache cannot be opened or written."""

    exit_code = 7
