"""Run a function on N gloo ranks in spawned processes on 127.0.0.1, with a hard deadline.

Each rank's return value (or its exception text) comes back through a file; a rank that dies is reported
with its exit code rather than taking the others down (unlike torch.multiprocessing.spawn's join)."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    with open(out, "wb") as f:
        pickle.dump(payload, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


def run_ranks(fn: Callable, world: int, out_dir: str, *args, timeout: float = 90.0, env: dict | None = None,
              pg_timeout: float = 60.0) -> list[RankResult]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args, env or {}, pg_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
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
