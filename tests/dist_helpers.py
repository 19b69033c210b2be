"""The one launcher of the tests' child processes: N gloo ranks on 127.0.0.1 with a hard deadline
(:func:`run_ranks`), from freshly spawned interpreters or from a preloaded forkserver
(:func:`forkserver_context`, a few milliseconds per child instead of seconds).

Each rank's return value (or its exception text) comes back through a file; a rank that dies is reported
with its exit code rather than taking the others down (unlike torch.multiprocessing.spawn's join)."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

# What the forkserver imports once, before it forks any child: torch, asyncckpt and the children's modules.
FORKSERVER_PRELOAD = ["torch", "asyncckpt", "trainer", "crash_child"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Variables a test may set for one job (monkeypatch): the forkserver keeps the environment it started with, so
# it starts with these as they were when the session began, never with one test's job id or runtime directory.
JOB_VARIABLES = ("ASYNCCKPT_SERVICE_ID", "ASYNCCKPT_RUNTIME_DIR", "TORCHELASTIC_RUN_ID")
_SESSION_ENV = {k: os.environ.get(k) for k in JOB_VARIABLES}


def forkserver_context() -> mp.context.BaseContext:
    """A forkserver with :data:`FORKSERVER_PRELOAD` imported: a child starts in milliseconds, not seconds.
    Python 3.11's forkserver ignores the parent's sys.path (fixed in 3.12), so this directory goes on its
    PYTHONPATH while it starts; an import that fails there would be silently redone in every child. It starts
    with :data:`JOB_VARIABLES` as the session began (a child of it inherits no test's job settings)."""
    import multiprocessing.forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    here = os.path.dirname(os.path.abspath(__file__))
    old = os.environ.get("PYTHONPATH")
    changed = {"PYTHONPATH": here + (os.pathsep + old if old else ""), **_SESSION_ENV}
    saved = {k: os.environ.get(k) for k in changed}
    _set_env(changed)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        _set_env(saved)
    return ctx


def _set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass
class RankResult:
    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _entry(fn: Callable, rank: int, world: int, port: int, out_dir: str, args: tuple, env: dict, pg_timeout: float) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    os.environ.update({k: v.format(rank=rank) for k, v in env.items()})  # "{rank}" is this rank's number
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        value = fn(rank, world, *args)
        payload = {"value": value}
    except BaseException:  # noqa: BLE001 - reported to the parent
        payload = {"error": traceback.format_exc()}
    with open(out + ".tmp", "wb") as f:  # whole or absent: a rank SIGKILLed while writing leaves no torn file
        pickle.dump(payload, f)
    os.replace(out + ".tmp", out)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


def run_ranks(fn: Callable, world: int, out_dir: str, *args, timeout: float = 90.0, env: dict | None = None,
              pg_timeout: float = 60.0, ctx: mp.context.BaseContext | None = None,
              hung: int | None = None) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks started from ``ctx`` (default: spawn). Rank ``hung``
    may stop forever: it is SIGKILLed once the others are done."""
    ctx = ctx or mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args, env or {}, pg_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for r, p in enumerate(procs):
        if r != hung:
            p.join(max(0.1, deadline - time.monotonic()))
    if hung is not None and procs[hung].is_alive():
        os.kill(procs[hung].pid, signal.SIGKILL)
    results = []
    for r, p in enumerate(procs):
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
            results.append(RankResult(r, None, error=f"rank {r} still running after {timeout}s (killed)"))
            continue
        path = os.path.join(out_dir, f"rank{r}.pkl")
        payload: dict = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                payload = pickle.load(f)
        results.append(RankResult(r, p.exitcode, payload.get("value"), payload.get("error")))
    return results


def assert_all_ok(results: list[RankResult]) -> list[Any]:
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"rank {r.rank} exit={r.exitcode}:\n{r.error}" for r in bad)
    return [r.value for r in results]
