"""Rank functions of tests/test_integration_deepspeed.py (importable by spawned children).

Two runs of 2 gloo ranks on CPU. :func:`save_run` trains a tiny model under ZeRO stages 0-3, saves through
the asyncckpt engine and records the reference (parameters at the save, losses of the steps after it), then
starts a save whose commit is held at its marker (a storage gate, :mod:`storage_faults`) and crashes there: the
ranks SIGKILL themselves (thread mode) or the writer service dies (service mode). :func:`resume_run`, in fresh
processes, resumes every case with DeepSpeed's own ``load_checkpoint`` and reports what it found.
Results travel through files: the first run never returns."""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
import warnings

import torch

from asyncckpt.format import MANIFEST

STAGES = (0, 1, 2, 3)
SAVE_STEP = 2  # optimizer steps before the checkpoint
AFTER = 3  # steps trained after it, whose losses the resumed run must reproduce bit for bit
CRASH_STAGE = 2
CONFIG = {"writer": {"threads_per_node": 2}}
SERVICE_DIED = 4  # a crash-run rank's exit status in service mode: its save failed, the writer service died


def _deepspeed():
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory collective op (minutes of g++) unless no op is
    # compatible; gloo does the same work for two ranks.
    deepspeed.ops.__compatible_ops__ = {}
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return deepspeed


def _engine(stage: int, seed: int):
    deepspeed = _deepspeed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def _train(engine, rank: int, start: int, steps: int) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = (engine(x) ** 2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _params(engine, stage: int) -> dict[str, torch.Tensor]:
    named = list(engine.module.named_parameters())
    if stage == 3:  # partitioned: gather the full parameters (collective)
        with _deepspeed().zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: p.detach().clone() for n, p in named}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def save_run(rank: int, world: int, root: str) -> None:
    from asyncckpt.integrations import deepspeed as ds_async

    out: dict = {}
    for stage in STAGES:
        d = os.path.join(root, f"stage{stage}")
        engine = _engine(stage, seed=1)
        _train(engine, rank, 0, SAVE_STEP)
        if stage == 1:  # DeepSpeed's default engine writes a tag the asyncckpt engine must still load
            engine.save_checkpoint(d, "torch_engine", client_state={"epoch": 7})
        ckpt = ds_async.enable(engine, config=CONFIG)
        assert engine.save_checkpoint(d, "s2", client_state={"epoch": 7, "note": "async"}) is True
        ckpt.wait(timeout=120)
        case = {"params": _params(engine, stage), "files": sorted(os.listdir(os.path.join(d, "s2"))),
                "latest": _read(os.path.join(d, "latest"))}
        if stage == 0:
            case.update(_unwrapped_and_16bit(engine, ckpt, os.path.join(root, "unwrapped")))
        case["losses"] = _train(engine, rank, SAVE_STEP, AFTER)
        out[stage] = case
        ckpt.close()
        engine.destroy()
    torch.save(out, os.path.join(root, f"save_rank{rank}.pt"))
    _crash(rank, root, ds_async)  # never returns


def _unwrapped_and_16bit(engine, ckpt, d: str) -> dict:
    """DeepSpeed's unwrapped save_checkpoint writes `latest` itself right after commit: commit must have
    blocked until the tag was durable. save_16bit_model writes a plain torch.save file."""
    type(engine).save_checkpoint(engine, d, "raw", client_state={}, save_latest=True)
    durable_when_returned = ckpt.last_future.done() and ckpt.last_future.exception() is None
    engine.save_16bit_model(d, "model16.bin")
    model16 = torch.load(os.path.join(d, "model16.bin"), weights_only=True) if engine.global_rank == 0 else None
    return {"unwrapped_durable": durable_when_returned, "unwrapped_latest": _read(os.path.join(d, "latest")),
            "model16": model16}


def _crash(rank: int, root: str, ds_async) -> None:
    """Save tag A, then tag B with the commit marker's write held (both ranks' files written, nothing
    published) and record what a reader saw then; then the job crashes before the commit. In thread mode the
    ranks SIGKILL themselves (they perform the writes). In service mode a killed rank would not lose B (the
    writer service finishes a save handed over: that is its purpose), so the process that dies is the writer
    service, at the held write: each rank's future fails with a CommitError, which it records, and it exits with
    :data:`SERVICE_DIED`."""
    from asyncckpt import CommitError, Config
    from storage_faults import injected, killed

    d = os.path.join(root, "crash")
    engine = _engine(CRASH_STAGE, seed=1)
    ckpt = ds_async.enable(engine, config=CONFIG)
    service = Config.coerce(CONFIG).writer.mode == "service"
    with injected() as faults:
        _train(engine, rank, 0, SAVE_STEP)
        engine.save_checkpoint(d, "A")
        ckpt.wait(timeout=120)
        losses = _train(engine, rank, SAVE_STEP, AFTER)
        if rank == 0:  # rank 0 publishes; only files of no rank (and its own) are the concern of its rules
            gate = faults.gate("write_durable", MANIFEST)  # every rank's outcome is in: the commit begins
            killed(faults, "write_durable", MANIFEST)  # once the gate opens: service mode opens it
        engine.save_checkpoint(d, "B")
        record = {"losses": losses, "pending_after_return": not ckpt.last_future.done()}
        if rank == 0:
            assert gate.entered.wait(120), "the save never reached its commit"
        _meet(root, "held", rank)
        record.update(latest_before_kill=_read(os.path.join(d, "latest")), entries_before_kill=sorted(os.listdir(d)),
                      partial_before_kill=sorted(os.listdir(os.path.join(d, ".B.partial"))))
        _meet(root, "recorded", rank)  # both ranks returned from the save and saw it unpublished: the job dies
        if not service:  # the ranks perform the writes: they die with the marker's write held
            torch.save(record, os.path.join(root, f"crash_rank{rank}.pt"))
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            gate.open()  # the writer service performs the marker's write: it dies there
        try:
            ckpt.last_future.result(120)
        except CommitError as exc:
            record["error"] = str(exc)
    torch.save(record, os.path.join(root, f"crash_rank{rank}.pt"))
    os._exit(SERVICE_DIED)  # the job ends here, as it would after a failed save


def _meet(root: str, name: str, rank: int) -> None:
    """Both ranks reached ``name`` (files, not a collective: the process group must not be involved)."""
    with open(os.path.join(root, f"{name}_rank{rank}"), "w"):
        pass
    peer = os.path.join(root, f"{name}_rank{1 - rank}")
    deadline = time.monotonic() + 120
    while not os.path.exists(peer):
        assert time.monotonic() < deadline, f"rank {1 - rank} never reached {name!r}"
        time.sleep(0.05)


def resume_run(rank: int, world: int, root: str) -> dict:
    """Fresh processes: DeepSpeed's own load_checkpoint through the asyncckpt engine, for every case. A case
    that fails reports its traceback (every rank fails it alike), so the other cases still run."""
    out: dict = {stage: _case(_resume_stage, rank, root, stage) for stage in STAGES}
    out["crash"] = _case(_resume_crash, rank, root)
    return out


def _case(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported to the test
        return {"error": traceback.format_exc()}


def _resume_stage(rank: int, root: str, stage: int) -> dict:
    from asyncckpt.integrations import deepspeed as ds_async

    d = os.path.join(root, f"stage{stage}")
    engine = _engine(stage, seed=2)  # other initial weights: only the load can make them match
    ckpt = ds_async.enable(engine, config=CONFIG)
    case = {}
    if stage == 1:
        engine.load_checkpoint(d, tag="torch_engine")
        case["torch_engine_params"] = _params(engine, stage)
    path, client_state = engine.load_checkpoint(d)
    case.update(path=path, client_state=client_state, global_steps=engine.global_steps,
                params=_params(engine, stage), losses=_train(engine, rank, SAVE_STEP, AFTER))
    ckpt.close()
    engine.destroy()
    return case


def _resume_crash(rank: int, root: str) -> dict:
    from asyncckpt import list_tags
    from asyncckpt.integrations import deepspeed as ds_async

    d = os.path.join(root, "crash")
    case = {"latest": _read(os.path.join(d, "latest")), "tags": list_tags(d), "entries": sorted(os.listdir(d))}
    engine = _engine(CRASH_STAGE, seed=2)
    ckpt = ds_async.enable(engine, config=CONFIG)
    path, _ = engine.load_checkpoint(d)
    case.update(path=path, losses=_train(engine, rank, SAVE_STEP, AFTER))
    ckpt.close()
    engine.destroy()
    return case
