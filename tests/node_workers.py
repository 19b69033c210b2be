"""Functions run on every rank by tests/test_many_nodes.py (importable by spawned processes): agreement and
identity across simulated nodes. A rank's node is set as torchrun sets it (GROUP_RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE) before the saver is created; ``dirs`` maps a rank to its own save directory (a node-local
directory of that node, or a replacement node's empty one)."""
from __future__ import annotations

import os

import torch

import asyncckpt
from storage_faults import injected
from trainer import mlp, train

CFG = {"commit_timeout_s": 20, "writer": {"threads_per_node": 1, "fsync": False}, "codec": {"chunk_mib": 0.25}}
WIDTHS = (8, 16, 4)


def as_nodes(rank: int, per_node: int) -> None:
    """Make this rank the ``rank % per_node``-th local rank of node ``rank // per_node``."""
    os.environ.update({"GROUP_RANK": str(rank // per_node), "LOCAL_RANK": str(rank % per_node),
                       "LOCAL_WORLD_SIZE": str(per_node)})


def _saver(rank: int, cfg: dict, steps: int = 1):
    model = mlp(0, WIDTHS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, steps, seed=0)
    return model, opt, asyncckpt.AsyncCheckpointer(model, opt, config=cfg)


def save_tags(rank: int, world: int, dirs: list, tags: list, per_node: int = 0, overwrite: bool = False,
              save_latest: bool = True) -> list:
    """Save ``tags`` in turn into this rank's directory (node-local storage when ``per_node``)."""
    if per_node:
        as_nodes(rank, per_node)
    cfg = dict(CFG, use_node_local_storage=bool(per_node), overwrite=overwrite)
    _, _, saver = _saver(rank, cfg)
    with saver:
        return [saver.save_checkpoint(dirs[rank], tag=t, client_state={"rank": rank, "tag": t},
                                      save_latest=save_latest).result(60).path
                for t in tags]


def load(rank: int, world: int, dirs: list, tag=None, per_node: int = 0, load_rng_states: bool = True) -> dict:
    """Load from this rank's directory; the result or the error, never raised (the test compares ranks)."""
    if per_node:
        as_nodes(rank, per_node)
    cfg = dict(CFG, use_node_local_storage=bool(per_node))
    _, _, saver = _saver(rank, cfg, steps=0)
    with saver:
        try:
            path, client = saver.load_checkpoint(dirs[rank], tag=tag, load_rng_states=load_rng_states)
        except asyncckpt.CheckpointError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        # the saver's group still works after a load: the next save is not paired with the load
        saver.save_checkpoint(os.path.join(os.path.dirname(dirs[rank]), f"after{rank // max(per_node, 1) if per_node else ''}"),
                              tag="after").result(60)
        return {"path": path and os.path.basename(path), "client": client}


def save_differently(rank: int, world: int, dirs: list, over: list, save_latest: list) -> list:
    """Save "s" with per-rank config overrides ``over[rank]`` and ``save_latest[rank]``, then "next" into
    ``dirs[0]``; each save's error text (None: published)."""
    _, _, saver = _saver(rank, dict(CFG, **over[rank]))
    with saver:
        first = saver.save_checkpoint(dirs[rank], tag="s", save_latest=save_latest[rank]).exception(60)
        assert isinstance(first, asyncckpt.CommitError), repr(first)
        second = saver.save_checkpoint(dirs[0], tag="next").exception(60)  # the ranks are still paired
        return [str(first), second and str(second)]


def skipped_save(rank: int, world: int, save_dir: str) -> list:
    """Rank 1 never calls the save rank 0 makes after step 1 (``if rank == 0: save``), with tag_validation
    ignore: no save may pair rank 0's step-1 state with rank 1's step-2 state."""
    cfg = dict(CFG, tag_validation="ignore", commit_timeout_s=4)
    model, opt, saver = _saver(rank, cfg)
    out = []
    try:
        if rank == 0:
            out.append(saver.save_checkpoint(save_dir, tag="a").exception(60))
        train(model, opt, 1, seed=1)
        out.append(saver.save_checkpoint(save_dir, tag="b").exception(60))
    finally:
        try:
            saver.close()
        except asyncckpt.CheckpointError:
            pass
    return [f"{type(e).__name__}: {e}" if e else None for e in out]


def replay(rank: int, world: int, save_dir: str, tag: str, run: int) -> str:
    """Save ``tag`` (client_state names the run); the path's tag, or the error raised or reported."""
    _, _, saver = _saver(rank, CFG)
    with saver:
        try:
            res = saver.save_checkpoint(save_dir, tag=tag, client_state={"run": run}).result(60)
        except asyncckpt.CheckpointError as exc:
            return type(exc).__name__
        return os.path.basename(res.path)


def publish_fails_on_one_node(rank: int, world: int, dirs: list) -> str:
    """Node-local storage, one rank per node: t1 is published, then node 1's rename of t2 fails."""
    as_nodes(rank, 1)
    _, _, saver = _saver(rank, dict(CFG, use_node_local_storage=True))
    with saver:
        saver.save_checkpoint(dirs[rank], tag="t1").result(60)
        with injected() as faults:
            if rank == 1:  # the rename that publishes .t2.partial as t2
                faults.fail("rename", os.sep + ".t2.partial", OSError(5, "Input/output error (injected)"))
            err = saver.save_checkpoint(dirs[rank], tag="t2").exception(60)
        # the rank at fault raises its own error, the other a CommitError naming it (README, "Errors")
        assert isinstance(err, asyncckpt.WriteError if rank == 1 else asyncckpt.CommitError), repr(err)
        return str(err)


def peer_dies_after_publication(rank: int, world: int, save_dir: str) -> str:
    """Shared storage: rank 1 dies while rank 0 publishes t2; rank 0's error says that it published."""
    _, _, saver = _saver(rank, dict(CFG, commit_timeout_s=10))
    saver.save_checkpoint(save_dir, tag="t1").result(60)
    if rank == 1:
        comm = saver.engine.ctx.comm
        real = comm.gather

        def gather(obj):
            out = real(obj)
            if isinstance(obj, tuple) and isinstance(obj[0], asyncckpt.io_types.RankOutcome):
                os._exit(17)  # its outcome is sent: rank 0 publishes, then finds rank 1 gone
            return out

        comm.gather = gather
    err = saver.save_checkpoint(save_dir, tag="t2").exception(60)
    assert isinstance(err, asyncckpt.CommitError), repr(err)
    try:
        saver.close()
    except asyncckpt.CheckpointError:
        pass
    return str(err)


def node_local_dir(rank: int, world: int, dirs: list, per_node: int) -> str:
    """One save "n" with node-local storage; the error text, or "" when published."""
    as_nodes(rank, per_node)
    _, _, saver = _saver(rank, dict(CFG, use_node_local_storage=True))
    with saver:
        err = saver.save_checkpoint(dirs[rank], tag="n").exception(60)
        ctx = saver.engine.ctx
        return {"error": str(err) if err else "", "node": ctx.node, "local": (ctx.local_rank, ctx.local_world_size)}


def inconsistent_nodes(rank: int, world: int) -> str:
    os.environ.update({"GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})  # both claim local rank 0
    try:
        asyncckpt.AsyncCheckpointer(mlp(0, WIDTHS), None, config=CFG).close()
    except asyncckpt.ConfigError as exc:
        return str(exc)
    return ""
