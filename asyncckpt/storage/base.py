"""The storage seam: every file operation of a save (and the reads of a load from an object store) goes
through one :class:`Storage` object, so that a local file system and an object store are interchangeable,
and tests (and the power-loss recorder) can wrap it instead of patching private functions.

Vocabulary:

* **strategy** — how a save is made atomic. ``rename`` (POSIX): the files are written into
  ``.<tag>.partial/``, fsynced, and the directory is renamed to ``<tag>`` (``RENAME_EXCHANGE`` to replace
  one), then ``latest`` is replaced by rename. ``marker`` (object stores, which cannot rename a prefix): the
  files are written straight under ``<tag>/``, and the tag's ``manifest.json``, written last by the
  publisher, is its commit marker: readers ignore a tag without it; ``latest`` is replaced by one PUT only
  after the marker is in place.
* **mutating operations** — ``open_write`` (then :class:`WritableFile` ``write``/``sync``/``close``/
  ``abort``), ``write_durable``, ``replace_atomic``, ``fsync_dir``, ``makedirs``, ``rename``, ``exchange``,
  ``remove_file``, ``remove_tree``. A wrapper that sees these sees everything a save does to storage.
* **errors** — every operation raises ``OSError`` (``FileNotFoundError``, ``FileExistsError``, ... where
  the cause is one): an object store's own exceptions are translated (:func:`as_os_error`), so callers
  handle one kind of failure whatever the storage.
"""
from __future__ import annotations

import errno
from typing import BinaryIO, Callable, Protocol, runtime_checkable

RENAME = "rename"
MARKER = "marker"


@runtime_checkable
class WritableFile(Protocol):
    """A new file being written, in order. Its bytes are durable after :meth:`sync` (POSIX: fsync) and
    visible after :meth:`close` (object stores: the upload completes); :meth:`abort` gives it up (an
    object-store upload is cancelled; a POSIX file is closed, its directory is removed by the caller)."""

    path: str

    def write(self, data: memoryview) -> None: ...

    def writeback(self, offset: int, nbytes: int) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """Where checkpoints live. Paths are strings: absolute POSIX paths, or URLs (``s3://bucket/run/tag``)."""

    strategy: str  # RENAME or MARKER
    local: bool  # a POSIX file system: flock, O_NOFOLLOW reads, preadv and node probes work there

    # ----------------------------------------------------------------- names
    def abspath(self, path: str) -> str: ...

    def join(self, *parts: str) -> str: ...

    def staging_dir(self, save_dir: str, tag: str) -> str:
        """Where the ranks write the files of ``tag`` before it is published."""

    # ----------------------------------------------------------------- mutating
    def makedirs(self, path: str) -> None: ...

    def open_write(self, path: str) -> WritableFile: ...

    def write_durable(self, path: str, data: bytes, fsync: bool = True) -> None: ...

    def replace_atomic(self, path: str, data: bytes | Callable[[BinaryIO], None], fsync: bool = True) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def exchange(self, a: str, b: str) -> bool: ...

    def remove_file(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    # ----------------------------------------------------------------- reading
    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def read_bytes(self, path: str, limit: int) -> bytes | None: ...

    def file_sizes(self, directory: str) -> dict[str, int]: ...

    def read_ranges(self, path: str, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]: ...


def is_url(path: str) -> bool:
    """Whether ``path`` names an object store (``scheme://...``) rather than a local path."""
    head, sep, _ = str(path).partition("://")
    return bool(sep) and head.isidentifier() and head.lower() != "file"


def as_os_error(exc: BaseException, op: str, path: str) -> OSError:
    """An object store's exception as the OSError a caller handles (an OSError stays as it is)."""
    if isinstance(exc, OSError):
        return exc
    return OSError(errno.EIO, f"{op} failed: {type(exc).__name__}: {exc}", path)
