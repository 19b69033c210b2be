"""The future a save returns: ``result(timeout)``, ``done()``, ``exception()``, ``await fut``."""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Iterable

from .io_types import SaveResult


class SaveFuture:
    """Resolves to a :class:`SaveResult` once the checkpoint is published (or was skipped), or raises the
    :class:`~asyncckpt.errors.CheckpointError` that stopped it. A failure nobody looked at (through
    ``result``, ``exception`` or ``await``) is raised by the saver's next ``save_checkpoint``/``wait``/``close``."""

    def __init__(self, inner: concurrent.futures.Future, tag: str):
        self._inner = inner
        self.tag = tag
        self.observed = False

    @classmethod
    def completed(cls, result: SaveResult) -> "SaveFuture":
        f: concurrent.futures.Future = concurrent.futures.Future()
        f.set_result(result)
        return cls(f, result.tag)

    def done(self) -> bool:
        return self._inner.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        try:
            return self._inner.result(timeout)
        finally:
            if self._inner.done():
                self.observed = True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._inner.exception(timeout)
        self.observed = True
        return exc

    @property
    def skipped(self) -> bool:
        return self.done() and self._inner.exception() is None and self._inner.result().skipped

    def add_done_callback(self, fn: Callable[["SaveFuture"], None]) -> None:
        self._inner.add_done_callback(lambda _: fn(self))

    def __await__(self):
        self.observed = True
        return asyncio.wrap_future(self._inner).__await__()

    def unobserved_error(self) -> BaseException | None:
        if self.observed or not self._inner.done() or self._inner.cancelled():
            return None
        return self._inner.exception()

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._inner.exception() else "done")
        return f"<SaveFuture tag={self.tag!r} {state}>"


def raise_first_unobserved(futures: Iterable[SaveFuture]) -> None:
    """Raise the failure of the first of ``futures`` that failed with nobody looking (marking it observed, so
    it is raised once)."""
    for f in futures:
        exc = f.unobserved_error()
        if exc is not None:
            f.observed = True
            raise exc
