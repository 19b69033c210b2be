"""The POSIX storage: a local or parallel file system, made atomic by ``rename`` (the steps themselves,
each in its crash-safe order, are in :mod:`asyncckpt.durable`)."""
from __future__ import annotations

import os
from typing import BinaryIO, Callable

from .. import durable
from ..format import partial_dir_name
from .base import RENAME


class PosixFile:
    """A new file opened for writing; ``sync`` is ``fsync``."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "wb", buffering=0)

    def write(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._f.write(view):]

    def writeback(self, offset: int, nbytes: int) -> None:
        durable.start_writeback(self._f.fileno(), offset, nbytes)

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def abort(self) -> None:
        self._f.close()


class PosixStorage:
    strategy = RENAME
    local = True

    def abspath(self, path: str) -> str:
        return os.path.abspath(os.fspath(path))

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def staging_dir(self, save_dir: str, tag: str) -> str:
        return os.path.join(save_dir, partial_dir_name(tag))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> PosixFile:
        return PosixFile(path)

    def write_durable(self, path: str, data: bytes, fsync: bool = True) -> None:
        durable.write_durable(path, data, fsync)

    def replace_atomic(self, path: str, data: bytes | Callable[[BinaryIO], None], fsync: bool = True) -> None:
        durable.replace_atomic(path, data, fsync)

    def fsync_dir(self, path: str) -> None:
        durable.fsync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        return durable.exchange(a, b)

    def remove_file(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        durable.remove_tree(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_bytes(self, path: str, limit: int) -> bytes | None:
        from ..loader import read_control_file  # untrusted-input rules: no symlinks, no FIFOs, a size limit

        return read_control_file(path, limit)

    def file_sizes(self, directory: str) -> dict[str, int]:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(directory)
                if e.is_file(follow_symlinks=False)}

    def read_ranges(self, path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, n, off) for off, n in ranges]
        finally:
            os.close(fd)
