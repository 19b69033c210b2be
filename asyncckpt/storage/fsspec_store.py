"""Object stores through fsspec (``s3://`` with s3fs; ``gs://``, ``az://``, ... with their fsspec packages).
Atomicity is the ``marker`` strategy (see :mod:`asyncckpt.storage.base` and docs/STORAGE.md).

What the libraries do, not this module: large files are uploaded in multipart parts of ``block_size`` bytes
(s3fs: each part is sent as soon as it is full, the upload completes on ``close`` and is aborted by
``abort``); ranged reads of a load run concurrently (fsspec's ``cat_ranges``); transient errors are retried
with exponential backoff by botocore (``retries: {mode: standard, max_attempts: 10}`` unless the options
set their own ``config_kwargs.retries``).
"""
from __future__ import annotations

import copy
import io
import posixpath
from typing import Any, BinaryIO, Callable

from ..errors import ConfigError, MissingPackageError
from .base import MARKER, as_os_error

DEFAULT_BLOCK_BYTES = 64 << 20  # multipart part size (S3 allows 5 MiB .. 5 GiB per part, 10,000 parts)
_S3_RETRIES = {"mode": "standard", "max_attempts": 10}
_MERGED_READ_BYTES = 16 << 20  # ranges that touch are fetched together, up to this many bytes per request


def _missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError)


class ObjectFile:
    """An object being uploaded: parts go out while it is written; ``close`` completes it (only then is it
    visible), ``abort`` cancels it (nothing becomes visible)."""

    def __init__(self, fs: Any, path: str, block_size: int):
        self.path = path
        try:
            self._f = fs.open(path, "wb", block_size=block_size)
        except Exception as exc:
            raise as_os_error(exc, "open for writing", path) from exc

    def write(self, data: memoryview) -> None:
        try:
            self._f.write(memoryview(data).cast("B"))
        except Exception as exc:
            raise as_os_error(exc, "upload", self.path) from exc

    def writeback(self, offset: int, nbytes: int) -> None:
        """Parts are sent as they fill up: nothing to start."""

    def sync(self) -> None:
        """An object is durable once its upload completes (:meth:`close`)."""

    def close(self) -> None:
        try:
            self._f.close()
        except Exception as exc:
            raise as_os_error(exc, "complete upload", self.path) from exc

    def abort(self) -> None:
        try:
            self._f.discard()
        except Exception:  # nothing was completed: what is left is an unfinished upload the store expires
            pass
        self._f.closed = True  # fsspec's file would otherwise try to complete the discarded upload when collected


class FsspecStorage:
    strategy = MARKER
    local = False

    def __init__(self, url: str, options: dict | None = None):
        protocol = url.split("://", 1)[0].lower()
        try:
            import fsspec
        except ImportError as exc:
            raise MissingPackageError(f"save_dir {url!r} needs the fsspec package ({exc}); for S3: "
                                      "pip install 'asyncckpt[s3]'") from exc
        opts = copy.deepcopy(dict(options or {}))
        self.block_size = int(opts.pop("block_size", DEFAULT_BLOCK_BYTES))
        if protocol in ("s3", "s3a"):
            config = opts.setdefault("config_kwargs", {})
            config.setdefault("retries", dict(_S3_RETRIES))
        try:
            self.fs = fsspec.filesystem(protocol, **opts)
        except ImportError as exc:
            raise MissingPackageError(f"save_dir {url!r} needs the fsspec package for {protocol}:// ({exc}); for "
                                      "S3: pip install 'asyncckpt[s3]'") from exc
        except ValueError as exc:  # fsspec: "Protocol not known"
            raise ConfigError(f"save_dir {url!r}: fsspec has no filesystem for {protocol}:// ({exc})") from exc
        self.protocol = protocol

    # ----------------------------------------------------------------- names
    def abspath(self, path: str) -> str:
        return str(path).rstrip("/")

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def staging_dir(self, save_dir: str, tag: str) -> str:
        return posixpath.join(save_dir, tag)

    # ----------------------------------------------------------------- mutating
    def makedirs(self, path: str) -> None:
        """Prefixes need no creating."""

    def open_write(self, path: str) -> ObjectFile:
        return ObjectFile(self.fs, path, self.block_size)

    def write_durable(self, path: str, data: bytes, fsync: bool = True) -> None:
        self._call("upload", path, self.fs.pipe_file, path, bytes(data))

    def replace_atomic(self, path: str, data: bytes | Callable[[BinaryIO], None], fsync: bool = True) -> None:
        """One PUT: readers see the old object or the new one."""
        if callable(data):
            buf = io.BytesIO()
            data(buf)
            data = buf.getvalue()
        self.write_durable(path, data)

    def fsync_dir(self, path: str) -> None:
        """Object stores have no directories to sync."""

    def rename(self, src: str, dst: str) -> None:
        raise OSError(f"{src}: an object store cannot rename a prefix atomically (the marker strategy never asks)")

    def exchange(self, a: str, b: str) -> bool:
        return False

    def remove_file(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except Exception as exc:
            if not _missing(exc):
                raise as_os_error(exc, "delete", path) from exc

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except Exception as exc:
            if not _missing(exc):
                raise as_os_error(exc, "delete", path) from exc
        self.fs.invalidate_cache(path)

    # ----------------------------------------------------------------- reading
    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self._call("stat", path, self.fs.exists, path)

    def listdir(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except Exception as exc:
            if _missing(exc):
                return []
            raise as_os_error(exc, "list", path) from exc
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    def read_bytes(self, path: str, limit: int) -> bytes | None:
        """The whole object, or None when there is none; OSError when it is over ``limit`` bytes."""
        try:
            size = self.fs.size(path)
        except Exception as exc:
            if _missing(exc):
                return None
            raise as_os_error(exc, "stat", path) from exc
        if size is None or size > limit:
            raise OSError(f"{path}: {size} bytes is over the {limit}-byte limit for this file")
        return self._call("download", path, self.fs.cat_file, path)

    def file_sizes(self, directory: str) -> dict[str, int]:
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory, detail=True)
        except Exception as exc:
            if _missing(exc):
                return {}
            raise as_os_error(exc, "list", directory) from exc
        return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e.get("type") == "file"}

    def modified(self, path: str) -> float:
        """When the object at ``path`` was written (seconds since the epoch)."""
        info = self._call("stat", path, self.fs.info, path)
        stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0.0)

    def read_ranges(self, path: str, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]:
        """The byte ranges (offset, length) of one object. Ranges that touch are merged into requests of up to
        ``_MERGED_READ_BYTES`` (chunks of one file lie end to end: fewer, larger GETs), and the requests run
        concurrently (fsspec's ``cat_ranges``); the caller bounds how many bytes one call asks for."""
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        spans: list[list[int]] = []  # [start, end, first index in order, last index + 1]
        for k, i in enumerate(order):
            off, n = ranges[i]
            if spans and off == spans[-1][1] and off + n - spans[-1][0] <= _MERGED_READ_BYTES:
                spans[-1][1], spans[-1][3] = off + n, k + 1
            else:
                spans.append([off, off + n, k, k + 1])
        got = self._call("ranged read", path, self.fs.cat_ranges, [path] * len(spans), [sp[0] for sp in spans],
                         [sp[1] for sp in spans], on_error="raise")
        out: list[bytes] = [b""] * len(ranges)
        for (start, _, first, last), data in zip(spans, got):
            view = memoryview(data)
            for i in order[first:last]:
                off, n = ranges[i]
                out[i] = view[off - start: off - start + n]
        return out

    def _call(self, op: str, path: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise as_os_error(exc, op, path) from exc
