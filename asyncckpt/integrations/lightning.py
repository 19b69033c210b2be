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
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import uuid
from typing import Any, Mapping

import torch

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
from ..loader import load, read_latest
from ..state import flatten
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
        flat = flatten(checkpoint, allow_pickle=self.config.allow_pickle)
        fut = self._engine.save(flat, save_dir, tag, save_latest=True)  # raises an earlier background failure
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
                engine.close()
        finally:
            if remover is not None:
                remover.shutdown(wait=True)
            self._removals = []
            self._pending = {}


def _local_path(path: Any) -> str:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise CheckpointError(f"AsyncCheckpointIO writes to local (or mounted) file systems only, not {text!r}")
    return os.path.abspath(text.removeprefix("file://"))
