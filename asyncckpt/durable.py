"""Durable file-system steps, each in the order that makes it crash-safe on POSIX file systems.

A file's data is durable after ``fsync(file)``; its *name* is durable only after ``fsync`` of the directory
that holds it. ``rename`` within one file system is atomic: a reader sees the old name or the new one,
never a half-written file.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import sys
import uuid

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _sync_file_range = _libc.sync_file_range
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        _sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written range to the device now (Linux ``sync_file_range``),
    so disk I/O overlaps with encoding instead of all happening in the final fsync. Not a durability
    guarantee by itself: the final ``fsync`` still is. A no-op where unsupported."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = getattr(_libc, "renameat2", None) if _sync_file_range is not None else None
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so that replacing a
    directory never leaves a moment without one. False where the kernel or file system cannot; raises
    other errors."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a new file and fsync it (the caller fsyncs the directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def replace_atomic(path: str, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` atomically: temp file in the same directory, fsync, rename, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        write_durable(tmp, data, fsync)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(directory)


def remove_tree(path: str) -> None:
    """Remove a directory tree; a missing tree is fine."""
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
