"""Threads a saver starts when it is built: thread pools whose threads all exist from the start, and the
event loop thread that runs a saver's pipeline (:class:`EventLoopThread`).

Python 3.12 refuses to start a thread once interpreter shutdown has begun ("can't create new thread at
interpreter shutdown"), and ``ThreadPoolExecutor`` starts its threads lazily, one per submission that finds
none idle. The exit drain (saves accepted before the interpreter exits are finished, see ``engine``) runs at
shutdown, so every pool a save may use is started whole when its saver is built."""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # noqa: F401  (registers its exit hook first, so those of at_shutdown run before it)
import ctypes
import threading
from typing import Callable, Coroutine

_START_TIMEOUT_S = 60.0


_PR_SET_NAME = 15
_OS_NAME_BYTES = 15  # the kernel's limit, without the terminating NUL
_SHORT = (("asyncckpt-service-", "acs-"), ("asyncckpt-", "ac-"))
_libc = None


def os_thread_name(name: str) -> str:
    """What :func:`name_os_thread` calls a thread named ``name`` in the OS: ``asyncckpt-service-encode_0`` is
    ``acs-encode_0``, ``asyncckpt-file_1`` ``ac-file_1`` (at most 15 bytes, the kernel's limit)."""
    for long, short in _SHORT:
        if name.startswith(long):
            name = short + name[len(long):]
            break
    return name.encode()[:_OS_NAME_BYTES].decode(errors="ignore")


def name_os_thread() -> None:
    """Give the calling thread its Python name in the OS too (``top -H``, ``/proc/<pid>/task/<tid>/comm``), so
    that the writer's threads, and their CPU time, can be told apart from training's. Best effort (Linux)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(os_thread_name(threading.current_thread().name).encode()), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl (not Linux): the OS name stays the process's
        pass


def _named(initializer: Callable[[], None] | None) -> Callable[[], None]:
    def init() -> None:
        name_os_thread()
        if initializer is not None:
            initializer()

    return init


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread named ``name``, in the OS too (:func:`name_os_thread`)."""
    def run() -> None:
        name_os_thread()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def started_pool(workers: int, name: str, initializer: Callable[[], None] | None = None
                 ) -> concurrent.futures.ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` of ``workers`` threads, all of them running when this returns, each named in the
    OS (:func:`name_os_thread`)."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, name, initializer=_named(initializer))
    barrier = threading.Barrier(workers + 1)  # each task holds its thread until every thread has one
    for _ in range(workers):
        pool.submit(barrier.wait, _START_TIMEOUT_S)
    barrier.wait(_START_TIMEOUT_S)
    return pool


def at_shutdown(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the main thread finishes, while thread pools still take work: threading's exit hooks run
    in reverse order of registration, before concurrent.futures' own (registered when it was imported, above)
    refuses new work; ``atexit`` hooks would run too late for the pools a drain needs."""
    try:
        threading._register_atexit(fn)
    except AttributeError:  # pragma: no cover - Python without threading._register_atexit
        atexit.register(fn)


class EventLoopThread:
    """An asyncio event loop running in a daemon thread of its own, with a started pool of ``helpers`` threads
    as its default executor (for blocking waits of the coroutines it runs). The engine runs every save's
    pipeline on one, the writer service one per group; what runs on it hands encoding and file I/O to the
    writer's pools."""

    def __init__(self, name: str, helpers: int = 2, initializer: Callable[[], None] | None = None):
        self._helpers = started_pool(helpers, f"{name}-wait", initializer=initializer)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._helpers)
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_os_thread()
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run a coroutine on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Stop the loop (what still runs on it is abandoned: close after the work drained) and its helpers."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
        self._helpers.shutdown(wait=True, cancel_futures=True)
