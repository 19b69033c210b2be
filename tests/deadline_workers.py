"""Functions run on every rank by tests/test_save_deadline.py (importable by spawned processes)."""
from __future__ import annotations

import os
import time

import torch

import asyncckpt

CFG = {"commit_timeout_s": 20, "save_deadline_s": 50, "writer": {"threads_per_node": 1, "fsync": False},
       "codec": {"chunk_mib": 0.25}}


def late_rank_then_next_save(rank: int, world: int, save_dir: str, late_rank: int) -> dict:
    """``late_rank``'s save call began 100 s ago (as if it had run eval first): with save_deadline_s=50, save
    "t1" fails on every rank and is published nowhere; then "t2" (on time) is published by the same saver."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    out: dict = {}
    with asyncckpt.AsyncCheckpointer(model, replicated=True, config=CFG) as saver:
        engine = saver.engine
        t0 = time.perf_counter() - (100.0 if rank == late_rank else 0.0)
        fut = engine.save(lambda: saver._flatten(saver.state_dict()), save_dir, "t1", t0=t0,
                          manifest_extra={"global_steps": saver.global_steps})
        err = fut.exception(60)
        out["error"] = None if err is None else (type(err).__name__, str(err), dict(err.failures))
        out["t1_exists"] = os.path.exists(os.path.join(save_dir, "t1"))
        out["t2"] = saver.save_checkpoint(save_dir, tag="t2").result(60).path
    out["latest"] = asyncckpt.loader.read_latest(save_dir)
    return out
