"""Read a published checkpoint: resolve the tag, validate the (untrusted) manifest and rank indices, read and
decode only the tensors that are needed, verify checksums, rebuild the nested state on the right devices.

Raw chunks are read straight into the destination tensor (``preadv``), compressed chunks are decoded in a
thread pool; both release the GIL, so loading uses every core.

A save directory given as a URL (``s3://bucket/run``) is read through its storage object
(:mod:`asyncckpt.storage`): only tags with a commit marker (their manifest) exist there, and chunks are
fetched with concurrent ranged reads. The functions here take ``storage``: a Storage, the fsspec options of
one (a mapping), or None (local paths; URLs then use the environment's configuration, e.g. AWS_* variables).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import stat
import threading
import weakref
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .codec import ChunkCodec
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, InvalidTagError,
                     StateMismatchError, UnsafeCheckpointError)
from .format import (DTYPE_NAMES, LATEST, MANIFEST, MAX_JSON_BYTES, MAX_LATEST_BYTES, MAX_NDIM, OWNER_KEYS,
                     OWNER_ROWS, PARTIAL_SUFFIX, RANK_TABLE, TensorRecord, check_view, checksum,
                     is_checkpoint_file_name, parse_manifest, parse_rank_index, partial_dir_name, rank_index_name,
                     validate_tag)
from .owners import ROW, OwnerTable, RankTable, check_tables
from .placement import DTensorInfo, copy_overlap, local_region, to_dtensor
from .state import TAG, skeleton_tensor_refs, unflatten
from .storage import Storage, is_url, marker, open_storage

_FETCH_BATCH_BYTES = 256 << 20  # object stores: stored bytes fetched (and held) at once while loading
MapLocation = Any  # None | str | torch.device | dict[str, str] | Callable[[str], str | torch.device]


def object_store(path: str, storage: Storage | Mapping | None = None) -> Storage | None:
    """The object store ``path`` lives in (None for a local path): ``storage`` when it is one, else the one
    its URL names (``storage`` a mapping: its fsspec options)."""
    if storage is not None and not isinstance(storage, Mapping):
        return None if storage.local else storage
    if not is_url(os.fspath(path)):
        return None
    return open_storage(os.fspath(path), dict(storage) if storage is not None else None)


def list_tags(save_dir: str, *, storage: Storage | Mapping | None = None) -> list[str]:
    """Published tags in ``save_dir``, oldest first: real directories (not symlinks) with a valid tag name that
    hold a regular ``manifest.json`` (in an object store: prefixes holding their commit marker). Entries that
    would pass for a tag but are refused are in :func:`refused_tags`."""
    return _scan_save_dir(save_dir, storage)[0]


def refused_tags(save_dir: str, *, storage: Storage | Mapping | None = None) -> dict[str, str]:
    """Entries of ``save_dir`` that look like published tags but that no reader will load, with the reason: a
    symlink to a directory holding a manifest, a directory whose manifest is not a regular file, a directory
    with a manifest but a name that is not a valid tag."""
    return _scan_save_dir(save_dir, storage)[1]


def _scan_save_dir(save_dir: str, storage: Storage | Mapping | None = None) -> tuple[list[str], dict[str, str]]:
    store = object_store(save_dir, storage)
    if store is not None:
        try:
            return marker.list_tags(store, os.fspath(save_dir))
        except OSError as exc:
            raise CheckpointError(f"{save_dir}: cannot list the save directory ({exc})") from exc
    try:
        entries = list(os.scandir(save_dir))
    except (FileNotFoundError, NotADirectoryError):
        return [], {}
    except OSError as exc:
        raise CheckpointError(f"{save_dir}: cannot list the directory ({exc.strerror})") from exc
    published: list[tuple[float, str]] = []
    refused: dict[str, str] = {}
    for e in entries:
        if e.name.startswith("."):
            continue  # partial directories, temporary files
        try:
            st = _lstat(e.path)
            if st is None:
                continue
            if stat.S_ISLNK(st.st_mode):
                if os.path.isfile(os.path.join(e.path, MANIFEST)):
                    refused[e.name] = f"{e.path}: {_SYMLINKED_TAG}"
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            manifest = _lstat(os.path.join(e.path, MANIFEST))
        except CorruptCheckpointError as exc:  # unreadable: reported, and the other entries still listed
            refused[e.name] = str(exc)
            continue
        if manifest is None:
            continue  # incomplete: reported when asked for by name
        if not stat.S_ISREG(manifest.st_mode):
            refused[e.name] = f"{os.path.join(e.path, MANIFEST)}: {_kind(manifest.st_mode)}, not a regular file"
        elif not _valid_tag(e.name):
            refused[e.name] = f"{e.path}: {e.name!r} is not a valid tag name"
        else:
            published.append((st.st_mtime, e.name))
    return [name for _, name in sorted(published)], dict(sorted(refused.items()))


_SYMLINKED_TAG = ("the tag directory is a symbolic link; asyncckpt loads only tag directories that are real "
                  "directories of the save directory")


def _valid_tag(name: str) -> bool:
    try:
        validate_tag(name)
    except InvalidTagError:
        return False
    return True


def _lstat(path: str) -> os.stat_result | None:
    """``os.lstat``, None when nothing is there; any other failure is a CheckpointError naming the path."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot stat ({exc.strerror})") from exc


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_control_file(path: str, limit: int, storage: Storage | Mapping | None = None) -> bytes | None:
    """The bytes of a file asyncckpt writes and reads back (``latest``, a manifest, a rank index), read as
    untrusted input: opened with O_NOFOLLOW (a symlink is refused, never followed), O_NONBLOCK (a FIFO cannot
    hang the reader) and O_CLOEXEC; it must be a regular file of at most ``limit`` bytes. None when it does
    not exist. Errors name the file, never quote its contents. An object (a URL) is read whole, size checked
    first."""
    store = object_store(path, storage)
    if store is not None:
        try:
            return store.read_bytes(path, limit)
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: cannot read ({exc})") from exc
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeCheckpointError(f"{path}: {size} bytes is over the {limit}-byte limit for this file")
        pieces, left = [], limit + 1
        while left > 0:  # read to the end, at most one byte past the limit (to notice a file that grew)
            piece = os.read(fd, min(left, 1 << 24))
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
        data = b"".join(pieces)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeCheckpointError(f"{path}: grew past the {limit}-byte limit for this file while being read")
    return data


def _open_regular(path: str) -> int | None:
    """A read-only descriptor of ``path``, which must be a regular file reached without following a symlink in
    its last component; None when nothing is there."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        st = _lstat(path)
        if st is not None and not stat.S_ISREG(st.st_mode):  # ELOOP for a symlink, ENXIO for a socket, ...
            raise UnsafeCheckpointError(f"{path}: {_kind(st.st_mode)}, not a regular file; refused") from None
        raise CorruptCheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{path}: {_kind(mode)}, not a regular file; refused")
    return fd


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_latest(save_dir: str, *, storage: Storage | Mapping | None = None) -> str | None:
    """The tag ``save_dir/latest`` names, or None when there is no ``latest``. The file must hold exactly what
    the publisher writes, ``<tag>\n``: anything else is a damaged ``latest`` (CorruptCheckpointError naming
    it), never a missing tag."""
    path = os.path.join(save_dir, LATEST)
    data = read_control_file(path, MAX_LATEST_BYTES, storage)
    if data is None:
        return None
    try:  # None (no final newline) and undecodable bytes (U+FFFD) are invalid tags too
        return validate_tag(data[:-1].decode("ascii", "replace") if data.endswith(b"\n") else None)
    except InvalidTagError:
        raise CorruptCheckpointError(
            f"{path}: does not hold a valid tag followed by one newline ({len(data)} bytes); the file is damaged: "
            "pass the tag to load explicitly, or write the tag of a published checkpoint into it") from None


def resolve_tag(save_dir: str, tag: str | int | None, *, storage: Storage | Mapping | None = None) -> str:
    """The tag to load: ``tag``, or the one ``latest`` names. Errors list the tags that exist."""
    save_dir = os.fspath(save_dir)
    named_by = ""
    if tag is None:
        tag = read_latest(save_dir, storage=storage)
        if tag is None:
            raise CheckpointNotFoundError(
                f"no '{LATEST}' file in {save_dir}; published tags: {_tags_text(save_dir, storage)}")
        named_by = f" (named by {os.path.join(save_dir, LATEST)})"
    else:
        tag = validate_tag(tag)
    store = object_store(save_dir, storage)
    if store is not None:
        return _resolve_marked(store, save_dir, tag, named_by)
    path = tag_dir(save_dir, tag)
    st = _lstat(path)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafeCheckpointError(f"{path}{named_by}: {_SYMLINKED_TAG}")
    if st is None or not stat.S_ISDIR(st.st_mode):
        partial = os.path.isdir(os.path.join(save_dir, partial_dir_name(tag)))
        why = ("it was never completed (only a partial directory exists)" if partial else
               "it does not exist" if st is None else f"it is {_kind(st.st_mode)}, not a checkpoint directory")
        raise CheckpointNotFoundError(
            f"checkpoint tag {tag!r} in {save_dir}{named_by}: {why}; published tags: {_tags_text(save_dir)}")
    if _lstat(os.path.join(path, MANIFEST)) is None:
        raise CheckpointNotFoundError(f"checkpoint {path} is incomplete (no {MANIFEST}); published tags: {_tags_text(save_dir)}")
    return tag


def _resolve_marked(store: Storage, save_dir: str, tag: str, named_by: str) -> str:
    """``resolve_tag`` in an object store: the tag must have its commit marker."""
    try:
        if store.exists(marker.marker_path(store, save_dir, tag)):
            return tag
        why = ("it was never completed (no commit marker)" if store.listdir(store.join(save_dir, tag)) else
               "it does not exist")
    except OSError as exc:
        raise CheckpointError(f"checkpoint tag {tag!r} in {save_dir}: cannot look it up ({exc})") from exc
    raise CheckpointNotFoundError(f"checkpoint tag {tag!r} in {save_dir}{named_by}: {why}; published tags: "
                                  f"{_tags_text(save_dir, store)}")


def tag_dir(save_dir: str, tag: str) -> str:
    """The directory holding ``tag``: ``save_dir/tag``, or, while an overwrite of it was cut short between
    its two renames (file systems without RENAME_EXCHANGE), the complete old copy that the next save puts back."""
    path = os.path.join(save_dir, tag)
    replaced = os.path.join(save_dir, f".{tag}.replaced{PARTIAL_SUFFIX}")
    if _lstat(path) is None and _lstat(os.path.join(replaced, MANIFEST)) is not None:
        return replaced
    return path


def _tags_text(save_dir: str, storage: Storage | Mapping | None = None) -> str:
    tags = list_tags(save_dir, storage=storage)
    return ", ".join(tags) if tags else "none"


def split_path(path: str, *, storage: Storage | Mapping | None = None) -> tuple[str, str | None]:
    """``DIR`` or ``DIR/TAG`` → (save_dir, tag or None)."""
    path = os.fspath(path).rstrip("/") or "/"
    store = object_store(path, storage)
    if store is not None:
        if store.exists(store.join(path, MANIFEST)):
            return path.rsplit("/", 1)[0], path.rsplit("/", 1)[1]
        return path, None
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, None


def target_device(saved: str, map_location: MapLocation) -> torch.device:
    if map_location is None:
        try:  # any device string of the format's grammar; this torch may not know its type
            dev = torch.device(saved)
        except (RuntimeError, ValueError):
            raise CheckpointNotFoundError(f"a tensor was saved on {saved}, a device this torch does not know; "
                                          "pass map_location (e.g. 'cpu')") from None
    elif isinstance(map_location, (str, torch.device)):
        dev = torch.device(map_location)
    elif isinstance(map_location, dict):
        dev = torch.device(map_location.get(saved, saved))
    elif callable(map_location):
        dev = torch.device(map_location(saved))
    else:
        raise TypeError(f"map_location must be None, a device, a dict or a callable, not {type(map_location).__name__}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointNotFoundError(
            f"a tensor was saved on {saved} but CUDA is not available here; pass map_location='cpu'") from None
    return dev


class _TagFiles:
    """The files of one tag, reached only through a descriptor of the tag directory opened when the reader
    starts (``O_DIRECTORY | O_NOFOLLOW``), each opened with ``openat`` as a regular file (``O_NOFOLLOW``). An
    overwrite that exchanges the tag directory, or a removal of it, after that point never makes the reader open
    another version's files: it reads the version it started with, or fails naming the file it cannot find.
    Within :meth:`pinned` (one load), every file opened stays open until the load ends, so that the files of a
    load are all opened before it reads any data, and a removal of the tag during the load does not affect it.
    Counts the files it opens and the metadata bytes it reads (what a load costs, whatever the world size)."""

    def __init__(self, path: str):
        self.path = path
        self.opened = 0  # files opened, the directory included
        self.metadata_bytes = 0  # bytes of manifests, rank indices and tables read
        self._fds: dict[str, tuple[int, int]] = {}  # open files: name -> (fd, size)
        self._kept: set[str] = set()  # files read by range while the reader lives (the tables)
        self._depth = 0
        self._lock = threading.Lock()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: the checkpoint directory disappeared before it was opened") from None
        except OSError as exc:
            st = _lstat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise UnsafeCheckpointError(f"{path}: {_kind(st.st_mode)}, not a checkpoint directory") from None
            raise CorruptCheckpointError(f"{path}: cannot open the directory ({exc.strerror})") from exc
        self.opened += 1
        self._dir = [fd]
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._dir)

    @property
    def dir_fd(self) -> int:
        if not self._dir:
            raise CheckpointError(f"{self.path}: the reader is closed")
        return self._dir[0]

    def _open(self, name: str) -> tuple[int, int] | None:
        where = os.path.join(self.path, name)
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            try:
                st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):  # ELOOP for a symlink, ENXIO for a socket, ...
                raise UnsafeCheckpointError(f"{where}: {_kind(st.st_mode)}, not a regular file; refused") from None
            raise CorruptCheckpointError(f"{where}: cannot open ({exc.strerror})") from exc
        self.opened += 1
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeCheckpointError(f"{where}: {_kind(st.st_mode)}, not a regular file; refused")
        return fd, st.st_size

    def get(self, name: str, keep: bool = False) -> tuple[int, int] | None:
        """(fd, size) of ``name``, opened once and held (until the load ends, or, with ``keep``, until the
        reader is closed); None when it does not exist."""
        with self._lock:
            if name not in self._fds:
                got = self._open(name)
                if got is None:
                    return None
                self._fds[name] = got
            if keep:
                self._kept.add(name)
            return self._fds[name]

    def size(self, name: str) -> int | None:
        """The size of ``name``: held open when a load is under way (it is one of the files it reads)."""
        if self._depth or name in self._fds:
            got = self.get(name)
            return None if got is None else got[1]
        got = self._open(name)
        if got is None:
            return None
        os.close(got[0])
        return got[1]

    @contextlib.contextmanager
    def pinned(self):
        """Files opened inside stay open until the outermost ``pinned`` ends, then are closed."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                with self._lock:
                    for name in [n for n in self._fds if n not in self._kept]:
                        os.close(self._fds.pop(name)[0])

    def read_all(self, name: str, limit: int) -> bytes | None:
        """The whole of a control file (manifest, rank index, owner keys), at most ``limit`` bytes."""
        where = os.path.join(self.path, name)
        got = self._open(name) if name not in self._fds else self._fds[name]
        if got is None:
            return None
        fd, size = got
        try:
            if size > limit:
                raise UnsafeCheckpointError(f"{where}: {size} bytes is over the {limit}-byte limit for this file")
            data = _pread_all(fd, size, 0, where)
        finally:
            if name not in self._fds:
                os.close(fd)
        self.metadata_bytes += len(data)
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a table, held open while the reader lives."""
        where = os.path.join(self.path, name)
        got = self.get(name, keep=True)
        if got is None:
            raise CorruptCheckpointError(f"{where}: missing")
        if offset + length > got[1]:
            raise UnsafeCheckpointError(f"{where}: bytes {offset}..{offset + length} lie outside the file ({got[1]} bytes)")
        data = _pread_all(got[0], length, offset, where)
        self.metadata_bytes += len(data)
        return data

    def names(self) -> list[str]:
        try:
            return [e.name for e in os.scandir(self.dir_fd)]
        except OSError as exc:
            raise CorruptCheckpointError(f"{self.path}: cannot list the tag directory ({exc.strerror})") from exc

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptCheckpointError(f"{os.path.join(self.path, name)}: cannot stat ({exc.strerror})") from exc

    def close(self) -> None:
        self._finalizer()


def _close_all(fds: dict[str, tuple[int, int]], dir_fd: list[int]) -> None:
    for fd, _ in fds.values():
        os.close(fd)
    fds.clear()
    for fd in dir_fd:
        os.close(fd)
    dir_fd.clear()


def _pread_all(fd: int, size: int, offset: int, where: str) -> bytes:
    pieces, got = [], 0
    try:
        while got < size:
            piece = os.pread(fd, min(size - got, 1 << 24), offset + got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except OSError as exc:
        raise CorruptCheckpointError(f"{where}: cannot read ({exc.strerror})") from exc
    if got != size:
        raise CorruptCheckpointError(f"{where}: short read ({got} of {size} bytes; the file shrank)")
    return b"".join(pieces)


class _StoreFiles:
    """:class:`_TagFiles` for a tag in an object store: objects are read whole or by range through the storage
    (there are no descriptors to hold: an object store has no rename, so a published tag's objects are not
    swapped under a reader, see docs/FORMAT.md 11.7)."""

    def __init__(self, store: Storage, path: str):
        self.store, self.path = store, path
        self.opened = 0
        self.metadata_bytes = 0
        self._sizes: dict[str, int] | None = None

    def listing(self) -> dict[str, int]:
        if self._sizes is None:
            try:
                self._sizes = self.store.file_sizes(self.path)
            except OSError as exc:
                raise CorruptCheckpointError(f"{self.path}: cannot list the tag ({exc})") from exc
        return self._sizes

    def get(self, name: str, keep: bool = False) -> tuple[None, int] | None:
        size = self.size(name)
        return None if size is None else (None, size)

    def size(self, name: str) -> int | None:
        return self.listing().get(name)

    @contextlib.contextmanager
    def pinned(self):
        yield

    def read_all(self, name: str, limit: int) -> bytes | None:
        data = read_control_file(self.store.join(self.path, name), limit, self.store)
        self.opened += data is not None
        self.metadata_bytes += len(data or b"")
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        where = self.store.join(self.path, name)
        size = self.size(name)
        if size is None:
            raise CorruptCheckpointError(f"{where}: missing")
        if offset + length > size:
            raise UnsafeCheckpointError(f"{where}: bytes {offset}..{offset + length} lie outside the file ({size} bytes)")
        try:
            data = bytes(self.store.read_ranges(where, [(offset, length)])[0])
        except OSError as exc:
            raise CorruptCheckpointError(f"{where}: cannot read ({exc})") from exc
        if len(data) != length:
            raise CorruptCheckpointError(f"{where}: short read ({len(data)} of {length} bytes)")
        self.metadata_bytes += len(data)
        return data

    def close(self) -> None:
        pass


class _Sizes:
    """The sizes of data files a rank index declares, looked up one by one (only that rank's files)."""

    def __init__(self, files: "_TagFiles | _StoreFiles"):
        self._files = files

    def get(self, name: str) -> int | None:
        return self._files.size(name)


class CheckpointReader:
    """A validated view of one published tag, pinned to the version that was there when it was created (every
    file is reached through one directory descriptor, see :class:`_TagFiles`). Nothing large is allocated until
    tensors are read. Format v3 checkpoints are read lazily: a load reads the manifest, the rank table's row and
    index of the rank it loads and, only for tensors other ranks hold, the owner table's rows and those ranks'
    indices. Close it (or use it as a context manager) to release its descriptors; they are also released when
    it is garbage-collected. ``on_pinned``, when given, is called by each load once every file it reads is open,
    before any tensor data is read."""

    def __init__(self, save_dir: str, tag: str | int | None = None, *, threads: int = 0,
                 on_pinned: Callable[[], None] | None = None, storage: Storage | Mapping | None = None):
        self.save_dir = os.fspath(save_dir)
        self._store = object_store(self.save_dir, storage)
        self.tag = resolve_tag(self.save_dir, tag, storage=self._store)
        self.path = (self._store.join(self.save_dir, self.tag) if self._store is not None else
                     tag_dir(self.save_dir, self.tag))
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.on_pinned = on_pinned
        self.bytes_read = 0  # stored bytes read from data files so far (what loading this rank cost)
        self._files = _TagFiles(self.path) if self._store is None else _StoreFiles(self._store, self.path)
        try:
            self.manifest = parse_manifest(self._read_metadata(MANIFEST), self._file(MANIFEST))
            self.world_size = self.manifest["world_size"]
            self.version = self.manifest["format_version"]
            self._docs: dict[int, dict] = {}  # rank -> its index, for the indices read so far
            self._records: dict[str, dict[int, TensorRecord]] = {}  # key -> rank -> record, of those indices
            self._owners: OwnerTable | None = None
            self._checked: set[tuple[str, DTensorInfo]] = set()  # DTensor layouts whose saved shards were checked
            if self.version >= 3:
                size = self._files.get(RANK_TABLE, keep=True)
                if size is None:
                    raise CorruptCheckpointError(f"{self._file(RANK_TABLE)}: the rank table is missing")
                self._table = RankTable(self.manifest, self._files.read_range, size[1], self._file(RANK_TABLE))
                self._sizes: dict[str, int] | None = None
            else:  # v1, v2: every rank's entry is in the manifest; all indices are read now, one at a time
                self._entries = {e["rank"]: e for e in self.manifest["ranks"]}
                self._sizes = self._regular_file_sizes()
                for rank in self._entries:
                    self._index(rank)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def files_opened(self) -> int:
        return self._files.opened

    @property
    def metadata_bytes_read(self) -> int:
        return self._files.metadata_bytes

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _regular_file_sizes(self) -> dict[str, int]:
        """Every regular file of the tag directory and its size. An entry with the name of a checkpoint file
        (manifest, rank index, data file, table) that is anything else (a symlink, even to a file inside, a
        directory, a FIFO, a socket) makes the whole checkpoint refused."""
        if self._store is not None:
            return dict(self._files.listing())  # one listing of the tag per reader
        sizes = {}
        for name in self._files.names():
            st = self._files.lstat(name)
            if st is None:
                continue
            if stat.S_ISREG(st.st_mode):
                sizes[name] = st.st_size
            elif is_checkpoint_file_name(name):
                raise UnsafeCheckpointError(f"{self._file(name)}: {_kind(st.st_mode)}, not a regular file; every file "
                                            "of a checkpoint must be a regular file in its tag directory")
        return sizes

    def _read_metadata(self, name: str) -> bytes:
        """A manifest, rank index or owner keys: a regular file of the tag directory, at most MAX_JSON_BYTES."""
        data = self._files.read_all(name, MAX_JSON_BYTES)
        if data is None:
            listed = "rank table" if getattr(self, "version", 0) >= 3 else "manifest"
            what = {MANIFEST: "the manifest", OWNER_KEYS: "the owner table"}.get(name, f"rank index listed in the {listed}")
            raise CorruptCheckpointError(f"{self._file(name)}: {what} is missing")
        return data

    # ------------------------------------------------------------------------------------------ indices
    def holds(self, rank: int) -> bool:
        """Whether this copy of the checkpoint holds ``rank``'s files."""
        if self.version >= 3:
            return self._table.find(rank) is not None
        return rank in self._entries

    @property
    def first_rank(self) -> int:
        """The first rank this copy holds (the lowest; for format v1/v2, the first the manifest lists)."""
        return self._table.first() if self.version >= 3 else next(iter(self._entries))

    def rank_entries(self) -> list[dict]:
        """Every rank's entry: rank, index file, its checksum and the bytes the rank wrote (reads the whole rank
        table of a format v3 checkpoint)."""
        if self.version < 3:
            return list(self.manifest["ranks"])
        return [{"rank": r, "index": rank_index_name(r), "xxh3": x, "bytes": n} for r, x, n in self._table.all()]

    def _index(self, rank: int) -> dict | None:
        """Rank ``rank``'s index (read, checked and cached on first use), or None when this copy lacks it."""
        if rank in self._docs:
            return self._docs[rank]
        if self.version >= 3:
            found = self._table.find(rank)
            expected, by = (None, "") if found is None else (found[0], "the rank table's")
        else:
            entry = self._entries.get(rank)
            expected, by = (None, "") if entry is None else (entry["xxh3"], "the manifest's")
        if expected is None:
            return None
        name = rank_index_name(rank)
        data = self._read_metadata(name)
        if checksum(data) != expected:
            raise CorruptCheckpointError(f"{self._file(name)}: checksum does not match {by}")
        sizes = self._sizes if self._sizes is not None else _Sizes(self._files)
        doc, records = parse_rank_index(data, self._file(name), sizes, version=self.version, rank=rank)
        self._docs[rank] = doc
        for key, rec in records.items():
            self._records.setdefault(key, {})[rank] = rec
        return doc

    def _all_indices(self) -> None:
        if self.version >= 3:
            for entry in self.rank_entries():
                self._index(entry["rank"])

    def _owner_table(self) -> OwnerTable:
        if self._owners is None:
            data = self._read_metadata(OWNER_KEYS)
            owners = self.manifest["owners"]
            if checksum(data) != owners["xxh3"]:
                raise CorruptCheckpointError(f"{self._file(OWNER_KEYS)}: checksum does not match the manifest's")
            self._owners = OwnerTable(data, self._files.read_range, owners["rows_bytes"], self.world_size,
                                      self._file(OWNER_KEYS))
        return self._owners

    @property
    def indices(self) -> dict[int, dict]:
        """Every rank's index (a format v3 checkpoint's are all read: inspect, verify)."""
        self._all_indices()
        return dict(self._docs)

    @property
    def records(self) -> dict[str, list[tuple[int, TensorRecord]]]:
        """key -> [(rank, record), ...] over every rank's index."""
        self._all_indices()
        return {key: list(recs.items()) for key, recs in self._records.items()}

    def skeleton(self, rank: int = 0) -> Any:
        doc = self._index(rank)
        if doc is None or doc.get("skeleton") is None:
            doc = self._index(0) or self._index(self.first_rank)
        return doc.get("skeleton")

    @property
    def raw_bytes(self) -> int:
        return sum(rec.nbytes for recs in self.records.values() for _, rec in recs if not rec.is_view)

    @property
    def stored_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def files(self) -> dict[str, int]:
        """Every regular file in the tag directory (manifest, tables, rank indices, data files) and its size."""
        if self._sizes is None:
            self._sizes = self._regular_file_sizes()
        return dict(sorted(self._sizes.items()))

    # ----------------------------------------------------------------------------------------- reading
    def _find(self, key: str, rank: int) -> TensorRecord | None:
        for r in (rank, rank % self.world_size):  # its own copy, or that of the rank it stands for
            if self._index(r) is not None and r in self._records.get(key, {}):
                return self._records[key][r]
        recs = self._records.get(key)
        if recs:  # a copy in an index already read
            return next(iter(recs.values()))
        if self.version >= 3:
            holder = self._owner_table().first(key)
            if holder is not None and self._index(holder) is not None:
                return self._records.get(key, {}).get(holder)
        return None

    def record_for(self, key: str, rank: int = 0) -> TensorRecord:
        """The record of a non-sharded tensor as seen by ``rank``: its own copy when it wrote one (rank-local
        state), else the copy of rank ``rank % world_size`` (loading on another world size), else any copy
        (replicated state, written by whichever rank it was assigned to; format v3: the owner table's first)."""
        rec = self._find(key, rank)
        if rec is None:
            raise UnsafeCheckpointError(f"{self.path}: the skeleton references tensor {key!r}, which no rank index holds")
        return rec

    def _wanted(self, keys: list[str], rank: int) -> dict[str, TensorRecord]:
        wanted: dict[str, TensorRecord] = {}
        for key in keys:
            rec = self.record_for(key, rank)
            wanted[key] = rec
            if rec.is_view and not rec.packed:
                base = self.record_for(rec.base, rank)
                check_view(rec, base, f"{self.path}: tensor {key!r}")
                wanted[rec.base] = base
        return wanted

    def read_tensors(self, keys: Iterable[str], *, rank: int = 0, map_location: MapLocation = None,
                     verify: bool = True) -> dict[str, torch.Tensor]:
        """Read the tensors named by ``keys`` (and the storages their views need)."""
        keys = list(dict.fromkeys(keys))
        with self._files.pinned():
            return self._read_wanted(keys, self._wanted(keys, rank), map_location, verify)

    def _read_wanted(self, keys: list[str], wanted: dict[str, TensorRecord], map_location: MapLocation,
                     verify: bool) -> dict[str, torch.Tensor]:
        plain = {k: r for k, r in wanted.items() if not r.is_view or r.packed}
        cpu = self._read_plain(plain, verify)
        out: dict[str, torch.Tensor] = {}
        for key, t in cpu.items():
            dev = target_device(plain[key].device, map_location)
            out[key] = t if dev.type == "cpu" else t.to(dev)
        for key, rec in wanted.items():
            if rec.is_view and not rec.packed:
                base = out[rec.base]
                view = torch.empty(0, dtype=rec.dtype, device=base.device)
                view.set_(base.untyped_storage(), rec.byte_offset // rec.dtype.itemsize, rec.shape, rec.stride)
                out[key] = view
        return {k: out[k] for k in keys}

    def _sources(self, key: str, shape: tuple[int, ...], offset: tuple[int, ...], rank: int | None) -> list[TensorRecord]:
        """The records a region of ``key`` is assembled from: every record of it (format v1/v2, all read); for
        format v3, ``rank``'s own shard when it is exactly the region (same-layout resume), else the shards the
        owner table says overlap it."""
        if self.version < 3:
            return [rec for rec in self._records.get(key, {}).values()]
        if rank is not None and self._index(rank) is not None:
            own = self._records.get(key, {}).get(rank)
            if own is not None and _box(own) == (tuple(offset), tuple(shape)):
                return [own]
        owners = self._owner_table()
        holders = owners.overlapping(key, tuple(offset), tuple(shape))
        if not holders and owners.first(key) is not None:  # not sharded: one whole copy
            holders = [owners.first(key)]
        out = []
        for r in holders:
            if self._index(r) is not None and r in self._records.get(key, {}):
                out.append(self._records[key][r])
        return out

    def read_region(self, key: str, shape: tuple[int, ...], offset: tuple[int, ...], *, verify: bool = True,
                    rank: int | None = None) -> torch.Tensor:
        """The box ``shape`` at ``offset`` of a (possibly sharded) tensor, assembled from the saved shards that
        overlap it (shards that do not overlap are not read); they must cover it exactly once."""
        with self._files.pinned():
            return self._read_region(key, shape, offset, self._sources(key, shape, offset, rank), verify)

    def _read_region(self, key: str, shape: tuple[int, ...], offset: tuple[int, ...], recs: list[TensorRecord],
                     verify: bool) -> torch.Tensor:
        if not recs:
            raise UnsafeCheckpointError(f"{self.path}: the skeleton references tensor {key!r}, which no rank index holds")
        out = torch.empty(shape, dtype=recs[0].dtype)
        parts: set[tuple] = set()
        for rec in dict.fromkeys(recs):
            if rec.dtype != out.dtype or (rec.is_view and not rec.packed):
                raise UnsafeCheckpointError(f"{self.path}: shards of {key!r} must hold their own bytes, of one dtype")
            src_offset, src_shape = _box(rec)
            if (src_offset, src_shape) in {p[0] for p in parts} or not _overlaps(offset, shape, src_offset, src_shape):
                continue  # a replicated copy of a shard already read, or a shard this rank does not need
            lo = tuple(max(a, b) for a, b in zip(offset, src_offset))
            hi = tuple(min(a + n, b + m) for a, n, b, m in zip(offset, shape, src_offset, src_shape))
            parts.add(((src_offset, src_shape), (tuple(l - o for l, o in zip(lo, offset)),
                                                 tuple(h - l for h, l in zip(hi, lo))), rec))
        if not _tiles({p[1] for p in parts}, tuple(shape)) or len({p[1] for p in parts}) != len(parts):
            covered = sum(math.prod(p[1][1]) for p in parts)
            raise UnsafeCheckpointError(
                f"{self.path}: the saved shards of {key!r} do not cover the region requested (shape {list(shape)} at "
                f"{list(offset)}) exactly once ({covered} of {out.numel()} elements)")
        for (src_offset, _), _, rec in parts:
            src = self._read_plain({key: rec}, verify)[key]
            copy_overlap(out, offset, src, src_offset)
        return out

    def _read_plain(self, records: dict[str, TensorRecord], verify: bool) -> dict[str, torch.Tensor]:
        """Tensors with their own storage: stored ones, and packed ones (each copied out of its pack; the
        packs are read in the same batch of chunks)."""
        packed = {k: r for k, r in records.items() if r.packed}
        stored = {k: r for k, r in records.items() if not r.packed}
        for key, rec in packed.items():
            if rec.base not in stored:
                base = next(iter(self._records.get(rec.base, {}).values()), None)  # in the view's own index
                stored[rec.base] = base if base is not None else self.record_for(rec.base)
            check_view(rec, stored[rec.base], f"{self.path}: tensor {key!r}")
        tensors = {k: torch.empty(r.shape, dtype=r.dtype) for k, r in stored.items()}
        tasks = []
        for key, rec in stored.items():
            flat = _bytes_view(tensors[key])
            pos = 0
            for i, c in enumerate(rec.chunks):
                tasks.append((rec, i, c, flat[pos: pos + c.raw]))
                pos += c.raw
        with self._files.pinned():
            if self._store is not None:
                self._fetch_chunks(tasks, verify)
            else:
                self._run_chunks(tasks, self._open_data(stored.values()), verify)
        for key, rec in packed.items():  # contiguous (parse_rank_index checks): a byte range of the pack
            start = rec.byte_offset
            tensors[key] = tensors[rec.base][start: start + rec.nbytes].clone().view(rec.dtype).view(rec.shape)
        return {k: tensors[k] for k in records}

    def _open_data(self, records: Iterable[TensorRecord]) -> dict[str, int]:
        """Descriptors of the data files of ``records`` (held until the load ends)."""
        fds = {}
        for rec in records:
            if rec.file and rec.file not in fds:
                got = self._files.get(rec.file)
                if got is None:
                    raise CorruptCheckpointError(f"{self._file(rec.file)}: data file is missing")
                fds[rec.file] = got[0]
        return fds

    def _fetch_chunks(self, tasks: list, verify: bool) -> None:
        """Object stores: the chunks in batches of at most _FETCH_BATCH_BYTES, each batch fetched with concurrent
        ranged reads (one request per chunk, the storage runs them together), then checked and decoded in the
        reader's threads as a local read would be. Memory beyond the tensors: one batch of stored bytes."""
        self.bytes_read += sum(t[2].length for t in tasks)
        batch: list = []
        size = 0
        for t in tasks:
            if batch and size + t[2].length > _FETCH_BATCH_BYTES:
                self._fetch_batch(batch, verify)
                batch, size = [], 0
            batch.append(t)
            size += t[2].length
        if batch:
            self._fetch_batch(batch, verify)

    def _fetch_batch(self, tasks: list, verify: bool) -> None:
        by_file: dict[str, list] = {}
        for t in tasks:
            by_file.setdefault(t[0].file, []).append(t)
        fetched = []
        for name, part in by_file.items():
            path = self._file(name)
            try:
                got = self._store.read_ranges(path, [(t[2].offset, t[2].length) for t in part])
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path}: data file is missing") from None
            except OSError as exc:
                raise CorruptCheckpointError(f"{path}: cannot read ({exc})") from exc
            fetched += zip(part, got)

        def one(item) -> None:
            (rec, i, c, out), stored = item
            where = f"{self._file(rec.file)} chunk {i} (bytes {c.offset}..{c.offset + c.length}) of tensor {rec.key!r}"
            if len(stored) != c.length:
                raise CorruptCheckpointError(f"{where}: short read ({len(stored)} of {c.length} bytes)")
            if c.codec == "raw":
                out[:] = np.frombuffer(stored, dtype=np.uint8)
                if verify and checksum(out) != c.xxh3:
                    raise CorruptCheckpointError(f"{where}: checksum mismatch")
                return
            _decode_stored(c, stored, out, verify, where)

        workers = min(self.threads, len(fetched))
        if workers <= 1:
            for item in fetched:
                one(item)
            return
        with concurrent.futures.ThreadPoolExecutor(workers, "asyncckpt-load") as pool:
            for fut in [pool.submit(one, item) for item in fetched]:
                fut.result()

    def _run_chunks(self, tasks: list, fds: dict[str, int], verify: bool) -> None:
        def one(task) -> None:
            rec, i, c, out = task
            where = f"{self._file(rec.file)} chunk {i} (bytes {c.offset}..{c.offset + c.length}) of tensor {rec.key!r}"
            fd = fds[rec.file]
            try:
                if c.codec == "raw":
                    n = os.preadv(fd, [out], c.offset)
                    if n != c.raw:
                        raise CorruptCheckpointError(f"{where}: short read ({n} of {c.raw} bytes)")
                    if verify and checksum(out) != c.xxh3:
                        raise CorruptCheckpointError(f"{where}: checksum mismatch")
                    return
                stored = os.pread(fd, c.length, c.offset)
            except OSError as exc:
                raise CorruptCheckpointError(f"{where}: cannot read ({exc.strerror})") from exc
            if len(stored) != c.length:
                raise CorruptCheckpointError(f"{where}: short read ({len(stored)} of {c.length} bytes)")
            _decode_stored(c, stored, out, verify, where)

        self.bytes_read += sum(t[2].length for t in tasks)
        workers = min(self.threads, len(tasks))
        if workers <= 1:
            for t in tasks:
                one(t)
            return
        failed = threading.Event()

        def share(part: list) -> None:  # one future per thread, not per chunk: bookkeeping stays small
            try:
                for t in part:
                    if failed.is_set():
                        return
                    one(t)
            except BaseException:
                failed.set()
                raise

        with concurrent.futures.ThreadPoolExecutor(workers, "asyncckpt-load") as pool:
            futures = [pool.submit(share, tasks[w::workers]) for w in range(workers)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------------------------------ structure
    def check_structure(self) -> None:
        """Everything a load checks before it reads tensor data, for every rank that saved: its skeleton parses
        and every tensor it references resolves (to a plain record; to a view whose storage record exists and
        covers it; or to the records of a DTensor, whose global shape they have and which they cover exactly
        once); and every view record, referenced or not, has such a storage; for format v3, the owner table
        lists exactly the records of the indices. ``load_state`` runs the checks (``_plan``) for the rank it
        loads; ``verify`` runs this before reading every chunk."""
        records = self.records
        for rank in sorted(self._docs):
            self._plan(rank, complete=True)
        packs = set()
        for key, recs in records.items():
            for rank, rec in recs:
                if rec.is_view:
                    self._check_storage(key, rec, rank)
                    if rec.packed:
                        packs.add(rec.base)
        if self.version >= 3:
            self._table.all()
            for name, size, expected in ((RANK_TABLE, self._table.rows * ROW, self.manifest["rank_table"]["xxh3"]),
                                         (OWNER_ROWS, self.manifest["owners"]["rows_bytes"],
                                          self.manifest["owners"]["rows_xxh3"])):
                got = self._files.get(name, keep=True)
                if got is None or got[1] != size or checksum(self._files.read_range(name, 0, size)) != expected:
                    raise CorruptCheckpointError(f"{self._file(name)}: missing, or its size or checksum does not "
                                                 "match the manifest's")
            check_tables(self._owner_table(), records, packs, self._file(OWNER_KEYS))

    def _plan(self, rank: int, complete: bool) -> tuple[Any, list[str], dict[str, DTensorInfo]]:
        """(skeleton, keys of the plain tensors it references, layouts of its DTensors) for loading ``rank``;
        raises if anything it references does not resolve. ``complete``: also check every saved shard of its
        DTensors (needs every index; a load of format v3 checks the shards it reads instead)."""
        skeleton = self.skeleton(rank)
        where = f"{self.path}: skeleton of rank {rank}"
        refs = skeleton_tensor_refs(skeleton, where=where)
        unflatten(skeleton, {}, where=where, check_only=True)  # every node well-formed before any data is read
        plain: list[str] = []
        dtensors: dict[str, DTensorInfo] = {}
        for key, node in refs.items():
            if node.get(TAG) == "dtensor":
                dtensors[key] = self._dtensor_layout(key, node, complete)
                continue
            rec = self.record_for(key, rank)
            if rec.is_view:
                self._check_storage(key, rec, rank)
            if node.get(TAG) == "ndarray":
                _check_ndarray(node, rec, f"{where}: array {key!r}")
            plain.append(key)
        return skeleton, plain, dtensors

    def _check_storage(self, key: str, view: TensorRecord, rank: int) -> None:
        base = self._find(view.base, rank)
        if base is None:
            raise UnsafeCheckpointError(f"{self.path}: view {key!r} (rank {rank}) is a view of storage {view.base!r}, "
                                        "which no rank index holds")
        check_view(view, base, f"{self.path}: tensor {key!r} (rank {rank})")

    def _dtensor_layout(self, key: str, node: dict, complete: bool) -> DTensorInfo:
        where = f"{self.path}: DTensor {key!r}"
        gshape, placements = node.get("global_shape"), node.get("placements")
        if not (_is_shape(gshape) and isinstance(placements, list) and placements
                and all(_is_placement(p, len(gshape)) for p in placements)):
            raise UnsafeCheckpointError(f"{where}: malformed DTensor node (global_shape {gshape!r:.100}, "
                                        f"placements {placements!r:.100})")
        info = DTensorInfo(tuple(gshape), tuple(tuple(p) for p in placements))
        if complete and (key, info) not in self._checked:  # every rank's skeleton names it: check its shards once
            recs = list(self._records.get(key, {}).values())
            if not recs:
                raise UnsafeCheckpointError(f"{self.path}: the skeleton references tensor {key!r}, which no rank index holds")
            self._check_shards(key, info, recs)
            if not _tiles({_box(rec) for rec in recs}, info.global_shape):
                raise UnsafeCheckpointError(f"{where}: its saved shards do not cover the global shape "
                                            f"{list(info.global_shape)} exactly once (holes or overlaps)")
            self._checked.add((key, info))
        return info

    def _check_shards(self, key: str, info: DTensorInfo, recs: Iterable[TensorRecord]) -> None:
        """The records a DTensor is read from hold their own bytes, of one dtype, with its global shape (the
        shape a load allocates)."""
        where = f"{self.path}: DTensor {key!r}"
        recs = list(recs)
        saved = {rec.global_shape if rec.is_shard else rec.shape for rec in recs}
        if saved != {info.global_shape}:
            raise UnsafeCheckpointError(f"{where} claims global shape {list(info.global_shape)}, "
                                        f"but its saved shards have {sorted(list(s) for s in saved)}")
        if any(rec.is_view for rec in recs) or len({rec.dtype for rec in recs}) != 1:
            raise UnsafeCheckpointError(f"{where}: its records must all hold their own bytes, of one dtype")

    # -------------------------------------------------------------------------------------------- loading
    def load_state(self, *, rank: int = 0, map_location: MapLocation = None, verify: bool = True,
                   allow_pickle: bool = False, mesh: Any = None) -> Any:
        """Rebuild the state as ``rank`` saved it (another world size works too). DTensors come back as
        DTensors on ``mesh`` (resharded to it) when a mesh is given, else as full plain tensors. Every file the
        load reads is opened (and its metadata read) before any tensor data is read."""
        with self._files.pinned():
            skeleton, plain, dtensors = self._plan(rank, complete=self.version < 3)
            wanted = self._wanted(plain, rank)
            regions = {}
            for key, info in dtensors.items():
                shape, offset = self.region_of(key, info, mesh)
                recs = self._sources(key, shape, offset, rank)
                self._check_shards(key, info, recs)
                regions[key] = (shape, offset, recs)
            self._open_data([*wanted.values(), *(r for _, _, recs in regions.values() for r in recs)])
            if self.on_pinned is not None:
                self.on_pinned()
            tensors = self._read_wanted(plain, wanted, map_location, verify)
            for key, (shape, offset, recs) in regions.items():
                local = self._read_region(key, shape, offset, recs, verify)
                dev = target_device(recs[0].device, map_location)
                if dev.type != "cpu":
                    local = local.to(dev)
                tensors[key] = local if mesh is None else to_dtensor(local, dtensors[key], mesh)
        return unflatten(skeleton, tensors, allow_pickle=allow_pickle, where=self.path)

    def region_of(self, key: str, info: DTensorInfo, mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shape, global offset) of the part of DTensor ``key`` a load reads: the whole tensor without a mesh,
        else this rank's shard on ``mesh``. A subclass may choose other regions (a simulation of many ranks)."""
        if mesh is None:
            return info.global_shape, (0,) * len(info.global_shape)
        try:
            return local_region(info, mesh)
        except ValueError as exc:  # saved for a mesh of another number of dimensions
            raise StateMismatchError(f"{self.path}: DTensor {key!r}: {exc}") from None

    def verify(self) -> dict:
        """Check what a load of any rank would check (:meth:`check_structure`), then read and check every chunk
        of every rank. Raises CorruptCheckpointError naming the file, chunk and tensor at fault; returns counts."""
        self.check_structure()
        n_chunks = 0
        for key, recs in self.records.items():
            for rank, rec in recs:
                if rec.is_view:
                    continue
                self._read_plain({key: rec}, verify=True)
                n_chunks += len(rec.chunks)
        return {"tensors": sum(len(r) for r in self.records.values()), "chunks": n_chunks,
                "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes}


def _box(rec: TensorRecord) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, shape) of the part of a tensor a record holds: a shard's, or the whole tensor."""
    return (tuple(rec.global_offset) if rec.is_shard else (0,) * len(rec.shape)), tuple(rec.shape)


def _decode_stored(c, stored: bytes, out: np.ndarray, verify: bool, where: str) -> None:
    """Decode one compressed chunk into ``out``, checking its checksums."""
    ChunkCodec.decode(c, memoryview(stored), out, verify, where)
    if verify and c.sxxh3 and checksum(stored) != c.sxxh3:  # flips that decode to the same bytes
        raise CorruptCheckpointError(f"{where}: checksum mismatch in the stored (compressed) bytes")


# the dtypes numpy has: an ndarray node's record holds one of them
_NUMPY_DTYPES = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16",
                           "float32", "float64", "complex64", "complex128"})


def _check_ndarray(node: dict, rec: TensorRecord, where: str) -> None:
    """A numpy array node names a record of a numpy dtype holding as many elements as its shape (the record's
    own shape may differ: format v1 stored a 0-d array as a [1] record)."""
    shape = node.get("shape")
    if not (_is_shape(shape) and math.prod(shape) == math.prod(rec.shape)):
        raise UnsafeCheckpointError(f"{where}: shape {shape!r:.100} does not hold the {math.prod(rec.shape)} "
                                    "elements of its record")
    if DTYPE_NAMES[rec.dtype] not in _NUMPY_DTYPES:
        raise UnsafeCheckpointError(f"{where}: its record's dtype {DTYPE_NAMES[rec.dtype]} is not a numpy dtype")


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_NDIM and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _is_placement(p: Any, ndim: int) -> bool:
    """``["R"]`` or ``["S", dim]`` with ``dim`` a dimension of the tensor."""
    if p == ["R"]:
        return True
    return (isinstance(p, list) and len(p) == 2 and p[0] == "S" and isinstance(p[1], int)
            and not isinstance(p[1], bool) and -ndim <= p[1] < ndim)


def _tiles(boxes: set[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...]) -> bool:
    """Whether the boxes (offset, shape), each inside ``shape``, cover it exactly once. Identical boxes (one
    shard saved by several ranks) count once; empty boxes cover nothing."""
    live = [b for b in boxes if math.prod(b[1])]
    if sum(math.prod(s) for _, s in live) != math.prod(shape):
        return False
    if len(live) < 2:
        return True
    # sweep along the dimension with the most distinct starts: only boxes that meet there are compared
    d = max(range(len(shape)), key=lambda i: len({off[i] for off, _ in live}))
    live.sort(key=lambda b: b[0][d])
    open_: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for off, shp in live:
        open_ = [(o, s) for o, s in open_ if o[d] + s[d] > off[d]]
        if any(_overlaps(o, s, off, shp) for o, s in open_):
            return False
        open_.append((off, shp))
    return True


def _overlaps(a_off, a_shape, b_off, b_shape) -> bool:
    return all(max(ao, bo) < min(ao + al, bo + bl) for ao, al, bo, bl in zip(a_off, a_shape, b_off, b_shape)) \
        or (len(a_shape) == 0)


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def load(save_dir: str, tag: str | None = None, map_location: MapLocation = None, *, verify: bool = True,
         allow_pickle: bool = False, rank: int | None = None, mesh: Any = None,
         storage: Storage | Mapping | None = None) -> Any:
    """Load the nested state saved by :func:`asyncckpt.save` (``tag`` None → the tag ``latest`` names).
    ``rank`` defaults to this process's rank; DTensors are resharded onto ``mesh`` when one is given.
    ``storage``: for a URL, the fsspec options (the config's ``storage.options``) or a Storage."""
    if rank is None:
        rank = _current_rank()
    with CheckpointReader(save_dir, tag, storage=storage) as reader:
        return reader.load_state(rank=rank, map_location=map_location, verify=verify, allow_pickle=allow_pickle,
                                 mesh=mesh)


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
