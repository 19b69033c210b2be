"""Staging buffers in shared memory, mapped by a rank and by its node's writer service without a copy.

A rank's buffer is a file created in the service's runtime directory, mapped, and unlinked at once: only the
rank's open descriptor keeps it, so nothing is left behind when the rank dies (a kill between the create
and the unlink leaves a name with the rank's pid in it, which the next service start removes, see
:func:`paths.clean_leftovers`). The descriptor travels with each save's message (SCM_RIGHTS); the service
maps it once per buffer. On CUDA the staging pool registers the mapping with ``cudaHostRegister``, chunk by
chunk, as it does its private buffers (asyncckpt/staging.py), so device-to-host copies into it are
asynchronous, as into pinned memory."""
from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref

import torch

from ..errors import WriteError
from .paths import buffer_path

log = logging.getLogger(__name__)


def map_fd(fd: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the first ``nbytes`` of the file open as ``fd`` (shared mapping)."""
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


class SharedBuffers:
    """The allocator of a rank's staging slots in service mode (``StagingPool(allocate=...)``)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._lock = threading.Lock()
        self._by_ptr: dict[int, tuple[str, int]] = {}  # data_ptr -> (buffer id, descriptor)

    def __call__(self, nbytes: int) -> torch.Tensor:
        name = uuid.uuid4().hex[:16]
        path = buffer_path(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise WriteError(f"writer service: cannot create a shared-memory staging buffer {path}: {exc}") from exc
        try:
            os.ftruncate(fd, nbytes)
            buffer = map_fd(fd, nbytes)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, (OSError, RuntimeError)):
                raise WriteError(f"writer service: cannot map {nbytes} bytes of shared memory in "
                                 f"{self.directory}: {exc}") from exc
            raise
        finally:
            os.unlink(path)
        ptr = buffer.data_ptr()
        with self._lock:
            self._by_ptr[ptr] = (name, fd)
        weakref.finalize(buffer, self._free, ptr)
        return buffer

    def handle(self, buffer: torch.Tensor) -> tuple[str, int]:
        """The (buffer id, descriptor) of a buffer this allocator made."""
        with self._lock:
            return self._by_ptr[buffer.data_ptr()]

    def _free(self, ptr: int) -> None:
        with self._lock:
            _, fd = self._by_ptr.pop(ptr)
        os.close(fd)
