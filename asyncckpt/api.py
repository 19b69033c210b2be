"""The functional pair: ``asyncckpt.save(state, save_dir, tag)`` and ``asyncckpt.load(save_dir, tag)``."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping

from .config import Config
from .engine import SaveEngine
from .future import SaveFuture
from .loader import load  # noqa: F401  (re-exported)
from .state import flatten

_engines: dict[Config, SaveEngine] = {}
_lock = threading.Lock()


def _engine(config: Config) -> SaveEngine:
    with _lock:
        engine = _engines.get(config)
        if engine is None or engine._closed:
            engine = _engines[config] = SaveEngine(config)
        return engine


def save(state: Any, save_dir: str | os.PathLike, tag: str, *, save_latest: bool = True,
         config: Config | Mapping | str | os.PathLike | None = None) -> SaveFuture:
    """Save any nested state (dicts, lists, tuples, tensors, numbers, strings) asynchronously.

    Returns once the tensors are copied into host buffers; the returned future resolves when the checkpoint
    is published. Host buffers are kept and reused by the next ``save`` with the same config. ``save_dir`` is
    resolved against the current directory now. A save still in flight when the interpreter exits is
    finished first (at most ``commit_timeout_s``)."""
    t0 = time.perf_counter()
    cfg = Config.coerce(config)
    save_dir = os.fspath(save_dir)  # the engine resolves it now: local paths against the current directory
    return _engine(cfg).save(lambda: flatten(state, allow_pickle=cfg.allow_pickle), save_dir, tag,
                             save_latest=save_latest, t0=t0)


def wait_all(timeout: float | None = None) -> None:
    """Block until every functional save is published (raises the first unobserved failure)."""
    for engine in list(_engines.values()):
        engine.wait(timeout)
