"""A Lightning ``CheckpointIO`` plugin that saves asynchronously in the asyncckpt format.

>>> trainer = Trainer(plugins=[AsyncCheckpointIO("ckpt.yaml")], callbacks=[ModelCheckpoint(save_last=True)])

Every path Lightning hands over (``.../epoch=0-step=10.ckpt``) becomes an asyncckpt checkpoint: save_dir = the
path's directory, tag = its file name, so ``epoch=0-step=10.ckpt`` is a directory that appears (by atomic
rename) only once its data is durable, and ``last.ckpt`` is replaced in one atomic step. ``save_checkpoint``
returns once the state is in host buffers. Lightning calls the plugin on global rank 0 only, so rank 0 writes
the whole (replicated) state and the other ranks read it on resume.

With several ranks, only rank 0 waits for its saves in ``teardown`` (the end of ``fit``): the other ranks may
return from ``fit`` while the last checkpoint is still being written. Lightning's next stage (``fit``,
``validate``, ``test``) starts with a barrier, so its ``ckpt_path`` is always complete; code of your own that
reads checkpoints on other ranks right after ``fit`` calls ``trainer.strategy.barrier()`` first.

With ``snapshot: lazy`` the copy into host buffers runs in the background after ``save_checkpoint`` returns
(:class:`~asyncckpt.staging.Snapshot`); see :class:`_SnapshotGuard` for where training waits for it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import uuid
import weakref
from typing import Any, Mapping

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
except ImportError:  # the standalone ``pytorch_lightning`` package
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..commit import DistContext
from ..config import Config
from ..durable import fsync_dir, remove_tree
from ..engine import SaveEngine
from ..errors import CheckpointError, CheckpointNotFoundError
from ..format import MANIFEST
from ..future import SaveFuture
from ..checkpointer import _is_torch_code
from ..loader import load, read_latest
from ..staging import LazyStaging, Snapshot
from ..state import FlatState, FlattenCache, flatten
from ..threads import started_pool
from ._common import drain_at_exit, framework_config

log = logging.getLogger(__name__)

__all__ = ["AsyncCheckpointIO"]

_REMOVED = ".removed-"  # .<tag>.removed-<hex>: a removed checkpoint whose bytes are being deleted


class AsyncCheckpointIO(CheckpointIO):
    """``Trainer(plugins=[AsyncCheckpointIO(config)])``: asynchronous, durable, atomic Lightning checkpoints.

    * ``save_checkpoint`` returns after staging; a failure in the background is raised by the next
      ``save_checkpoint`` or by ``teardown`` (the end of ``fit``), which also drains every save in flight.
    * ``remove_checkpoint`` of a checkpoint still being written removes it once it is published (never a
      half-written one); a published checkpoint disappears at once (atomic rename) and its bytes are
      deleted in the background.
    * ``load_checkpoint`` takes a checkpoint path, a ``save_last="link"`` symlink (a link whose target was
      never published, because the run died first, loads the newest published checkpoint of the directory,
      which its ``latest`` file names, with a warning), a checkpoint directory (→ its ``latest``), or a
      ``torch.save`` file of an earlier run.
    * With ``snapshot: lazy``, ``save_checkpoint`` returns before the copy; training waits for it only where
      saved state is about to change (see :class:`_SnapshotGuard`); state changed anywhere else before the copy
      is complete fails that save (nothing is published): call :meth:`wait_snapshot` before such code.
    * A hidden name (``.temp.ckpt``, which ``ddp_spawn`` uses to hand the final weights to the main process
      after ``teardown``) is written synchronously with ``torch.save``; any other name must be a valid tag.

    ``config``: an :class:`asyncckpt.Config`, a mapping or a YAML path. ``overwrite`` is always on (Lightning
    re-saves ``last.ckpt`` under the same name; the replacement is atomic) and ``keep_last`` must be 0
    (``ModelCheckpoint(save_top_k=...)`` decides what is kept).
    """

    def __init__(self, config: Config | Mapping | str | os.PathLike | None = None):
        super().__init__()
        cfg = framework_config(config, "AsyncCheckpointIO", "Lightning's ModelCheckpoint(save_top_k=...)")
        self.config = dataclasses.replace(cfg, overwrite=True)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._engine: SaveEngine | None = None
        self._remover: concurrent.futures.ThreadPoolExecutor | None = None
        self._removals: list[concurrent.futures.Future] = []
        self._pending: dict[str, SaveFuture] = {}  # absolute path -> its newest save, while in flight
        self._generation: dict[str, int] = {}  # absolute path -> number of saves requested for it
        self._cleaned: set[str] = set()  # directories whose leftover removals were deleted
        self._lock = threading.Lock()
        self._guard = _SnapshotGuard()
        self._flatten_cache = FlattenCache()  # an unchanged state is matched, not walked, every save

    # Lightning pickles its plugins into ddp_spawn workers: only the configuration travels.
    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self._init_runtime()

    # --------------------------------------------------------------------------------------------- save
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AsyncCheckpointIO.save_checkpoint does not take storage_options")
        key = _local_path(path)
        save_dir, tag = os.path.split(key)
        if tag.startswith("."):  # Lightning's own hand-over file (ddp_spawn's .temp.ckpt, read back at once)
            TorchCheckpointIO().save_checkpoint(checkpoint, key)
            return
        os.makedirs(save_dir, exist_ok=True)  # now: save_last="link" links into it as soon as this returns
        if save_dir not in self._cleaned:
            self._cleaned.add(save_dir)
            for name in os.listdir(save_dir):
                if name.startswith(".") and _REMOVED in name:  # a removal a crash cut short
                    self._discard(os.path.join(save_dir, name))
        if self._engine is None:
            # Lightning calls CheckpointIO on global rank 0 only: a one-rank engine, no collectives.
            self._engine = SaveEngine(self.config, DistContext())
            drain_at_exit(self, "teardown")  # a save after the last teardown (trainer.save_checkpoint after fit)
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._pending = {p: f for p, f in self._pending.items() if not f.done()}
        groups: dict[str, int] = {}  # lazy: key path -> copy group, known once the state is flattened
        lazy = LazyStaging(lambda k: groups.get(k, -1), 2) if self.config.snapshot == "lazy" else None
        flat = flatten(checkpoint, allow_pickle=self.config.allow_pickle, cache=self._flatten_cache,
                       leaves=None if lazy is None else lazy.leaves)
        if lazy is not None:
            groups.update(self._guard.groups(lazy.leaves, flat))
        fut = self._engine.save(flat, save_dir, tag, save_latest=True, lazy=lazy)  # raises an earlier failure
        if lazy is not None:
            self._guard.add(lazy.snapshot)
        with self._lock:
            self._pending[key] = fut

    # ------------------------------------------------------------------------------------------- remove
    def remove_checkpoint(self, path: Any) -> None:
        key = _local_path(path)
        if os.path.islink(key) or os.path.isfile(key):  # a save_last="link" symlink, a torch.save file
            os.unlink(key)
            return
        with self._lock:
            fut = self._pending.get(key)
            generation = self._generation.get(key, 0)
        if self._remover is None:
            self._remover = started_pool(1, "asyncckpt-lightning-remove")
        if fut is not None and not fut.done():  # still being written: remove it once it is published
            done: concurrent.futures.Future = concurrent.futures.Future()
            fut.add_done_callback(lambda _: done.set_result(None))
            self._removals.append(self._remover.submit(self._remove_after, done, key, generation))
        else:
            self._removals.append(self._remover.submit(self._discard, self._withdraw(key)))
        self._removals = [r for r in self._removals if not r.done()]

    def _remove_after(self, published: concurrent.futures.Future, key: str, generation: int) -> None:
        published.result()
        with self._lock:
            if self._generation.get(key, 0) != generation:
                return  # saved again under the same name since: that newer checkpoint stays
            doomed = self._withdraw(key)
        self._discard(doomed)

    def _withdraw(self, key: str) -> str | None:
        """Make the checkpoint at ``key`` disappear in one step (rename to a hidden name, which the first save
        into that directory removes after a crash). Returns the hidden name, or None if nothing is there."""
        save_dir, tag = os.path.split(key)
        doomed = os.path.join(save_dir, f".{tag}{_REMOVED}{uuid.uuid4().hex}")
        try:
            os.rename(key, doomed)
        except FileNotFoundError:
            return None
        if self.config.writer.fsync:
            fsync_dir(save_dir)
        return doomed

    @staticmethod
    def _discard(doomed: str | None) -> None:
        if doomed is not None:
            try:
                remove_tree(doomed)
            except OSError as exc:
                log.warning("could not delete removed checkpoint %s: %s", doomed, exc)

    # --------------------------------------------------------------------------------------------- load
    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        key = _local_path(path)
        self.wait_snapshot()  # what is loaded is then copied into the live state
        with self._lock:
            fut = self._pending.get(key)
        if fut is not None:
            fut.result()  # a checkpoint this process is still writing: load it once published
        allow_pickle = self.config.allow_pickle and weights_only is not True
        if not isinstance(map_location, (str, dict, torch.device)):
            map_location = None  # Lightning's default is a torch.load storage callable: load to the CPU
        save_dir, tag = self._resolve(key)
        if save_dir is None:  # a torch.save file written before switching to asyncckpt
            return TorchCheckpointIO().load_checkpoint(key, weights_only=weights_only)
        return load(save_dir, tag, map_location=map_location or "cpu", allow_pickle=allow_pickle, rank=0,
                    verify=self.config.verify_on_load)

    @staticmethod
    def _resolve(key: str) -> tuple[str | None, str | None]:
        """(save_dir, tag) of what ``key`` names; tag None → the tag ``latest`` names; save_dir None → a file."""
        if os.path.islink(key):
            target = os.path.realpath(key)
            if os.path.isdir(target):
                return os.path.split(target)
            save_dir = os.path.dirname(key)
            if read_latest(save_dir) is None:
                raise CheckpointNotFoundError(f"{key} links to {target}, which was never published, and "
                                              f"{save_dir} has no 'latest' file naming a published checkpoint")
            log.warning("%s links to %s, which was never published (the run stopped while writing it); loading "
                        "the newest published checkpoint, named by %s", key, target, os.path.join(save_dir, "latest"))
            return save_dir, None
        if os.path.isfile(key):
            return None, None
        if os.path.isdir(key) and not os.path.lexists(os.path.join(key, MANIFEST)):
            return key, None  # a checkpoint directory: its newest published checkpoint
        return os.path.split(key)

    # ----------------------------------------------------------------------------------------- teardown
    def wait_snapshot(self, timeout: float | None = None) -> None:
        """With ``snapshot: lazy``: block until the state of every save so far is copied. Call it before changing
        saved state anywhere but in an optimizer's ``step()`` or a module's forward (see the class docstring).
        A no-op with ``snapshot: eager`` or when no copy is pending; ``TimeoutError`` if ``timeout`` expires."""
        self._guard.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save and removal so far is done; raise the first background save failure."""
        if self._engine is not None:
            self._engine.wait(timeout)
        for r in list(self._removals):
            r.result(timeout)

    def teardown(self) -> None:
        """End of ``fit``/``validate``/...: drain every save in flight, then raise a failure nobody saw yet."""
        engine, self._engine = self._engine, None
        remover, self._remover = self._remover, None
        try:
            if engine is not None:
                engine.close()  # waits for the snapshots' copies; a state torn meanwhile fails its save here
        finally:
            self._guard.drop()
            if remover is not None:
                remover.shutdown(wait=True)
            self._removals = []
            self._pending = {}


class _SnapshotGuard:
    """Where training waits for the lazy snapshots of the saves in flight (``snapshot: lazy``).

    Lightning gives a ``CheckpointIO`` no reference to the trainer or the model, so the guard hooks into what
    every training step goes through, process-wide, and only while a copy is pending (no cost otherwise):

    * a global module forward pre-hook: before any forward, the copy of group 0 (the model state that is not
      a parameter of an optimizer: buffers such as BatchNorm running statistics, which change in forward);
    * a global optimizer step pre-hook: before any optimizer's update, the whole copy (parameters and
      optimizer state). Lightning runs ``training_step`` and ``backward`` inside ``optimizer.step(closure)``;
      for torch's own optimizers, which evaluate the closure before they update anything, the hook makes the
      closure wait after it returns, so forward and backward overlap the copy. Any other optimizer waits
      before its step begins.

    The parameters are told apart from the buffers by the optimizers the step hook has seen (their parameters'
    storages): until a step has run while a copy was pending (the first lazy save of a plugin), the whole model
    state is group 0. A tensor changed in place where no hook sees it fails its save through its version
    counter (see :class:`~asyncckpt.staging.Snapshot`)."""

    def __init__(self):
        self._snapshots: list[Snapshot] = []
        self._optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._forward_hook = None
        self._step_hook = None

    def groups(self, leaves: list[tuple[str, torch.Tensor]], flat: FlatState) -> dict[str, int]:
        """The copy group of every staged key path (see :class:`~asyncckpt.staging.LazyStaging`): 0 the model
        state no optimizer updates, 1 the parameters and the optimizer states, -1 (copied at the call) the rest
        (loops, callbacks, LR schedulers: small, or changed where no hook sees). A storage shared by several
        saved tensors is copied with the earliest group among them, and each of them is watched with it."""
        params = {p.untyped_storage().data_ptr() for o in list(self._optimizers)
                  for g in o.param_groups for p in g["params"]}
        out = {}
        for path, t in leaves:
            if path.startswith("optimizer_states/"):
                out[path] = 1
            elif path.startswith("state_dict/"):
                out[path] = 1 if t.untyped_storage().data_ptr() in params else 0
            else:
                out[path] = -1
        for v in flat.views:
            out[v.base] = min(out.get(v.base, 1), out[v.key])
        for v in flat.views:
            out[v.key] = out[v.base]
        return out

    def add(self, snapshot: Snapshot) -> None:
        self._snapshots.append(snapshot)
        ref = weakref.ref(self)
        if self._forward_hook is None:
            self._forward_hook = register_module_forward_pre_hook(lambda module, args: _call(ref, "_before_forward"))
        if self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(
                lambda optimizer, args, kwargs: _call(ref, "_before_step", optimizer, args, kwargs))

    def _before_forward(self) -> None:
        for s in self._snapshots:
            s.settle(0)
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def _before_step(self, optimizer, args, kwargs):
        self._optimizers.add(optimizer)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None or not _is_torch_code(type(optimizer).step):
            self._settle()
            return None

        def closure_then_settle():
            try:
                return closure()
            finally:
                self._settle()

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_settle}
        return (args[0], closure_then_settle, *args[2:]), kwargs

    def _settle(self) -> None:
        snapshots, self._snapshots = self._snapshots, []
        self.drop()
        for s in snapshots:
            s.settle(s.groups - 1)

    def wait(self, timeout: float | None = None) -> None:
        while self._snapshots:
            self._snapshots[0].wait(timeout)
            self._snapshots.pop(0)
        self.drop()

    def drop(self) -> None:
        """Remove the hooks (and forget the snapshots: the engine's pipeline checks them once copied)."""
        self._snapshots = []
        for hook in (self._forward_hook, self._step_hook):
            if hook is not None:
                hook.remove()
        self._forward_hook = self._step_hook = None


def _call(ref: "weakref.ref[_SnapshotGuard]", method: str, *args):
    guard = ref()
    return None if guard is None else getattr(guard, method)(*args)


def _local_path(path: Any) -> str:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise CheckpointError(f"AsyncCheckpointIO writes to local (or mounted) file systems only, not {text!r}")
    return os.path.abspath(text.removeprefix("file://"))
