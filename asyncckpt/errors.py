"""Exceptions raised by asyncckpt.

Every error is a :class:`CheckpointError`; the narrow subclasses also derive from the builtin exception a
caller would naturally catch (``ValueError`` for bad configuration, ``FileNotFoundError`` for a missing tag,
...), so ``except ValueError`` keeps working in code that does not know about asyncckpt.
"""
from __future__ import annotations

from typing import Mapping


class CheckpointError(Exception):
    """Root of every error asyncckpt raises."""


class ConfigError(CheckpointError, ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested tag (or ``latest``) does not exist; the message lists the tags that do."""


class TagExistsError(CheckpointError, FileExistsError):
    """Saving over an existing tag without ``overwrite: true``."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes or metadata fail validation (checksum, size, schema); the message names the file,
    chunk and tensor at fault."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A manifest asks for something a checkpoint may never do: a path outside the tag directory, a pickled
    object without ``allow_pickle``, an absurd size."""


class InvalidTagError(CheckpointError, ValueError):
    """A checkpoint tag that is not a plain directory name (the message names the tag and the rule)."""


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state to save cannot be saved faithfully (a meta or nested tensor, a ``longdouble``, an
    integer too large for JSON, ...); raised at once, on the training thread, naming the key path."""


class KeyCollisionError(UnsupportedStateError, ValueError):
    """Two distinct keys of the saved state would be stored under one key path; the message names both."""


class StateMismatchError(CheckpointError, ValueError):
    """A checkpoint does not fit the model, optimizer or scheduler it is loaded into (missing or unexpected
    keys, shapes, dtypes, parameter groups). Raised before anything is modified: the live state is unchanged."""


class PickleNotAllowedError(CheckpointError, TypeError):
    """A value is not JSON-representable and ``allow_pickle`` is off; the message names the key path."""


class MissingPackageError(CheckpointError, ImportError):
    """An optional package this call needs is not installed (fsspec or s3fs for a URL ``save_dir``, ...);
    the message names the package and the extra that installs it."""


class SaverBusyError(CheckpointError):
    """``on_busy: error`` and ``max_inflight`` saves are already in flight."""


class WriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (permission denied, disk full, ...); ``__cause__`` holds the OS error."""


class CommitError(CheckpointError):
    """A save could not be published. On many ranks every rank gets the same error, listing the ranks that
    failed and why (``failures`` maps rank to a one-line cause)."""

    def __init__(self, message: str, failures: Mapping[int, str] | None = None):
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})

    def __reduce__(self):  # keep the failures when the error crosses a process boundary
        return (type(self), (self.args[0], self.failures))


class CommitTimeoutError(CommitError, TimeoutError):
    """A rank did not report within ``commit_timeout_s`` (dead or hung)."""
