"""Where checkpoints are stored: one :class:`Storage` object per save directory, chosen by its URL scheme
(docs/STORAGE.md). A local path gets :class:`PosixStorage` (atomic by rename); ``s3://bucket/run`` (or any
other fsspec URL) gets :class:`FsspecStorage` (atomic by commit marker).

:func:`wrapping` (or :func:`add_wrapper`) puts a wrapper around every storage opened while it is active: that is how tests inject
slow or failing storage (:mod:`asyncckpt.storage.faults`) and how a recorder sees every operation of a save.
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Callable, Iterator

from .base import MARKER, RENAME, Storage, WritableFile, as_os_error, is_url
from .posix import PosixStorage

__all__ = ["MARKER", "RENAME", "Storage", "WritableFile", "PosixStorage", "open_storage", "wrapping", "add_wrapper",
           "remove_wrapper", "is_url", "as_os_error"]

POSIX = PosixStorage()
_cache: dict[tuple[str, str], Storage] = {}
_wrappers: list[Callable[[Storage], Storage]] = []
_lock = threading.Lock()


def open_storage(save_dir: str, options: dict | None = None) -> Storage:
    """The storage of ``save_dir``: POSIX for a local path, fsspec for a URL (``options`` are the fsspec
    file system's, e.g. ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``; plus ``block_size``, the
    multipart part size). Object-store instances are shared per scheme and options."""
    if is_url(save_dir):
        key = (str(save_dir).split("://", 1)[0].lower(), json.dumps(options or {}, sort_keys=True, default=str))
        with _lock:
            store = _cache.get(key)
            if store is None:
                from .fsspec_store import FsspecStorage

                store = _cache[key] = FsspecStorage(str(save_dir), options)
    else:
        store = POSIX
    with _lock:
        wrappers = list(_wrappers)
    for wrap in wrappers:
        store = wrap(store)
    return store


def add_wrapper(wrap: Callable[[Storage], Storage]) -> None:
    """From now on every storage :func:`open_storage` returns is ``wrap(storage)`` (saves and loads started
    afterwards use it for all their operations), until :func:`remove_wrapper`."""
    with _lock:
        _wrappers.append(wrap)


def remove_wrapper(wrap: Callable[[Storage], Storage]) -> None:
    with _lock:
        _wrappers.remove(wrap)


@contextlib.contextmanager
def wrapping(wrap: Callable[[Storage], Storage]) -> Iterator[None]:
    """:func:`add_wrapper` for the duration of a ``with`` block."""
    add_wrapper(wrap)
    try:
        yield
    finally:
        remove_wrapper(wrap)
