"""``AsyncCheckpointer``: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` over any model, optimizer and
LR scheduler, with saves that return as soon as the state is in host buffers."""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Mapping

import torch

from .commit import DistContext
from .config import Config
from .engine import SaveEngine
from .errors import CheckpointError, CheckpointNotFoundError
from .future import SaveFuture
from .io_types import SaveResult
from .loader import CheckpointReader, MapLocation, read_latest
from .placement import is_dtensor
from .state import flatten

log = logging.getLogger(__name__)

try:  # numpy's RNG is saved when numpy is installed
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if _np is not None:
        state["numpy"] = _np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state and _np is not None:
        _np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("not restoring CUDA RNG states: saved for %d devices, %d here", len(cuda), torch.cuda.device_count())


def _is_model_state(path: str) -> bool:
    return path.startswith(("module/", "optimizer/", "lr_scheduler/"))


class AsyncCheckpointer:
    """Wraps a model (and optionally an optimizer and LR scheduler) for asynchronous checkpointing.

    >>> saver = AsyncCheckpointer(model, optimizer, lr_scheduler=sched, config="ckpt.yaml")
    >>> fut = saver.save_checkpoint("ckpts", client_state={"epoch": 3})   # returns after the host copy
    >>> path, client_state = saver.load_checkpoint("ckpts")
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 lr_scheduler: Any = None, config: Config | Mapping | str | os.PathLike | None = None,
                 replicated: bool | None = None, dist_context: DistContext | None = None):
        """``replicated``: the model, optimizer and scheduler state is identical on every rank (data
        parallel), so it is written once in total, split across ranks. None (default) means: yes when the
        model is wrapped in ``DistributedDataParallel``. Sharded ``DTensor`` state (FSDP2) is always saved
        shard by shard. Must be called on every rank (it joins a dedicated gloo group)."""
        self.config = Config.coerce(config)
        if replicated is None:
            replicated = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.replicated = replicated
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.global_steps = 0
        self._hook = None
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._count_step)
        self._engine = SaveEngine(self.config, dist_context)

    def _count_step(self, optimizer, args, kwargs) -> None:
        self.global_steps += 1

    @property
    def rank(self) -> int:
        return self._engine.ctx.rank

    @property
    def world_size(self) -> int:
        return self._engine.ctx.world_size

    @property
    def engine(self) -> SaveEngine:
        return self._engine

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self, client_state: Mapping | None = None, exclude_frozen_parameters: bool = False) -> dict:
        module_state = self.module.state_dict()
        frozen: list[str] = []
        if exclude_frozen_parameters:
            frozen = [n for n, p in self.module.named_parameters() if not p.requires_grad]
            for n in frozen:
                module_state.pop(n, None)
        state: dict[str, Any] = {
            "module": module_state,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "global_steps": self.global_steps,
            "frozen_parameters": frozen,
            "client_state": dict(client_state) if client_state is not None else {},
        }
        if self.config.save_rng_state:
            state["rng"] = rng_state()
        return state

    def _flatten(self, state: Any):
        return flatten(state, allow_pickle=self.config.allow_pickle,
                       replicated=_is_model_state if self.replicated else None)

    def prepare(self) -> None:
        """Allocate (and fault in) the host buffers now, so that even the first save only copies. Call it
        after the optimizer has its state (after the first step), or the first save will grow the buffers."""
        self._engine.pool.prepare(self._flatten(self.state_dict()).items)

    # --------------------------------------------------------------------------------------------- save
    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None, client_state: Mapping | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> SaveFuture:
        """Stage the training state into host buffers and return; the write and commit run in the background.

        ``tag`` defaults to ``global_step{N}``, N counting optimizer steps since wrapping (restored on load).
        ``latest`` names the tag once it is published, if ``save_latest``. Returns a :class:`SaveFuture`."""
        if tag is None:
            tag = f"global_step{self.global_steps}"
        def collect():
            return self._flatten(self.state_dict(client_state, exclude_frozen_parameters))

        return self._engine.save(collect, os.fspath(save_dir), str(tag), save_latest=save_latest,
                                 manifest_extra={"global_steps": self.global_steps})

    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Block until every save so far is published; raises the first failure nobody observed."""
        return self._engine.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight saves and stop the background threads (see :meth:`SaveEngine.close` for a timeout)."""
        try:
            self._engine.close(timeout)
        finally:
            if self._engine._closed and self._hook is not None:  # a timed-out close leaves the saver open
                self._hook.remove()
                self._hook = None

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original exception behind a background one
            try:
                self.close()
            except CheckpointError as bg:
                log.error("while closing after an error: %s", bg)

    # --------------------------------------------------------------------------------------------- load
    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, load_rng_states: bool = True,
                        map_location: MapLocation = None) -> tuple[str | None, dict | None]:
        """Restore model, optimizer, scheduler, step counter and RNG from ``tag`` (default: ``latest``).

        Returns ``(path, client_state)``. As in DeepSpeed, when ``tag`` is None and ``load_dir`` has no
        ``latest`` file, nothing is loaded and ``(None, None)`` is returned (with a warning)."""
        load_dir = os.fspath(load_dir)
        if tag is None and read_latest(load_dir) is None:
            log.warning("no 'latest' file in %s: nothing to load (pass tag= to load a specific checkpoint)", load_dir)
            return None, None
        reader = CheckpointReader(load_dir, tag)
        if map_location is None:
            map_location = self._module_device_map()
        state = reader.load_state(rank=self.rank, map_location=map_location, verify=self.config.verify_on_load,
                                  allow_pickle=self.config.allow_pickle, mesh=self._device_mesh())
        if not isinstance(state, dict) or "module" not in state:
            raise CheckpointError(f"{reader.path} was not written by AsyncCheckpointer (no 'module' entry); "
                                  "use asyncckpt.load() for checkpoints written with asyncckpt.save()")
        self._load_module(state, load_module_strict, reader.path)
        if not load_module_only:
            if load_optimizer_states and self.optimizer is not None:
                if state.get("optimizer") is None:
                    raise CheckpointNotFoundError(f"{reader.path} holds no optimizer state (load_optimizer_states=False to skip it)")
                self.optimizer.load_state_dict(state["optimizer"])
            if load_lr_scheduler_states and self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if load_rng_states and state.get("rng"):
                set_rng_state(state["rng"])
            self.global_steps = int(state.get("global_steps", 0))
        return reader.path, state.get("client_state", {})

    def _device_mesh(self) -> Any:
        """The mesh of the model's DTensor parameters (FSDP2), onto which sharded state is resharded."""
        for p in self.module.parameters():
            if is_dtensor(p):
                return p.device_mesh
        return None

    def _module_device_map(self) -> MapLocation:
        """Load onto the device the wrapped model lives on now (a CUDA checkpoint into a CPU model loads to the
        CPU, and the reverse); a model spread over several devices keeps each tensor where it was saved."""
        devices = {(p.to_local() if is_dtensor(p) else p).device for p in self.module.parameters()}
        return next(iter(devices)) if len(devices) == 1 else None

    def _load_module(self, state: dict, strict: bool, path: str) -> None:
        result = self.module.load_state_dict(state["module"], strict=False)
        frozen = set(state.get("frozen_parameters") or [])
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(
                f"{path}: module state does not match the model (load_module_strict=True): missing keys "
                f"{missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected keys {result.unexpected_keys[:10]}")
