"""Functions run on every rank by tests/test_replicated_buffers.py (importable by spawned processes)."""
from __future__ import annotations

import os

import torch

import asyncckpt

CFG = {"commit_timeout_s": 20, "writer": {"threads_per_node": 1, "fsync": False}, "codec": {"chunk_mib": 0.25}}


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2),
                               torch.nn.BatchNorm1d(2))


def save_then_load(rank: int, world: int, save_dir: str, per_node: int = 0) -> dict:
    """Every rank's forward pass sees its own data, so the running statistics differ per rank (as with DDP);
    save them as replicated state, then load into a fresh model. Returns the buffers before and after."""
    if per_node:
        os.environ.update({"GROUP_RANK": str(rank // per_node), "LOCAL_RANK": str(rank % per_node),
                           "LOCAL_WORLD_SIZE": str(per_node)})
    model = bn_model()
    torch.manual_seed(100 + rank)
    model(torch.randn(16, 4) * (rank + 1))
    saved = {k: v.clone() for k, v in model.named_buffers()}
    cfg = dict(CFG, use_node_local_storage=bool(per_node))
    with asyncckpt.AsyncCheckpointer(model, replicated=True, config=cfg) as saver:
        saver.save_checkpoint(save_dir if not per_node else os.path.join(save_dir, f"node{rank // per_node}"),
                              tag="t").result(60)
    fresh = bn_model()
    with asyncckpt.AsyncCheckpointer(fresh, replicated=True, config=cfg) as loader:
        loader.load_checkpoint(save_dir if not per_node else os.path.join(save_dir, f"node{rank // per_node}"))
    return {"saved": saved, "loaded": {k: v.clone() for k, v in fresh.named_buffers()}}
