"""A storage wrapper that records, in order, every change a save makes to a save directory, with enough data to
replay it: what a power-loss checker (tests/powerloss.py) needs to rebuild every state a crash may leave.

Install it like any wrapper::

    recorder = Recorder(save_dir)
    with storage.wrapping(recorder.wrap):
        asyncckpt.save(state, save_dir, "t1").result()
    log = recorder.finish()  # list[Op], in the order the operations completed

The log is made of primitive file-system operations (:data:`KINDS`); each storage method is logged as the
primitives it performs:

* ``open_write`` → ``create``; the file's ``write`` → ``write`` (offset and bytes); ``sync`` → ``fsync``
  (``writeback``, ``close`` and ``abort`` change nothing a crash could keep);
* ``write_durable`` → ``create``, ``write``, ``fsync`` (without ``fsync=False``);
* ``replace_atomic`` → ``create`` of a temporary file ``.<name>.<hex>.tmp`` next to the target, ``write``,
  ``fsync``, ``rename`` over the target, ``fsync_dir`` (the steps of :func:`asyncckpt.durable.replace_atomic`;
  the real temporary name is random, the logged one is a counter). A writer function is run into memory
  first and its bytes are passed on;
* ``makedirs`` → one ``mkdir`` per directory it created; ``rename``, ``exchange`` (only when it returned
  True), ``fsync_dir`` → themselves; ``remove_file`` → ``unlink`` (when there was a file);
  ``remove_tree`` → ``unlink`` of every file and ``rmdir`` of every directory, children first.

Changes made outside the storage seam — the flock files of :mod:`asyncckpt.ownership`, which need a real file
descriptor — are noticed by listing the top level of the save directory before every operation and at
:meth:`Recorder.finish`: a new name is logged as ``create`` and ``write`` of its content, a vanished one as
``unlink``, a changed content as ``create`` (truncate) and ``write``; these ops have ``external=True``.

The recorder serialises the wrapped operations (it holds a lock while each runs, so the log order is the order
they happened in). An operation that raises is not logged: record saves on a healthy disk.
"""
from __future__ import annotations

import io
import itertools
import os
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from .base import Storage

CREATE, WRITE, FSYNC, FSYNC_DIR, MKDIR, RENAME, EXCHANGE, UNLINK, RMDIR = (
    "create", "write", "fsync", "fsync_dir", "mkdir", "rename", "exchange", "unlink", "rmdir")
KINDS = (CREATE, WRITE, FSYNC, FSYNC_DIR, MKDIR, RENAME, EXCHANGE, UNLINK, RMDIR)


@dataclass(frozen=True)
class Op:
    """One primitive operation. ``create`` makes an empty regular file (or truncates an existing one); ``write``
    puts ``data`` at ``offset``; ``rename``/``exchange`` use ``dst``. ``method`` is the storage method it was
    part of (``"external"`` for a change seen by listing)."""

    kind: str
    path: str
    dst: str = ""
    offset: int = 0
    data: bytes = b""
    method: str = ""
    external: bool = False

    def __str__(self) -> str:
        what = {WRITE: f" [{self.offset}:{self.offset + len(self.data)}]", RENAME: f" -> {self.dst}",
                EXCHANGE: f" <-> {self.dst}"}.get(self.kind, "")
        via = " (outside the storage seam)" if self.external else f" ({self.method})" if self.method else ""
        return f"{self.kind} {self.path}{what}{via}"


class Recorder:
    """Records the operations of every storage it wraps (meant for the saves into ``root``, a save directory
    that exists before the first one: the log starts from it)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.log: list[Op] = []
        self._lock = threading.RLock()
        self._tmp_names = itertools.count(1)
        self._names = self._list_root()  # the top-level names the log accounts for
        self._outside: dict[str, bytes] = {}  # external top-level files, and the content last logged

    def wrap(self, inner: Storage) -> "RecordingStorage":
        return RecordingStorage(inner, self)

    def finish(self) -> list[Op]:
        """Notice what changed outside the seam since the last operation; the complete log."""
        with self._lock:
            self._notice_outside()
            return list(self.log)

    # ------------------------------------------------------------------------------------ bookkeeping
    def _list_root(self) -> dict[str, bool]:
        try:
            return {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(self.root)}
        except FileNotFoundError:
            return {}

    def _add(self, op: Op) -> None:
        self.log.append(op)
        for path, present, is_dir in self._top_level_effects(op):
            name = os.path.basename(path)
            if present:
                self._names[name] = is_dir
            else:
                self._names.pop(name, None)
                self._outside.pop(name, None)

    def _top_level_effects(self, op: Op) -> list[tuple[str, bool, bool]]:
        """(path, present afterwards, is a directory) for each top-level name of ``root`` the op changes."""
        def top(p: str) -> bool:
            return os.path.dirname(p) == self.root

        out = []
        if op.kind in (CREATE, MKDIR) and top(op.path):
            out.append((op.path, True, op.kind == MKDIR))
        elif op.kind in (UNLINK, RMDIR) and top(op.path):
            out.append((op.path, False, False))
        elif op.kind == RENAME:
            if top(op.path):
                out.append((op.path, False, False))
            if top(op.dst):
                out.append((op.dst, True, os.path.isdir(op.dst)))
        elif op.kind == EXCHANGE:
            for a, b in ((op.path, op.dst), (op.dst, op.path)):
                if top(a):
                    out.append((a, True, os.path.isdir(a)))
        return out

    def _notice_outside(self) -> None:
        """Log the top-level changes made since the last operation by something other than the storage."""
        now = self._list_root()
        for name in sorted(set(self._names) - set(now)):
            kind = RMDIR if self._names[name] else UNLINK
            self.log.append(Op(kind, os.path.join(self.root, name), method="external", external=True))
            self._names.pop(name)
            self._outside.pop(name, None)
        for name in sorted(now):
            path = os.path.join(self.root, name)
            if name not in self._names:
                self._names[name] = now[name]
                if now[name]:
                    self.log.append(Op(MKDIR, path, method="external", external=True))
                    continue
                self.log.append(Op(CREATE, path, method="external", external=True))
                self._outside[name] = b""
            if name in self._outside:
                data = _read(path)
                if data is not None and data != self._outside[name]:
                    if self._outside[name]:
                        self.log.append(Op(CREATE, path, method="external", external=True))
                    if data:
                        self.log.append(Op(WRITE, path, data=data, method="external", external=True))
                    self._outside[name] = data

    def _run(self, method: str, call: Callable[[], Any], ops: Callable[[Any], list[Op]]) -> Any:
        """Run one storage operation under the lock and log its primitives (``ops(result)``)."""
        with self._lock:
            self._notice_outside()
            result = call()
            for op in ops(result):
                self._add(Op(op.kind, op.path, op.dst, op.offset, op.data, method))
            return result

    def _tmp_name(self, path: str) -> str:
        return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{next(self._tmp_names):032x}.tmp")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _tree_removal(path: str) -> list[Op]:
    """The ``unlink``/``rmdir`` primitives that remove the tree at ``path``, children first."""
    if not os.path.lexists(path):
        return []
    if not os.path.isdir(path) or os.path.islink(path):
        return [Op(UNLINK, path)]
    out: list[Op] = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        out += _tree_removal(entry.path)
    return out + [Op(RMDIR, path)]


class RecordingStorage:
    """``inner`` with every mutating operation logged by ``recorder`` (reads and names pass through)."""

    def __init__(self, inner: Storage, recorder: Recorder):
        self.inner = inner
        self.recorder = recorder
        self.strategy = inner.strategy
        self.local = inner.local

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _abs(self, path: str) -> str:
        return self.inner.abspath(path)

    def makedirs(self, path: str) -> None:
        path = self._abs(path)
        missing = []
        p = path
        while not os.path.lexists(p) and os.path.dirname(p) != p:
            missing.insert(0, p)
            p = os.path.dirname(p)
        self.recorder._run("makedirs", lambda: self.inner.makedirs(path),
                           lambda _: [Op(MKDIR, p) for p in missing])

    def open_write(self, path: str) -> "RecordingFile":
        path = self._abs(path)
        f = self.recorder._run("open_write", lambda: self.inner.open_write(path), lambda _: [Op(CREATE, path)])
        return RecordingFile(f, path, self.recorder)

    def write_durable(self, path: str, data: bytes, fsync: bool = True) -> None:
        path = self._abs(path)
        data = bytes(data)
        ops = [Op(CREATE, path), Op(WRITE, path, data=data)] + ([Op(FSYNC, path)] if fsync else [])
        self.recorder._run("write_durable", lambda: self.inner.write_durable(path, data, fsync), lambda _: ops)

    def replace_atomic(self, path: str, data: bytes | Callable[[BinaryIO], None], fsync: bool = True) -> None:
        path = self._abs(path)
        if callable(data):
            buf = io.BytesIO()
            data(buf)
            data = buf.getvalue()
        data = bytes(data)

        def ops(_):
            tmp = self.recorder._tmp_name(path)
            return ([Op(CREATE, tmp), Op(WRITE, tmp, data=data)] + ([Op(FSYNC, tmp)] if fsync else [])
                    + [Op(RENAME, tmp, path)] + ([Op(FSYNC_DIR, os.path.dirname(path))] if fsync else []))

        self.recorder._run("replace_atomic", lambda: self.inner.replace_atomic(path, data, fsync), ops)

    def fsync_dir(self, path: str) -> None:
        path = self._abs(path)
        self.recorder._run("fsync_dir", lambda: self.inner.fsync_dir(path), lambda _: [Op(FSYNC_DIR, path)])

    def rename(self, src: str, dst: str) -> None:
        src, dst = self._abs(src), self._abs(dst)
        self.recorder._run("rename", lambda: self.inner.rename(src, dst), lambda _: [Op(RENAME, src, dst)])

    def exchange(self, a: str, b: str) -> bool:
        a, b = self._abs(a), self._abs(b)
        return self.recorder._run("exchange", lambda: self.inner.exchange(a, b),
                                  lambda done: [Op(EXCHANGE, a, b)] if done else [])

    def remove_file(self, path: str) -> None:
        path = self._abs(path)
        with self.recorder._lock:
            there = os.path.lexists(path)
            self.recorder._run("remove_file", lambda: self.inner.remove_file(path),
                               lambda _: [Op(UNLINK, path)] if there else [])

    def remove_tree(self, path: str) -> None:
        path = self._abs(path)
        with self.recorder._lock:
            ops = _tree_removal(path)
            self.recorder._run("remove_tree", lambda: self.inner.remove_tree(path), lambda _: ops)


class RecordingFile:
    """A file being written through a :class:`RecordingStorage`: its writes (with offsets) and syncs are logged."""

    def __init__(self, inner: Any, path: str, recorder: Recorder):
        self.inner = inner
        self.path = path
        self.recorder = recorder
        self._pos = 0

    def write(self, data: memoryview) -> None:
        chunk = bytes(memoryview(data).cast("B"))
        offset = self._pos
        self._pos += len(chunk)
        self.recorder._run("write", lambda: self.inner.write(data), lambda _: [Op(WRITE, self.path, offset=offset,
                                                                                  data=chunk)])

    def writeback(self, offset: int, nbytes: int) -> None:
        self.inner.writeback(offset, nbytes)

    def sync(self) -> None:
        self.recorder._run("sync", self.inner.sync, lambda _: [Op(FSYNC, self.path)])

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()
