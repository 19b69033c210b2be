"""Thread pools whose threads all exist from the start.

Python 3.12 refuses to start a thread once interpreter shutdown has begun ("can't create new thread at
interpreter shutdown"), and ``ThreadPoolExecutor`` starts its threads lazily, one per submission that finds
none idle. The exit drain (saves accepted before the interpreter exits are finished, see ``engine``) runs at
shutdown, so every pool a save may use is started whole when its saver is built."""
from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.thread  # noqa: F401  (registers its exit hook first, so those of at_shutdown run before it)
import threading
from typing import Callable

_START_TIMEOUT_S = 60.0


def started_pool(workers: int, name: str, initializer: Callable[[], None] | None = None
                 ) -> concurrent.futures.ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` of ``workers`` threads, all of them running when this returns."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, name, initializer=initializer)
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
