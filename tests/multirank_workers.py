"""Functions run on every rank by tests/test_multirank.py (importable by spawned processes). The model and
its training come from tests/trainer.py; file-system faults go through a storage wrapper
(tests/storage_faults.py); load_state is counted with tests/patching.patch_existing."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import asyncckpt
from patching import patch_existing
from storage_faults import injected
from trainer import mlp, train

CFG = {"commit_timeout_s": 30, "writer": {"threads_per_node": 2}, "codec": {"chunk_mib": 0.25}}
WIDTHS = (32, 64, 64, 8)  # big enough that the RNG states are a small part of a DDP checkpoint


def _flat_state(model, opt) -> dict:
    out = {f"m/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                out[f"o/{pid}/{name}"] = v.detach().clone()
    return out


def ddp_save_load(rank: int, world: int, save_dir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp(0, WIDTHS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        assert saver.replicated
        train(model, opt, 3, seed=rank)  # different data per rank; DDP keeps the replicas identical
        res = saver.save_checkpoint(save_dir, client_state={"rank": rank}).result(60)
        expected = _flat_state(model.module, opt)
        fresh = DDP(mlp(123, WIDTHS))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        with asyncckpt.AsyncCheckpointer(fresh, fresh_opt, config=CFG) as loader:
            path, client = loader.load_checkpoint(save_dir)
            assert loader.global_steps == 3
        got = _flat_state(fresh.module, fresh_opt)
        assert client == {"rank": rank}, client
        assert expected.keys() == got.keys()
        for k in expected:
            assert torch.equal(expected[k], got[k]), k
    torch.save(expected, os.path.join(save_dir, f"expected{rank}.pt")) if rank == 0 else None
    return {"bytes_written": res.bytes_written, "total": res.total_bytes_written, "raw": res.raw_bytes,
            "phases": res.phases, "tag": res.tag}


def fsdp_save(rank: int, world: int, save_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp(0, WIDTHS)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2, seed=7)
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        saver.save_checkpoint(save_dir, tag="fsdp").result(60)
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, os.path.join(save_dir, "expected_fsdp.pt"))


def _full(model, opt) -> dict:
    out = {f"m/{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                out[f"o/{pid}/{name}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def fsdp_load(rank: int, world: int, save_dir: str) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp(99, WIDTHS)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 1, seed=3)  # the optimizer has state to overwrite
    read = []
    orig = asyncckpt.CheckpointReader.load_state

    def counting(self, **kw):
        try:
            return orig(self, **kw)
        finally:
            total = sum(c.length for recs in self.records.values() for _, r in recs for c in r.chunks)
            read.append((self.bytes_read, total))

    patch_existing(None, asyncckpt.CheckpointReader, "load_state", counting)
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        # another world size: each rank keeps its own RNG streams (none in the checkpoint is its own)
        saver.load_checkpoint(save_dir, tag="fsdp", load_rng_states=False)
    (bytes_read, total), = read
    # each rank reads only the saved shards overlapping its own region (half of the data here, whether the
    # checkpoint has 4 shards per tensor and this rank needs 2, or 2 and it needs part of 1), never everything
    assert bytes_read < 0.6 * total, (bytes_read, total, world)
    expected = torch.load(os.path.join(save_dir, "expected_fsdp.pt"))
    got = _full(model, opt)
    assert expected.keys() == got.keys(), (expected.keys(), got.keys())
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    # the loaded model keeps training identically on every world size
    train(model, opt, 1, seed=5)
    return len(expected)


def write_failure(rank: int, world: int, save_dir: str) -> dict:
    model = mlp(0, WIDTHS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        train(model, opt, 1, seed=0)
        saver.save_checkpoint(save_dir, tag="good").result(60)
        with injected() as faults:
            if rank == 1:
                faults.fail("write", ".bin", OSError(28, "No space left on device (injected)"))
            err = saver.save_checkpoint(save_dir, tag="bad").exception(60)
        if rank == 1:  # the rank at fault raises its own error; the others a CommitError naming it
            assert isinstance(err, asyncckpt.WriteError) and "No space left" in str(err), repr(err)
        else:
            assert isinstance(err, asyncckpt.CommitError), repr(err)
            assert list(err.failures) == [1] and "No space left" in err.failures[1], err.failures
        latest = open(os.path.join(save_dir, "latest")).read().strip()
        assert latest == "good", latest
        assert not os.path.exists(os.path.join(save_dir, "bad"))
        return {"error": type(err).__name__, "message": str(err)}


def tag_mismatch(rank: int, world: int, save_dir: str) -> str:
    model = mlp(0, WIDTHS)
    with asyncckpt.AsyncCheckpointer(model, None, config=CFG) as saver:
        err = saver.save_checkpoint(save_dir, tag=f"tag{rank}").exception(60)
        assert isinstance(err, asyncckpt.CommitError), repr(err)
        assert "differs across ranks" in str(err)
        # the saver still works after a refused save
        saver.save_checkpoint(save_dir, tag="same").result(60)
        return str(err)


def killed_rank(rank: int, world: int, save_dir: str) -> str:
    model = mlp(0, WIDTHS)
    cfg = dict(CFG, commit_timeout_s=8)
    with asyncckpt.AsyncCheckpointer(model, None, config=cfg) as saver:
        saver.save_checkpoint(save_dir, tag="before").result(60)
        with injected() as faults:
            if rank == world - 1:
                faults.on("write", lambda op, path: os._exit(17))  # a rank killed while writing
            err = saver.save_checkpoint(save_dir, tag="after").exception(60)  # well inside the harness deadline
        assert isinstance(err, asyncckpt.CommitError), repr(err)
        assert open(os.path.join(save_dir, "latest")).read().strip() == "before"
        try:
            saver.close()
        except asyncckpt.CheckpointError:
            pass
        return type(err).__name__


def train_while_committing(rank: int, world: int, save_dir: str) -> int:
    """All-reduce on the default group in the training loop while commits run on the saver's own group."""
    model = mlp(0, WIDTHS)
    cfg = dict(CFG, max_inflight=2)
    futures = []
    total = torch.zeros(1)
    with asyncckpt.AsyncCheckpointer(model, None, config=cfg) as saver:
        for step in range(40):
            x = torch.ones(1) * (rank + 1)
            dist.all_reduce(x)  # default group
            total += x
            if step % 8 == 0:
                futures.append(saver.save_checkpoint(save_dir, tag=f"s{step}"))
        results = [f.result(60) for f in futures]
    assert all(r.path for r in results)
    assert total.item() == 40 * sum(range(1, world + 1))
    return len(results)


def node_local(rank: int, world: int, root: str) -> list:
    node = os.environ["GROUP_RANK"]  # one rank per simulated node (test_multirank sets torchrun's variables)
    save_dir = os.path.join(root, f"node{node}")
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp(0, WIDTHS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = dict(CFG, use_node_local_storage=True)
    with asyncckpt.AsyncCheckpointer(model, opt, config=cfg) as saver:
        train(model, opt, 1, seed=rank)
        saver.save_checkpoint(save_dir, tag="n").result(60)
        expected = _flat_state(model.module, opt)
        saver.load_checkpoint(save_dir)
        got = _flat_state(model.module, opt)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    return sorted(os.listdir(os.path.join(save_dir, "n")))


def one_rank_busy_or_failing(rank: int, world: int, save_dir: str) -> dict:
    """A save one rank cannot make (no free slot with on_busy=skip; an error in its own state) is skipped or
    failed on every rank, and the ranks stay in step for the next save."""
    model = mlp(0, WIDTHS)
    cfg = dict(CFG, on_busy="skip", max_inflight=1, commit_timeout_s=20)
    out = {}
    with asyncckpt.AsyncCheckpointer(model, None, config=cfg) as saver:
        held = saver.engine.pool.acquire("wait") if rank == 1 else None  # rank 1's only slot is busy
        out["busy"] = saver.save_checkpoint(save_dir, tag="b").result(60).skipped
        if held is not None:
            saver.engine.pool.release(held)
        client = {"obj": object()} if rank == 1 else {}  # not JSON: rank 1 fails at once
        try:
            fut = saver.save_checkpoint(save_dir, tag="c", client_state=client)
            err = fut.exception(60)
            out["other_rank_error"] = str(err)
        except asyncckpt.PickleNotAllowedError as exc:
            out["raised_here"] = str(exc)
        out["next"] = saver.save_checkpoint(save_dir, tag="d").result(60).path is not None
    return out
