"""``AsyncCheckpointer``: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` over any model, optimizer and
LR scheduler, with saves that return as soon as the state is in host buffers.

A load is all or nothing: whatever can be checked (module keys and shapes, optimizer groups and state shapes,
the presence of each requested part) is checked before anything is modified, and each part applied is undone
if a later one still fails (see :class:`_Load`)."""
from __future__ import annotations

import copy
import logging
import numbers
import os
import random
import weakref
from typing import Any, Callable, Mapping

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .agreement import agree_on_tag
from .commit import DistContext
from .config import Config
from .engine import SaveEngine
from .errors import CheckpointError, StateMismatchError
from .future import SaveFuture
from .io_types import SaveResult
from .loader import CheckpointReader, MapLocation, read_latest
from .placement import is_dtensor
from .staging import LazyStaging, Snapshot
from .state import STORAGE_PREFIX, FlattenCache, escape, flatten, join

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


def _snapshot_hooks(saver: "AsyncCheckpointer") -> list:
    """A lazy snapshot's guards: before any optimizer's step (every optimizer of the process: a second one
    may update the same parameters), before the forward of the model and of every module that holds
    buffers (BatchNorm running statistics change there; so may a wrapper's broadcast of them), and before a
    ``load_state_dict`` of any of the model's modules or of the wrapped optimizer. They refer to the saver
    weakly: they do not keep it alive."""
    ref = weakref.ref(saver)

    def before_change(*args) -> None:  # an optimizer step, or a load_state_dict: parameters and state change
        s = ref()
        if s is not None:
            s._settle(None)

    def before_forward(module, args) -> None:
        s = ref()
        if s is not None:
            s._settle(0)

    hooks = [register_optimizer_step_pre_hook(before_change)]
    for m in saver.module.modules():  # the wrapped module too: a wrapper (DDP) may change buffers before
        if m is saver.module or any(b is not None for b in m._buffers.values()):  # the inner forward
            hooks.append(m.register_forward_pre_hook(before_forward))
        hooks.append(m.register_load_state_dict_pre_hook(before_change))  # a submodule may be loaded alone
    if saver.optimizer is not None:
        hooks.append(saver.optimizer.register_load_state_dict_pre_hook(before_change))
    return hooks


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
        self._hooks: list = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_post_hook(self._count_step))
        self._engine = SaveEngine(self.config, dist_context)
        self._flatten_cache = FlattenCache()
        self._snapshot: Snapshot | None = None  # a lazy copy not settled yet
        if self.config.snapshot == "lazy":
            self._hooks += _snapshot_hooks(self)
        self._reserved = optimizer is None or bool(optimizer.state)  # else: once the first step made its state
        if self._reserved:
            self._reserve()

    def _count_step(self, optimizer, args, kwargs) -> None:
        self.global_steps += 1
        if not self._reserved:
            self._reserved = True
            self._reserve()

    def _reserve(self) -> None:
        """Allocate staging memory in the background: a CUDA model that may be snapshotted on the device
        (``snapshot_device`` auto or always) needs only the host ring its snapshot drains through."""
        cuda = any(p.device.type == "cuda" for p in self.module.parameters())
        self._engine.pool.reserve(self._estimate_bytes, self._engine.device_ring if cuda else None)

    def _estimate_bytes(self) -> int:
        """About what a save stages: the module's parameters and buffers and the optimizer's state tensors
        (this rank's shards), with slack for the RNG states and client state. Runs in the background
        allocation thread, so it reads tensors only (``state_dict()`` may run collectives or hooks)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        if self.optimizer is not None:
            for entry in list(self.optimizer.state.values()):
                tensors += [t for t in list(entry.values()) if isinstance(t, torch.Tensor)]
        total = 0
        for t in tensors:
            local = t.to_local() if is_dtensor(t) else t
            total += (local.numel() * local.element_size() + 63) // 64 * 64
        return total + total // 64 + (1 << 20)

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

    def _flatten(self, state: Any, leaves: list | None = None):
        return flatten(state, allow_pickle=self.config.allow_pickle, cache=self._flatten_cache, leaves=leaves,
                       replicated=_is_model_state if self.replicated else None)

    def prepare(self) -> None:
        """Allocate (and fault in) the host buffers now, so that even the first save only copies. Call it
        after the optimizer has its state (after the first step), or the first save will grow the buffers.
        Without it, the buffers are allocated in the background from construction (or from the first optimizer
        step when the optimizer has no state yet) for an estimate of the state's size."""
        self._engine.pool.prepare(self._flatten(self.state_dict()).items)

    # --------------------------------------------------------------------------------------------- save
    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | int | None = None,
                        client_state: Mapping | None = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> SaveFuture:
        """Stage the training state into host buffers and return; the write and commit run in the background.

        ``tag`` defaults to ``global_step{N}``, N counting optimizer steps since wrapping (restored on load).
        An integer tag is the tag of its decimal digits (``tag=100`` is ``"100"``, for load as well).
        ``latest`` names the tag once it is published, if ``save_latest``. Returns a :class:`SaveFuture`."""
        tag = f"global_step{self.global_steps}" if tag is None else _tag_text(tag)
        self.wait_snapshot()  # the previous lazy copy, if any, is settled before the next one starts
        lazy = self._lazy_staging()

        def collect():
            state = self.state_dict(client_state, exclude_frozen_parameters)
            return self._flatten(state, None if lazy is None else lazy.leaves)

        fut = self._engine.save(collect, os.fspath(save_dir), tag, save_latest=save_latest,
                                manifest_extra={"global_steps": self.global_steps}, pinned=self._buffer_keys(),
                                lazy=lazy)
        if lazy is not None:
            self._snapshot = lazy.snapshot
        return fut

    def _lazy_staging(self) -> LazyStaging | None:
        """With ``snapshot: lazy``: the module's buffers are copied first (group 0: the next forward waits for
        them), then the rest of the module and optimizer state (group 1: the next optimizer step waits);
        everything else (LR scheduler, RNG, client state: tiny, or changed where no hook sees) at the call."""
        if self.config.snapshot != "lazy":
            return None
        buffers = frozenset(join("module", escape(name)) for name, _ in self.module.named_buffers())

        def group_of(key: str) -> int:
            path = key[len(STORAGE_PREFIX):] if key.startswith(STORAGE_PREFIX) else key
            if path in buffers:
                return 0
            return 1 if path.startswith(("module/", "optimizer/")) else -1

        return LazyStaging(group_of, 2)

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """With ``snapshot: lazy``: block until the last save's state is completely copied. Call it before
        changing saved state anywhere but in ``optimizer.step()`` or a module's forward (writing parameters in
        place, loading weights, ...): a save whose state changed before its copy was complete fails (nothing is
        published) rather than holding a torn state. A no-op with ``snapshot: eager`` or when nothing is
        pending. Raises ``TimeoutError`` if ``timeout`` expires first."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.wait(timeout)
            self._snapshot = None

    def _settle(self, group: int | None) -> None:
        """Hooks: order what follows after the copy of ``group`` (and of every earlier one; None: all)."""
        snapshot = self._snapshot
        if snapshot is None:
            return
        last = snapshot.groups - 1
        snapshot.settle(last if group is None else group)
        if group is None or group == last:
            self._snapshot = None

    def _buffer_keys(self) -> frozenset[str]:
        """Key paths of the module's buffers (BatchNorm running statistics...): each rank updates its own in
        forward, so with replicated state they are saved as the first rank of the copy scope holds them."""
        if not self.replicated:
            return frozenset()
        return frozenset(join("module", escape(name)) for name, _ in self.module.named_buffers())

    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Block until every save so far is published; raises the first failure nobody observed."""
        return self._engine.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight saves and stop the background threads (see :meth:`SaveEngine.close` for a timeout)."""
        try:
            self._engine.close(timeout)
        finally:
            if self._engine._closed:  # a timed-out close leaves the saver open
                for hook in self._hooks:
                    hook.remove()
                self._hooks = []
                self._snapshot = None

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
    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | int | None = None,
                        load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                        load_rng_states: bool = True,
                        map_location: MapLocation = None) -> tuple[str | None, dict | None]:
        """Restore model, optimizer, scheduler, step counter and RNG from ``tag`` (default: ``latest``).

        Returns ``(path, client_state)``. As in DeepSpeed, when ``tag`` is None and ``load_dir`` has no
        ``latest`` file, nothing is loaded and ``(None, None)`` is returned (with a warning).

        With several ranks the call is collective: the ranks agree on one tag and its save identity over the
        saver's group before anything is read (see :mod:`asyncckpt.agreement`); when they cannot (a rank lacks
        the tag, or has no ``latest`` while others have one), every rank raises :class:`CheckpointError`
        naming the ranks and what each sees. ``(None, None)`` only when no rank has a ``latest``.

        All or nothing: a checkpoint that does not fit raises :class:`StateMismatchError` naming the keys, and
        the model, optimizer, scheduler, step counter and RNG states are left exactly as they were. Refused
        before anything is modified: missing or unexpected module keys (``load_module_strict``; parameters the
        checkpoint lists as excluded frozen ones may be missing), a tensor shape that differs (even when not
        strict; a dtype may differ: the value is cast, as torch does), other optimizer parameter groups or
        state shapes, no optimizer or scheduler state where one is to be loaded. An error raised while loading
        (by a custom module, optimizer or scheduler) is raised as a ``StateMismatchError`` after the previous
        state was put back."""
        load_dir = os.fspath(load_dir)
        tag = None if tag is None else _tag_text(tag)
        if self._engine.ctx.distributed:  # every rank loads the same checkpoint, or none does (agreement.py)
            tag = self._engine.coordinated(agree_on_tag, self._engine.coordinator.gather, load_dir, tag,
                                              self._storage_options())
            if tag is None:
                log.warning("no rank has a 'latest' file in %s: nothing to load (pass tag= to load a specific "
                            "checkpoint)", load_dir)
                return None, None
        elif tag is None and read_latest(load_dir, storage=self._storage_options()) is None:
            log.warning("no 'latest' file in %s: nothing to load (pass tag= to load a specific checkpoint)", load_dir)
            return None, None
        with CheckpointReader(load_dir, tag, storage=self._storage_options()) as reader:
            return self._load_from(reader, map_location, load_module_strict, load_optimizer_states,
                                   load_lr_scheduler_states, load_module_only, load_rng_states)

    def _storage_options(self) -> dict | None:
        """The fsspec options of a URL save directory (a local one ignores them)."""
        return self.config.storage.fsspec_options()

    def _load_from(self, reader: CheckpointReader, map_location, load_module_strict: bool,
                   load_optimizer_states: bool, load_lr_scheduler_states: bool, load_module_only: bool,
                   load_rng_states: bool) -> tuple[str, dict]:
        if map_location is None:
            map_location = self._module_device_map()
        try:
            source, refusal = self._source_rank(reader, load_rng_states and not load_module_only), ""
        except StateMismatchError as exc:
            source, refusal = None, str(exc)
        if self._engine.ctx.distributed:  # a rank that refuses alone would leave the others hanging later
            refusal = self._engine.coordinated(self._engine.coordinator.refusal_everywhere, refusal,
                                               "checking which rank's records each rank loads")
        if refusal:
            raise StateMismatchError(refusal)
        state = reader.load_state(rank=source, map_location=map_location, verify=self.config.verify_on_load,
                                  allow_pickle=self.config.allow_pickle, mesh=self._device_mesh())
        if not isinstance(state, dict) or "module" not in state:
            raise CheckpointError(f"{reader.path} was not written by AsyncCheckpointer (no 'module' entry); "
                                  "use asyncckpt.load() for checkpoints written with asyncckpt.save()")
        path = reader.path
        # 1. check everything that can be checked; nothing is modified yet
        _check_module(self.module, state, load_module_strict, path)
        optimizer = scheduler = rng = steps = None
        if not load_module_only:
            if load_optimizer_states and self.optimizer is not None:
                optimizer = _required(state, "optimizer", "load_optimizer_states", path)
                _check_optimizer(self.optimizer, optimizer, path)
            if load_lr_scheduler_states and self.lr_scheduler is not None:
                scheduler = _required(state, "lr_scheduler", "load_lr_scheduler_states", path)
            if load_rng_states and state.get("rng"):
                rng = state["rng"]
            steps = state.get("global_steps", 0)
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise StateMismatchError(f"{path}: 'global_steps' must be an integer >= 0, got {steps!r}")
        # 2. apply the parts one by one, each undone if a later one fails; the module last (see _Load)
        load = _Load(path)
        if rng is not None:
            load.apply("RNG", lambda: _rng_undo(rng), lambda: set_rng_state(rng))
        if optimizer is not None:
            load.apply("optimizer", lambda: _OptimizerUndo(self.optimizer).restore,
                       lambda: self.optimizer.load_state_dict(optimizer))
        if scheduler is not None:
            load.apply("lr_scheduler", lambda: _attributes_undo(self.lr_scheduler),
                       lambda: self.lr_scheduler.load_state_dict(scheduler))
        load.apply("module", lambda: None if _torch_loads_module(self.module) else _ModuleUndo(self.module).restore,
                   lambda: self.module.load_state_dict(state["module"], strict=False))
        if steps is not None:
            self.global_steps = steps
        return path, state.get("client_state", {})

    def _source_rank(self, reader: CheckpointReader, want_rng: bool) -> int:
        """Whose rank-local records (RNG states, client_state, non-replicated state) this rank loads. The same
        rank's, when the checkpoint was saved by as many ranks and this copy holds this rank's records. Any
        other mapping (another world size, a node-local copy of another node) loads the lowest saved rank's
        records, and only when no RNG state is to be restored: a rank never silently receives another rank's
        RNG streams (pass ``load_rng_states=False`` to keep this process's own)."""
        if reader.world_size == self.world_size and reader.holds(self.rank):
            return self.rank
        first = reader.first_rank
        if want_rng and _saved_rng(reader, first):
            raise StateMismatchError(
                f"{reader.path}: saved by {reader.world_size} rank(s); rank {self.rank} of {self.world_size} has no "
                "RNG state of its own there and will not be given another rank's: pass load_rng_states=False "
                "(its client_state then comes from the lowest saved rank)")
        return first

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


def _saved_rng(reader: CheckpointReader, rank: int) -> bool:
    skeleton = reader.skeleton(rank)
    return isinstance(skeleton, dict) and bool(skeleton.get("rng"))


def _tag_text(tag: Any) -> Any:
    """A tag as save and load both take it: an integer (not a bool) is the tag of its decimal digits; anything
    else goes on to :func:`~asyncckpt.format.validate_tag` as it is, to be accepted or refused there."""
    if isinstance(tag, numbers.Integral) and not isinstance(tag, bool):
        return str(int(tag))
    return tag


# ------------------------------------------------------------------------------------- load: the checks
def _listed(items: list[str], limit: int = 10) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{', '.join(items[:limit])}{more}]"


def _required(state: Mapping, key: str, flag: str, path: str) -> Any:
    if state.get(key) is None:
        raise StateMismatchError(f"{path}: the checkpoint holds no {key!r} state ({flag}=False to skip it)")
    return state[key]


def _check_module(module: torch.nn.Module, state: Mapping, strict: bool, path: str) -> None:
    """Keys (when ``strict``; minus the frozen parameters the checkpoint left out) and every tensor's shape,
    which torch refuses even when not strict, but only after copying every tensor that fits."""
    saved, frozen = state["module"], state.get("frozen_parameters") or []
    if not isinstance(saved, Mapping):
        raise StateMismatchError(f"{path}: 'module' is a {type(saved).__name__}, not a module state dict")
    if not isinstance(frozen, list) or not all(isinstance(k, str) for k in frozen):
        raise StateMismatchError(f"{path}: 'frozen_parameters' must be a list of parameter names, got {frozen!r}")
    live = module.state_dict()
    if strict:
        missing = [repr(k) for k in live if k not in saved and k not in set(frozen)]
        unexpected = [repr(k) for k in saved if k not in live]
        if missing or unexpected:
            raise StateMismatchError(f"{path}: module state does not match the model (load_module_strict=True): "
                                     f"missing keys {_listed(missing)}, unexpected keys {_listed(unexpected)}")
    wrong = []
    for key, value in saved.items():
        want = live.get(key)
        if not isinstance(want, torch.Tensor):  # not in the model, or extra state
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key!r}: a {type(value).__name__} in the checkpoint, a tensor in the model")
        elif value.shape != want.shape and not torch.nn.parameter.is_lazy(want):
            wrong.append(f"{key!r}: shape {tuple(value.shape)} in the checkpoint, {tuple(want.shape)} in the model")
    if wrong:
        raise StateMismatchError(f"{path}: module tensors do not fit the model: {_listed(wrong)}")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, path: str) -> None:
    """What ``Optimizer.load_state_dict`` checks (groups and their sizes) and what it does not: ids, and the
    shape of every state tensor (which would otherwise fail, or broadcast, at the next step)."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    entries = saved.get("state") if isinstance(saved, Mapping) else None
    if (not isinstance(groups, (list, tuple)) or not isinstance(entries, Mapping)
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups)):
        raise StateMismatchError(f"{path}: 'optimizer' is not an optimizer state dict ('state' and "
                                 "'param_groups' with 'params')")
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise StateMismatchError(f"{path}: 'optimizer.param_groups': {len(groups)} parameter groups in the "
                                 f"checkpoint, {len(live)} in the optimizer")
    sizes = [f"param_groups[{i}]: {len(g['params'])} parameters in the checkpoint, {len(h['params'])} in the "
             "optimizer" for i, (g, h) in enumerate(zip(groups, live)) if len(g["params"]) != len(h["params"])]
    if sizes:
        raise StateMismatchError(f"{path}: optimizer parameter groups do not fit: {_listed(sizes)}")
    ids = [i for g in groups for i in g["params"]]
    if not all(isinstance(i, (int, str)) for i in ids) or len(set(ids)) != len(ids):
        raise StateMismatchError(f"{path}: 'optimizer.param_groups' must list each parameter id once: {ids[:20]!r}")
    params = dict(zip(ids, (p for g in live for p in g["params"])))
    stray = [repr(k) for k in entries if k not in params]
    if stray:
        raise StateMismatchError(f"{path}: 'optimizer.state' has entries for parameter ids that no group lists: "
                                 f"{_listed(stray)}")
    known_layout = _is_torch_code(type(optimizer).step)
    group_numel = {}  # each parameter's group's total size (LBFGS keeps one flat vector per group)
    for g in live:
        total = sum(q.numel() for q in g["params"])
        group_numel.update((id(p), total) for p in g["params"])
    wrong = []
    for pid, entry in entries.items():
        param = params[pid]
        if not isinstance(entry, Mapping):
            wrong.append(f"state[{pid!r}]: a {type(entry).__name__}, not a mapping")
            continue
        current = optimizer.state.get(param, {})
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            ref = current.get(key)
            if isinstance(ref, torch.Tensor) and ref.dim() > 0:
                if value.shape != ref.shape:
                    wrong.append(f"state[{pid!r}][{key!r}]: shape {tuple(value.shape)} in the checkpoint, "
                                 f"{tuple(ref.shape)} in the optimizer")
            elif known_layout and not _fits_param(value, param, group_numel[id(param)]):
                wrong.append(f"state[{pid!r}][{key!r}]: shape {tuple(value.shape)} in the checkpoint, for a "
                             f"parameter of shape {tuple(param.shape)}")
    if wrong:
        raise StateMismatchError(f"{path}: optimizer state does not fit the parameters: {_listed(wrong)}")


def _fits_param(value: torch.Tensor, param: torch.Tensor, group_numel: int) -> bool:
    """Whether a state tensor of one of torch's optimizers can belong to ``param``: a scalar (step counts), a
    flat vector over the whole group (LBFGS), or the parameter's shape with any dimension possibly 1
    (element-wise moments; Adafactor's factored row and column statistics)."""
    if value.dim() == 0 or (value.dim() == 1 and value.numel() == group_numel):
        return True
    return value.dim() == param.dim() and all(v in (p, 1) for v, p in zip(value.shape, param.shape))


# ------------------------------------------------------------------------------------- load: all or nothing
class _Load:
    """Applies the parts of a load in turn; if one raises, every part applied so far and the failing one are
    undone, in reverse order, and a :class:`StateMismatchError` is raised.

    What undoes a part costs memory only where it must:

    * RNG states and the LR scheduler: always kept (a few KiB; the scheduler's attributes, shallowly).
    * An optimizer: free when only torch's code loads it, since ``Optimizer.load_state_dict`` builds new
      ``state`` and ``param_groups`` objects and swaps them in: keeping the old ones is enough. With its own
      loading code or load hooks, a deep copy of its state (as large as the state, on its device).
    * The module: torch's ``load_state_dict`` copies into every parameter in place, so undoing it takes a copy
      of the whole model (as large as the model, on its device: a GPU could run out of memory). It is taken
      only when code other than torch's runs during the load (a class overriding ``load_state_dict``,
      ``_load_from_state_dict`` or ``set_extra_state``, or a load hook). A model loaded by torch's code alone
      is not copied: keys, shapes and types were checked, and it is loaded last, so a failure there (out of
      memory, say) is the one case that can leave a model partly loaded, and the error says so.
    """

    def __init__(self, path: str):
        self.path = path
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def apply(self, part: str, keep: Callable[[], Callable[[], None] | None], load: Callable[[], Any]) -> None:
        """``keep()`` takes what undoes the part (or None: nothing is kept) just before ``load()`` runs."""
        unguarded = False
        try:
            undo = keep()
            unguarded = undo is None
            if undo is not None:
                self.undo.append((part, undo))
            load()
        except BaseException as exc:
            failed = self._roll_back()
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: put back, then let it through
                raise
            what = f"{self.path}: loading the {part!r} state failed ({type(exc).__name__}: {exc})"
            if failed:
                raise CheckpointError(f"{what}, and putting the previous state back failed too ({'; '.join(failed)}): "
                                      "the model, optimizer and scheduler may be inconsistent") from exc
            if unguarded:  # a model loaded by torch's code alone (see above): not copied
                put_back = ", ".join(p for p, _ in self.undo) or "nothing else"
                raise CheckpointError(f"{what}; put back: {put_back}; the {part} may be partly loaded") from exc
            raise StateMismatchError(f"{what}; nothing was changed") from exc

    def _roll_back(self) -> list[str]:
        failed = []
        for part, undo in reversed(self.undo):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - report every part that could not be put back
                failed.append(f"{part}: {type(exc).__name__}: {exc}")
        return failed


def _is_torch_code(fn: Any) -> bool:
    """Whether ``fn`` (a function, a bound method, a ``functools.partial`` or torch's hook wrapper) is torch's,
    or this module's own (a lazy snapshot's load hook only waits for the copy: it changes no state)."""
    for attr in ("hook", "func", "__func__"):
        fn = getattr(fn, attr, fn)
    module = getattr(fn, "__module__", None) or ""
    return module.partition(".")[0] == "torch" or module == __name__


def _torch_loads_module(module: torch.nn.Module) -> bool:
    """Whether ``module.load_state_dict`` runs torch's code only (no override in any submodule's class, no
    load hook but torch's own, such as FSDP2's)."""
    code = [type(module).load_state_dict]
    for m in module.modules():
        code += [type(m)._load_from_state_dict, type(m).set_extra_state,
                 *m._load_state_dict_pre_hooks.values(), *m._load_state_dict_post_hooks.values()]
    return all(map(_is_torch_code, code))


class _ModuleUndo:
    """A copy of every parameter and buffer (and extra state), put back into the same tensor objects, which
    the optimizer and any other holder keep referring to."""

    def __init__(self, module: torch.nn.Module):
        self.slots = [(store, dict(store)) for m in module.modules() for store in (m._parameters, m._buffers)]
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for _, tensors in self.slots:
                for t in tensors.values():
                    if t is not None and id(t) not in self.copies and not torch.nn.parameter.is_lazy(t):
                        self.copies[id(t)] = (t, t.detach().clone())
        self.extra = [(m, copy.deepcopy(m.get_extra_state())) for m in module.modules()
                      if type(m).get_extra_state is not torch.nn.Module.get_extra_state]

    def restore(self) -> None:
        for store, tensors in self.slots:
            store.clear()
            store.update(tensors)
        with torch.no_grad():
            for t, saved in self.copies.values():
                t.copy_(saved)
        for m, extra in self.extra:
            m.set_extra_state(extra)


class _OptimizerUndo:
    """The optimizer's ``state`` and ``param_groups`` objects (what torch's loading replaces) and, when other
    code loads it (which may change them in place), a copy of their contents; put back into the same objects
    (the same state tensors too: a captured or compiled step may refer to them)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.state, self.groups, self.group_list = optimizer.state, optimizer.param_groups, list(optimizer.param_groups)
        self.contents = None
        hooks = [*getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {}).values(),
                 *getattr(optimizer, "_optimizer_load_state_dict_post_hooks", {}).values()]
        if not all(map(_is_torch_code, [type(optimizer).load_state_dict, type(optimizer).__setstate__, *hooks])):
            with torch.no_grad():
                state = [(p, s, dict(s), {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                          for k, v in s.items()}) for p, s in self.state.items()]
            groups = [(g, {k: v if k == "params" else copy.deepcopy(v) for k, v in g.items()}) for g in self.groups]
            self.contents = (state, groups)

    def restore(self) -> None:
        self.optimizer.state, self.optimizer.param_groups = self.state, self.groups
        self.groups[:] = self.group_list
        if self.contents is None:
            return
        state, groups = self.contents
        self.state.clear()
        for param, entry, objects, values in state:
            entry.clear()
            entry.update(objects)
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    with torch.no_grad():
                        entry[key].copy_(value)
                else:
                    entry[key] = value
            self.state[param] = entry
        for group, saved in groups:
            group.clear()
            group.update(saved)


def _attributes_undo(scheduler: Any) -> Callable[[], None]:
    """Undo for a scheduler's ``load_state_dict``: torch's (and most) rebind attributes of the scheduler, of the
    schedulers it chains (``SequentialLR``, ``ChainedScheduler``) and of its ``lr_lambdas`` objects, so a
    shallow copy of each of their ``__dict__`` puts them back."""
    owners: dict[int, tuple[Any, dict]] = {}
    todo = [scheduler]
    while todo:
        obj = todo.pop()
        if (id(obj) in owners or not hasattr(obj, "__dict__") or not callable(getattr(obj, "load_state_dict", obj))
                or isinstance(obj, (type, torch.optim.Optimizer, torch.nn.Module, torch.Tensor))):
            continue  # only schedulers and callables (lr_lambdas) are walked
        owners[id(obj)] = (obj, dict(vars(obj)))
        todo += [x for v in vars(obj).values() if isinstance(v, (list, tuple)) for x in v]

    def restore() -> None:
        for obj, attrs in owners.values():
            vars(obj).clear()
            vars(obj).update(attrs)

    return restore


def _rng_undo(target: Mapping[str, Any]) -> Callable[[], None]:
    saved = rng_state()
    if "cuda" in target and "cuda" not in saved and torch.cuda.is_available():  # about to be set: keep it too
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return lambda: set_rng_state(saved)
