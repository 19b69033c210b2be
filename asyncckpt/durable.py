"""Durable file-system steps, each in the order that makes it crash-safe on POSIX file systems.

A file's data is durable after ``fsync(file)``; its *name* is durable only after ``fsync`` of the directory
that holds it. ``rename`` within one file system is atomic: a reader sees the old name or the new one,
never a half-written file.

These are the primitives of :class:`asyncckpt.storage.PosixStorage`; the save pipeline reaches them only
through its storage object (docs/STORAGE.md), so that a wrapper sees every step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import sys
import uuid
from typing import BinaryIO, Callable

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


def replace_atomic(path: str, data: bytes | Callable[[BinaryIO], None], fsync: bool = True) -> None:
    """Replace ``path`` atomically: temp file in the same directory, fsync, rename, fsync the directory.
    ``data`` is the new content, or a function that writes it to a binary file (e.g. ``torch.save``).

    The temp file is flock'ed while it exists, so that another saver's cleanup of leftovers (which removes only
    temp files it can lock) leaves it alone; should one still vanish before the rename (removed between its
    creation and the lock), the replace starts over with a new temp file."""
    directory = os.path.dirname(os.path.abspath(path))
    for attempt in range(3):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _lock_nowait(fd)
            if callable(data):
                with os.fdopen(os.dup(fd), "wb") as f:
                    data(f)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                if attempt == 2 or os.path.lexists(tmp) or not os.path.isdir(directory):
                    raise
                log.warning("temporary file %s was removed before it replaced %s; writing it again", tmp, path)
                continue
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)
        break
    if fsync:
        fsync_dir(directory)


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


def _lock_nowait(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without blocking: True when taken, False where the file system has
    no flock; raises BlockingIOError when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if isinstance(exc, BlockingIOError) or exc.errno not in _NO_FLOCK:
            raise
        return False


class LockFile:
    """An exclusive ``flock`` on a small file, held for as long as its owner works on what the file guards.
    The kernel releases it when the owner's process dies, so a lock that can be taken proves that nobody is
    working there any more. ``locked`` is False where the file system does not support flock: the file then
    only carries its owner record (see :meth:`record`)."""

    def __init__(self, path: str, fd: int, locked: bool):
        self.path = path
        self._fd = fd
        self.locked = locked

    @classmethod
    def take(cls, path: str, *, create: bool) -> "LockFile | None":
        """The lock on ``path``, without waiting; None when someone else holds it or (``create`` False) when
        there is no such file. Whoever removes a lock file holds its lock while unlinking it, and a lock is
        only ours once the file we locked is still the one at ``path``."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if create:
                    raise
                return None
            try:
                locked = _lock_nowait(fd)
                try:
                    current = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    current = False
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if current:
                return cls(path, fd, locked)
            os.close(fd)  # removed (and perhaps created again) since we opened it: look again
            if not create:
                return None

    def write(self, data: bytes) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    @staticmethod
    def record(path: str) -> bytes | None:
        """What the owner wrote into the lock file at ``path`` (None when it cannot be read)."""
        try:
            with open(path, "rb") as f:
                return f.read(4096)
        except OSError:
            return None

    def release(self, unlink: bool) -> None:
        """Give the lock up; with ``unlink``, remove the file first (while still holding the lock)."""
        if self._fd < 0:
            return
        try:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(self._fd)
            self._fd = -1


def remove_tree(path: str) -> None:
    """Remove a directory tree; a missing tree is fine."""
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
