"""Storage wrappers that see every operation: the seam through which tests inject faults (a full disk, a
denied permission, a stalled or slow disk) and through which a recorder logs what a save does. Installed with
:func:`asyncckpt.storage.wrapping`::

    faults = Faults()
    faults.fail("write_durable", "rank00000.json", OSError(errno.ENOSPC, "No space left on device"))
    with storage.wrapping(faults.wrap):
        ...  # every save started here writes through the wrapper

Operation names: the storage's methods (``open_write``, ``write_durable``, ``replace_atomic``, ``fsync_dir``,
``makedirs``, ``rename``, ``exchange``, ``remove_file``, ``remove_tree``, ``read_bytes``, ``read_ranges``)
and, on a file ``open_write`` returned, ``write``, ``writeback``, ``sync``, ``close``, ``abort``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from .base import Storage

Hook = Callable[[str, str], None]  # (operation, path): may raise (a fault) or block (a stall)

_OPS = ("makedirs", "open_write", "write_durable", "replace_atomic", "fsync_dir", "rename", "exchange",
        "remove_file", "remove_tree", "read_bytes", "read_ranges")
FILE_OPS = ("write", "writeback", "sync", "close", "abort")


class HookedStorage:
    """``inner`` with ``hook(op, path)`` called before every operation (first path argument)."""

    def __init__(self, inner: Storage, hook: Hook):
        self.inner = inner
        self.hook = hook
        self.strategy = inner.strategy
        self.local = inner.local

    def __getattr__(self, name: str) -> Any:  # names, listings, exists: passed through
        return getattr(self.inner, name)

    def _call(self, op: str, path: str, *args, **kwargs):
        try:
            self.hook(op, path)
        except Answer as answer:  # the operation is not performed: it returns this
            return answer.value
        return getattr(self.inner, op)(path, *args, **kwargs)

    def open_write(self, path: str):
        return HookedFile(self._call("open_write", path), self.hook)


def _forward(op: str):
    def method(self, path, *args, **kwargs):
        return self._call(op, path, *args, **kwargs)

    method.__name__ = op
    return method


for _op in _OPS:
    if _op != "open_write":
        setattr(HookedStorage, _op, _forward(_op))


class HookedFile:
    def __init__(self, inner: Any, hook: Hook):
        self.inner = inner
        self.path = inner.path
        self.hook = hook

    def write(self, data) -> None:
        self.hook("write", self.path)
        self.inner.write(data)

    def writeback(self, offset: int, nbytes: int) -> None:
        self.hook("writeback", self.path)
        self.inner.writeback(offset, nbytes)

    def sync(self) -> None:
        self.hook("sync", self.path)
        self.inner.sync()

    def close(self) -> None:
        self.hook("close", self.path)
        self.inner.close()

    def abort(self) -> None:
        self.hook("abort", self.path)
        self.inner.abort()


class Answer(Exception):
    """Raised by a hook: skip the operation, return ``value`` (e.g. ``exchange`` → False: no RENAME_EXCHANGE)."""

    def __init__(self, value: Any):
        super().__init__(value)
        self.value = value


@dataclass
class _Rule:
    op: str
    match: str  # a substring of the path ("" = any)
    action: Callable[[str, str], None]
    after: int  # let this many matching operations through first
    times: int | None  # then act on this many (None: every one)
    seen: int = 0

    def applies(self, op: str, path: str) -> bool:
        if op != self.op or self.match not in str(path):
            return False
        self.seen += 1
        n = self.seen - self.after
        return n > 0 and (self.times is None or n <= self.times)


class Faults:
    """Rules applied to every storage it wraps (one set of counters for all of them)."""

    def __init__(self):
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # every (operation, path) seen, in order

    def wrap(self, inner: Storage) -> Storage:
        return HookedStorage(inner, self._hook)

    def _hook(self, op: str, path: str) -> None:
        with self._lock:
            self.log.append((op, str(path)))
            actions = [r.action for r in self._rules if r.applies(op, path)]
        for action in actions:
            action(op, path)

    def on(self, op: str, action: Callable[[str, str], None], match: str = "", *, after: int = 0,
           times: int | None = None) -> "Faults":
        """Run ``action(op, path)`` before matching operations."""
        if op not in _OPS + FILE_OPS:
            raise ValueError(f"no storage operation {op!r}; one of {', '.join(_OPS + FILE_OPS)}")
        with self._lock:
            self._rules.append(_Rule(op, match, action, after, times))
        return self

    def fail(self, op: str, match: str, error: BaseException, *, after: int = 0, times: int | None = None) -> "Faults":
        """Raise ``error`` instead of matching operations."""
        def raise_it(op: str, path: str) -> None:
            raise error

        return self.on(op, raise_it, match, after=after, times=times)

    def answer(self, op: str, value: Any, match: str = "") -> "Faults":
        """Matching operations are not performed and return ``value`` (storage methods only, not file ones)."""
        def answer_it(op: str, path: str) -> None:
            raise Answer(value)

        return self.on(op, answer_it, match)

    def gate(self, op: str, match: str = "") -> "Gate":
        """Hold matching operations until the returned gate is opened."""
        gate = Gate()
        self.on(op, lambda o, p: gate.hold(), match)
        return gate


class Gate:
    """Holds operations until :meth:`open`; ``entered`` is set once one reached it."""

    def __init__(self, timeout_s: float = 120.0):
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.timeout_s = timeout_s

    def hold(self) -> None:
        self.entered.set()
        if not self.opened.wait(self.timeout_s):
            raise TimeoutError(f"storage gate held for {self.timeout_s:g}s and never opened")

    def open(self) -> None:
        self.opened.set()
