"""One adapter per checkpointing system, all with the same interface, so the measurement protocol
(:mod:`benchmarks.measure`) treats them alike.

``save(tag)`` blocks exactly as long as the system blocks the training thread (the *stall*) and returns a
:class:`Pending`; ``Pending.done_at`` is the instant the checkpoint became durable (set by a completion
callback for the asynchronous systems, so it is exact even when nobody is waiting), ``Pending.wait()`` blocks
until then. ``load(tag)`` restores the model and the optimizer in place. ``open(save_dir)`` makes a fresh
saver (its first save allocates whatever it caches); ``close()`` drops it.

What each system does to be durable is recorded in its ``notes`` and shows up in the results.
"""
from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import shutil
import socket
import threading
import time
from typing import Any, Callable, Mapping

import torch

from .spec import SYSTEM_NAMES
from .workload import Workload

log = logging.getLogger(__name__)


class Ctx:
    """Where this process sits: rank, world size, and whether torch.distributed is initialised."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank = rank
        self.world = world

    @property
    def dist(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.dist and self.world > 1:
            torch.distributed.barrier()


class Pending:
    """A save in flight: ``done_at`` (perf_counter) once durable, ``wait()`` blocks until then."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.done_at: float | None = None
        self.result: dict = {}
        self._event = threading.Event()
        self._waiter: Callable[[float | None], dict] | None = None

    @classmethod
    def completed(cls, t0: float, result: dict | None = None) -> "Pending":
        p = cls(t0)
        p.mark_done(result or {})
        return p

    def mark_done(self, result: dict | None = None) -> None:
        if self.done_at is None:
            self.done_at = time.perf_counter()
        if result:
            self.result = result
        self._event.set()

    def wait(self, timeout: float | None = None) -> dict:
        if self._waiter is not None:
            self.result = self._waiter(timeout) or self.result
            self.mark_done()
        elif not self._event.wait(timeout):
            raise TimeoutError(f"save not durable after {timeout}s")
        return self.result

    @property
    def ttd_s(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.t0


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself)."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for f in files:
                fsync_path(os.path.join(root, f))
            fsync_path(root)
    else:
        fsync_path(path)


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


class System:
    """The common interface. Subclasses set ``sync`` (the save call itself writes the data) and ``notes``."""

    name = "system"
    sync = True
    notes = ""
    requires: tuple[str, ...] = ()
    max_world = 1 << 30
    takes_asyncckpt_config = False  # True: options["config"] carries the run's ``asyncckpt:`` Config overrides

    def __init__(self, wl: Workload, ctx: Ctx, options: Mapping[str, Any] | None = None):
        self.wl = wl
        self.ctx = ctx
        self.options = dict(options or {})
        self.save_dir = ""

    @classmethod
    def unavailable(cls, world: int = 1) -> str | None:
        """Why this system cannot run here (a missing optional dependency), or None."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"optional dependency not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        if world > cls.max_world:
            return f"not measured with {world} ranks (this harness runs it at world size {cls.max_world} only)"
        return None

    def info(self) -> dict:
        return {"sync": self.sync, "notes": self.notes}

    def open(self, save_dir: str) -> dict:
        self.save_dir = save_dir
        if self.ctx.rank == 0:
            os.makedirs(save_dir, exist_ok=True)
        self.ctx.barrier()
        return {}

    def save(self, tag: str) -> Pending:
        raise NotImplementedError

    def path(self, tag: str) -> str:
        return os.path.join(self.save_dir, tag)

    def load(self, tag: str) -> None:
        raise NotImplementedError

    def delete(self, tag: str) -> None:
        if self.ctx.rank == 0:
            remove(self.path(tag))

    def staging_bytes(self) -> int | None:
        return None

    def allocations(self) -> int | None:
        return None

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ torch.save
class TorchSave(System):
    name = "torch_save"
    sync = True
    notes = ("torch.save of {module, optimizer} state dicts to one file, then fsync of the file and its "
             "directory, on the training thread; with several ranks rank 0 saves (the usual DDP practice)")

    def state(self) -> dict:
        return {"module": self.wl.module.state_dict(), "optimizer": self.wl.optimizer.state_dict()}

    def path(self, tag: str) -> str:
        return os.path.join(self.save_dir, f"{tag}.pt")

    def save(self, tag: str) -> Pending:
        t0 = time.perf_counter()
        if self.ctx.rank == 0:
            with open(self.path(tag), "wb") as f:
                torch.save(self.state(), f)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(self.save_dir)
        return Pending.completed(t0)

    def load(self, tag: str) -> None:
        state = torch.load(self.path(tag), map_location="cpu", weights_only=True)
        self.wl.module.load_state_dict(state["module"])
        self.wl.optimizer.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------------------- DeepSpeed
def _init_single_process_group() -> None:
    """DeepSpeed needs torch.distributed: a one-process gloo group on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is also torch

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (about a minute on a fresh
    # machine); checkpointing never uses it, so it is not built.
    ds_comm_torch.build_shm_op = lambda: None
    return deepspeed


class DeepSpeed(System):
    name = "deepspeed"
    sync = True
    requires = ("deepspeed",)
    max_world = 1
    notes = ("engine.save_checkpoint (ZeRO stage 0, the torch AdamW as client optimizer, CPU accelerator, "
             "gloo) on the training thread: torch.save of model+optimizer states, plus the 'latest' file. "
             "DeepSpeed does not fsync: stall = the save_checkpoint call, time to durable adds an fsync of "
             "the files it wrote and their directories")

    def __init__(self, wl, ctx, options=None):
        super().__init__(wl, ctx, options)
        deepspeed = _import_deepspeed()
        _init_single_process_group()
        config = {"train_batch_size": wl.spec.batch, "train_micro_batch_size_per_gpu": wl.spec.batch,
                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
                  "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
        config.update(self.options.get("deepspeed_config", {}))
        t0 = time.perf_counter()
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=wl.module, optimizer=wl.optimizer, config=config, dist_init_required=False)
        self.init_s = time.perf_counter() - t0
        self.version = deepspeed.__version__

    def info(self) -> dict:
        return {**super().info(), "init_s": self.init_s, "version": self.version,
                "optimizer_type": type(self.ds_optimizer).__name__}

    def save(self, tag: str) -> Pending:
        t0 = time.perf_counter()
        self.engine.save_checkpoint(self.save_dir, tag=tag)
        p = Pending(t0)

        def durable(timeout):
            fsync_tree(self.path(tag))
            latest = os.path.join(self.save_dir, "latest")
            if os.path.exists(latest):
                fsync_path(latest)
            fsync_path(self.save_dir)
            return {}

        p._waiter = durable
        return p

    def load(self, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(self.save_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {self.save_dir}")


class DeepSpeedAsyncCkpt(DeepSpeed):
    name = "deepspeed_asyncckpt"
    sync = False
    requires = ("deepspeed", "asyncckpt")
    takes_asyncckpt_config = True
    notes = ("the same DeepSpeed engine (ZeRO stage 0, one process) after "
             "asyncckpt.integrations.deepspeed.enable(engine, config) (a fresh asyncckpt engine per repetition): "
             "stall = the engine.save_checkpoint call; time to durable = until enable()'s last_future resolves "
             "(tag published, DeepSpeed's stub files and 'latest' fsynced)")

    def open(self, save_dir: str) -> dict:
        from asyncckpt import Config
        from asyncckpt.integrations.deepspeed import enable

        out = super().open(save_dir)
        t0 = time.perf_counter()
        self.ckpt = enable(self.engine, Config.from_dict(dict(self.options.get("config", {}))))
        out["construct_s"] = time.perf_counter() - t0
        return out

    def save(self, tag: str) -> Pending:
        t0 = time.perf_counter()
        self.engine.save_checkpoint(self.save_dir, tag=tag)
        fut = self.ckpt.last_future
        p = Pending(t0)
        fut.add_done_callback(lambda f: p.mark_done())

        def waiter(timeout):
            return _result_dict(fut.result(timeout))

        p._waiter = waiter
        return p

    def staging_bytes(self) -> int | None:
        return int(self.ckpt.saver.pool.staging_bytes)

    def allocations(self) -> int | None:
        return int(self.ckpt.saver.pool.allocations)

    def close(self) -> None:
        ckpt = getattr(self, "ckpt", None)
        if ckpt is not None:
            ckpt.close()
            self.ckpt = None


# ------------------------------------------------------------------------------ torch.distributed.checkpoint
class _Dcp(System):
    requires = ("torch.distributed.checkpoint",)

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.wl.model, self.wl.optimizer)
        return {"model": msd, "optim": osd}

    def kwargs(self, tag: str) -> dict:
        kw: dict[str, Any] = {"checkpoint_id": self.path(tag)}
        if not self.ctx.dist:
            kw["no_dist"] = True
        return kw

    def load(self, tag: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state()
        dcp.load(state, **self.kwargs(tag))
        set_state_dict(self.wl.model, self.wl.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class DcpSave(_Dcp):
    name = "dcp_save"
    sync = True
    notes = ("torch.distributed.checkpoint.save of get_state_dict(model, optimizer) with the default "
             "FileSystemWriter (sync_files=True: data files and .metadata fsynced, directory not), on the "
             "training thread; replicated tensors are written once (DCP's dedup planner)")

    def save(self, tag: str) -> Pending:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        dcp.save(self.state(), **self.kwargs(tag))
        return Pending.completed(t0)


class DcpAsync(_Dcp):
    name = "dcp_async"
    sync = False
    notes = ("torch.distributed.checkpoint.async_save with a DefaultStager kept across saves (synchronous "
             "staging into cached CPU storages, reused by warm saves; CPU-only: no pinned memory) and the "
             "default FileSystemWriter in a background thread (sync_files=True: data files and .metadata "
             "fsynced, directory not); time to durable = until its future completes")
    reuse_stager = True

    def open(self, save_dir: str) -> dict:
        out = super().open(save_dir)
        self.stager = None
        if self.reuse_stager:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                       use_shared_memory=False, use_async_staging=False,
                                                       use_non_blocking_copy=False))
        return out

    def save(self, tag: str) -> Pending:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        kw = self.kwargs(tag)
        if self.stager is not None:
            kw["async_stager"] = self.stager
        fut = dcp.async_save(self.state(), **kw)
        upload = getattr(fut, "upload_completion", fut)  # an AsyncSaveResponse with async staging
        p = Pending(t0)
        upload.add_done_callback(lambda f: p.mark_done())

        def waiter(timeout):
            upload.result(timeout)
            return {}

        p._waiter = waiter
        return p

    def staging_bytes(self) -> int | None:
        try:
            cache = self.stager._state_dict_stager._cached_storage_mapping  # private: best effort
            return int(sum(s.nbytes() for s in cache.values()))
        except AttributeError:
            return None

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None


class DcpAsyncDefault(DcpAsync):
    name = "dcp_async_default"
    notes = ("torch.distributed.checkpoint.async_save called with its defaults (no stager passed: every "
             "call stages into freshly allocated CPU memory, so warm saves allocate too); writer and "
             "durability as dcp_async")
    reuse_stager = False

    def staging_bytes(self) -> int | None:
        return None


# -------------------------------------------------------------------------------------------- asyncckpt
def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


class AsyncCkpt(System):
    name = "asyncckpt"
    sync = False
    compression: bool | str = "auto"
    prepare = False
    writer_mode: str | None = None  # None: the config's (or the library's default)
    requires = ("asyncckpt",)
    takes_asyncckpt_config = True

    @property
    def notes(self) -> str:  # type: ignore[override]
        mode = {True: "on", False: "off"}.get(self.compression, self.compression)
        return (f"AsyncCheckpointer.save_checkpoint, compression {mode}"
                f"{', prepare() before the first save' if self.prepare else ''}; files, directory and "
                "'latest' fsynced; time to durable = until the future resolves (published)")

    def config(self):
        from asyncckpt import Config

        overrides = _merge(dict(self.options.get("config", {})), {"codec": {"compression": self.compression}})
        if self.writer_mode is not None:
            overrides = _merge(overrides, {"writer": {"mode": self.writer_mode}})
        return Config.from_dict(overrides)

    def info(self) -> dict:
        return {**super().info(), "config": self.config().to_dict()}

    def open(self, save_dir: str) -> dict:
        from asyncckpt import AsyncCheckpointer

        out = super().open(save_dir)
        t0 = time.perf_counter()
        self.saver = AsyncCheckpointer(self.wl.model, self.wl.optimizer, config=self.config())
        out["construct_s"] = time.perf_counter() - t0
        if self.prepare:
            t0 = time.perf_counter()
            self.saver.prepare()
            out["prepare_s"] = time.perf_counter() - t0
        return out

    def save(self, tag: str) -> Pending:
        t0 = time.perf_counter()
        fut = self.saver.save_checkpoint(self.save_dir, tag=tag)
        p = Pending(t0)
        fut.add_done_callback(lambda f: p.mark_done())

        def waiter(timeout):
            return _result_dict(fut.result(timeout))

        p._waiter = waiter
        return p

    def load(self, tag: str) -> None:
        path, _ = self.saver.load_checkpoint(self.save_dir, tag=tag)
        if path is None:
            raise RuntimeError(f"asyncckpt found no checkpoint {tag!r} in {self.save_dir}")

    def staging_bytes(self) -> int | None:
        return int(self.saver.engine.pool.staging_bytes)

    def allocations(self) -> int | None:
        return int(self.saver.engine.pool.allocations)

    def close(self) -> None:
        saver = getattr(self, "saver", None)
        if saver is not None:
            saver.close()
            self.saver = None


def _result_dict(res: Any) -> dict:
    """Whatever the SaveResult carries (its fields may grow; take them all)."""
    try:
        return res.as_dict()
    except AttributeError:
        return {k: v for k, v in vars(res).items() if isinstance(v, (int, float, str, bool, dict, type(None)))}


class AsyncCkptPrepared(AsyncCkpt):
    name = "asyncckpt_prepared"
    prepare = True


class AsyncCkptZstd(AsyncCkpt):
    name = "asyncckpt_zstd"
    compression = True


class AsyncCkptRaw(AsyncCkpt):
    name = "asyncckpt_raw"
    compression = False


class AsyncCkptRawPrepared(AsyncCkpt):
    name = "asyncckpt_raw_prepared"
    compression = False
    prepare = True


class AsyncCkptService(AsyncCkpt):
    """``writer.mode: service``: the node's writer service process encodes, writes and publishes; the training
    process only stages into shared memory and hands a descriptor over."""

    name = "asyncckpt_service"

    writer_mode = "service"

    @property
    def notes(self) -> str:  # type: ignore[override]
        return super().notes + "; writer.mode: service (the node's writer service process writes and publishes)"


# ------------------------------------------------------------------------------------------- Lightning
class _LightningIO(System):
    """A Lightning ``CheckpointIO`` plugin saving what Lightning's ``Trainer.save_checkpoint`` hands it (the
    parts that are state: weights, optimizer states, step) to ``<save_dir>/<tag>.ckpt``; no Trainer."""

    requires = ("lightning", "asyncckpt")
    max_world = 1

    def make_io(self):
        raise NotImplementedError

    def open(self, save_dir: str) -> dict:
        out = super().open(save_dir)
        self.io = self.make_io()
        self.global_step = 0
        return out

    def path(self, tag: str) -> str:
        return os.path.join(self.save_dir, f"{tag}.ckpt")

    def save(self, tag: str) -> Pending:
        t0 = time.perf_counter()
        self.global_step += 1
        checkpoint = {"state_dict": self.wl.module.state_dict(), "optimizer_states": [self.wl.optimizer.state_dict()],
                      "global_step": self.global_step}
        self.io.save_checkpoint(checkpoint, self.path(tag))
        p = Pending(t0)
        p._waiter = lambda timeout: self.durable(tag, timeout)
        return p

    def durable(self, tag: str, timeout: float | None) -> dict:
        raise NotImplementedError

    def restore(self, checkpoint: dict) -> None:
        self.wl.module.load_state_dict(checkpoint["state_dict"])
        self.wl.optimizer.load_state_dict(checkpoint["optimizer_states"][0])

    def close(self) -> None:
        io = getattr(self, "io", None)
        if io is not None:
            self.io = None
            io.teardown()


class LightningAsync(_LightningIO):
    name = "lightning_async"
    sync = False
    requires = ("lightning",)
    notes = ("Lightning's own lightning.pytorch.plugins.io.AsyncCheckpointIO(TorchCheckpointIO()) saving "
             "{state_dict, optimizer_states, global_step}: save_checkpoint clones every tensor on the training "
             "thread, then torch.save in one background thread. It does not fsync: time to durable = its "
             "teardown() (waits for the thread) plus an fsync of the file and its directory")

    def make_io(self):
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        return AsyncCheckpointIO(TorchCheckpointIO())

    def durable(self, tag: str, timeout: float | None) -> dict:
        self.io.teardown()  # the next save_checkpoint starts a new thread
        fsync_path(self.path(tag))
        fsync_path(self.save_dir)
        return {}

    def load(self, tag: str) -> None:
        self.restore(torch.load(self.path(tag), map_location="cpu", weights_only=True))


class AsyncCkptLightning(_LightningIO):
    name = "asyncckpt_lightning"
    sync = False
    takes_asyncckpt_config = True
    notes = ("asyncckpt.integrations.lightning.AsyncCheckpointIO(config) saving {state_dict, optimizer_states, "
             "global_step} (compression as configured); time to durable = its wait() (published: files, "
             "directory and 'latest' fsynced)")

    def make_io(self):
        from asyncckpt.integrations.lightning import AsyncCheckpointIO

        return AsyncCheckpointIO(dict(self.options.get("config", {})))

    def durable(self, tag: str, timeout: float | None) -> dict:
        self.io.wait(timeout)
        return {}

    def load(self, tag: str) -> None:
        self.restore(self.io.load_checkpoint(self.path(tag)))

    def staging_bytes(self) -> int | None:
        engine = self.io._engine  # private: the plugin's SaveEngine, made by the first save
        return None if engine is None else int(engine.pool.staging_bytes)

    def allocations(self) -> int | None:
        engine = self.io._engine
        return None if engine is None else int(engine.pool.allocations)


SYSTEMS: dict[str, type[System]] = {}


def register(cls: type[System]) -> type[System]:
    """Add a system to the benchmark (usable as a class decorator). A module listed under ``plugins:`` in a
    run's YAML is imported by the runner and by every measurement process, so its systems exist in both."""
    if not (isinstance(cls, type) and issubclass(cls, System)) or not cls.name or cls.name == System.name:
        raise TypeError(f"{cls!r} is not a System subclass with its own name")
    if SYSTEMS.get(cls.name, cls) is not cls:
        raise ValueError(f"a different system is already registered as {cls.name!r}")
    SYSTEMS[cls.name] = cls
    return cls


for _cls in (TorchSave, DeepSpeed, DcpSave, DcpAsync, DcpAsyncDefault, AsyncCkpt, AsyncCkptPrepared, AsyncCkptZstd,
             AsyncCkptRaw, AsyncCkptRawPrepared, AsyncCkptService, LightningAsync, AsyncCkptLightning, DeepSpeedAsyncCkpt):
    register(_cls)
assert tuple(SYSTEMS) == SYSTEM_NAMES, "spec.SYSTEM_NAMES lists the built-in systems implemented here, in order"
