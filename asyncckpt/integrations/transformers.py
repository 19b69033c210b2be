"""Asynchronous Hugging Face ``Trainer`` checkpoints.

>>> trainer = AsyncTrainer(model=model, args=args, train_dataset=ds, asyncckpt_config="ckpt.yaml")
>>> trainer.train()                                   # checkpoint-N/ written in the background
>>> trainer.train(resume_from_checkpoint=True)        # resumes from the newest complete checkpoint-N/

(or mix :class:`AsyncCheckpointMixin` into your own ``Trainer`` subclass, before ``Trainer``).

Each ``checkpoint-N/`` holds ``trainer_state.json`` (Hugging Face's own file) and ``asyncckpt/``, an asyncckpt
checkpoint of the model, optimizer, LR scheduler, grad scaler and RNG states. The save stages the state into
host buffers and returns; the data is written into the hidden ``.checkpoint-N.incomplete/``, and only once it
is durable on every rank does rank 0 add ``trainer_state.json`` and rename the directory to ``checkpoint-N``.
So ``get_last_checkpoint`` (``resume_from_checkpoint=True``) and ``save_total_limit`` only ever see complete
checkpoints, and a crash leaves the previous one loadable.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import threading
from typing import Any, Mapping

from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from ..checkpointer import rng_state, set_rng_state
from ..config import Config
from ..durable import exchange, fsync_dir, remove_tree, write_durable
from ..engine import SaveEngine
from ..errors import UnsupportedStateError
from ..format import MANIFEST
from ..loader import load
from ..state import FlattenCache, flatten
from ..threads import started_pool
from ._common import framework_config

log = logging.getLogger(__name__)

__all__ = ["AsyncCheckpointMixin", "AsyncTrainer", "ASYNCCKPT_TAG"]

ASYNCCKPT_TAG = "asyncckpt"  # checkpoint-N/asyncckpt/: the asyncckpt checkpoint inside a Trainer checkpoint
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_LEFTOVER_RE = re.compile(rf"^\.({PREFIX_CHECKPOINT_DIR}-\d+)\.(incomplete|replaced|removed)$")
_REPLICATED = ("model/", "optimizer/", "lr_scheduler/", "scaler/")


def _is_replicated(path: str) -> bool:
    """Data parallel: the model, optimizer, scheduler and scaler state is the same on every rank."""
    return path.startswith(_REPLICATED)


class AsyncCheckpointMixin:
    """Makes a ``transformers.Trainer`` write its checkpoints asynchronously with asyncckpt.

    ``asyncckpt_config`` (keyword): an :class:`asyncckpt.Config`, a mapping, a YAML path or None.
    ``save_total_limit`` is honoured after each checkpoint is complete (``keep_last`` must stay 0). A save
    that failed in the background is raised by the next save or at the end of ``train()``, which drains every
    checkpoint in flight. Supported: one process or DDP (every rank writes its share of the replicated state
    and its own RNG state; ``train()`` returns on every rank once rank 0 has renamed the last checkpoint);
    DeepSpeed and FSDP runs are refused (use their own checkpointing)."""

    def __init__(self, *args: Any, asyncckpt_config: Config | Mapping | str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.asyncckpt_config = framework_config(asyncckpt_config, "the Trainer integration",
                                                 "TrainingArguments(save_total_limit=...)")
        self._ack_engine: SaveEngine | None = None
        self._ack_finalizer: concurrent.futures.ThreadPoolExecutor | None = None
        self._ack_finals: list[concurrent.futures.Future] = []
        self._ack_cleaned: set[str] = set()
        self._ack_loaded: tuple[str, Any] | None = None
        self._ack_flatten_cache = FlattenCache()  # an unchanged state is matched, not walked, every save

    # --------------------------------------------------------------------------------------------- save
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise UnsupportedStateError("AsyncTrainer does not checkpoint DeepSpeed or FSDP runs; use "
                                        "asyncckpt.integrations.deepspeed or the framework's own checkpointing")
        self._ack_raise_finalize_error()
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, f".{name}.incomplete")
        best_step = getattr(self.state, "best_global_step", None)
        if best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best == final or os.path.exists(best):  # the one being saved now appears only once complete
                self.state.best_model_checkpoint = best
        trainer_state = None
        if self.args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    stored = self.state.stateful_callbacks[cb.__class__.__name__]
                    if isinstance(stored, list):
                        stored.append(cb.state())
                    else:
                        self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            trainer_state = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
            if run_dir not in self._ack_cleaned:
                self._ack_cleaned.add(run_dir)
                _clean_leftovers(run_dir)
        state: dict[str, Any] = {"model": self.model.state_dict()}
        if not self.args.save_only_model:
            state["optimizer"] = self.optimizer.state_dict()
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            state["rng"] = rng_state()
        replicated = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        flat = flatten(state, allow_pickle=self.asyncckpt_config.allow_pickle,
                       replicated=_is_replicated if replicated else None, cache=self._ack_flatten_cache)
        fut = self._ack_get_engine().save(flat, staging, ASYNCCKPT_TAG, save_latest=False)
        finished = threading.Event()
        fut.add_done_callback(lambda _: finished.set())
        self._ack_finals.append(self._ack_finalizer.submit(
            self._ack_finalize, finished, staging, final, trainer_state, run_dir))

    def _ack_get_engine(self) -> SaveEngine:
        if self._ack_engine is None:
            self._ack_engine = SaveEngine(self.asyncckpt_config)  # with DDP: every rank, collectively
            self._ack_finalizer = started_pool(1, "asyncckpt-hf-finalize")
        return self._ack_engine

    def _ack_finalize(self, finished: threading.Event, staging: str, final: str, trainer_state: str | None,
                      run_dir: str) -> None:
        """Background, in save order: once the asyncckpt checkpoint is published (durable on every rank), add
        trainer_state.json and rename the directory to checkpoint-N, then apply save_total_limit. A failed save
        leaves its hidden directory behind (removed by the next run's first save); the engine raises its error."""
        finished.wait()
        if trainer_state is None:  # not the saving rank
            return
        if not os.path.isfile(os.path.join(staging, ASYNCCKPT_TAG, MANIFEST)):
            remove_tree(staging)
            return
        fsync = self.asyncckpt_config.writer.fsync
        write_durable(os.path.join(staging, TRAINER_STATE_NAME), trainer_state.encode(), fsync)
        if fsync:
            fsync_dir(staging)
        old = None
        if os.path.lexists(final):  # saved again at the same step (e.g. after resuming from it)
            if exchange(staging, final):
                old = staging
            else:
                old = os.path.join(run_dir, f".{os.path.basename(final)}.replaced")
                os.rename(final, old)
        if old != staging:
            os.rename(staging, final)
        if fsync:
            fsync_dir(run_dir)
        if old is not None:
            remove_tree(old)
        self._ack_rotate(run_dir)

    def _ack_rotate(self, run_dir: str) -> None:
        """save_total_limit over the complete checkpoints: the newest and the best are always kept."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        steps = sorted((int(m.group(1)), n) for n in os.listdir(run_dir)
                       if (m := _CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(run_dir, n)))
        names = [n for _, n in steps]
        best = self.state.best_model_checkpoint
        protected = {names[-1]} if names else set()
        if best is not None and os.path.dirname(os.path.abspath(best)) == os.path.abspath(run_dir):
            protected.add(os.path.basename(best))
        excess = len(names) - max(limit, len(protected))
        for n in names:
            if excess <= 0:
                break
            if n in protected:
                continue
            doomed = os.path.join(run_dir, f".{n}.removed")
            os.rename(os.path.join(run_dir, n), doomed)  # gone in one step; its bytes afterwards
            remove_tree(doomed)
            excess -= 1

    def _ack_raise_finalize_error(self) -> None:
        for f in self._ack_finals:
            if f.done() and f.exception() is not None:
                self._ack_finals.remove(f)
                raise f.exception()
        self._ack_finals = [f for f in self._ack_finals if not f.done()]

    def wait_for_checkpoints(self, timeout: float | None = None, *, close: bool = False) -> None:
        """Block until every checkpoint saved so far is complete (``checkpoint-N`` visible); raise the first
        background failure. ``close``: also stop the background threads (``train()`` does at its end). With
        DDP, call it on every rank: rank 0 renames the directories, so every rank waits for rank 0 before it
        returns (else another rank could look for ``checkpoint-N`` before it exists)."""
        self._ack_drain(timeout, close=close, sync=True)

    def _ack_drain(self, timeout: float | None, *, close: bool, sync: bool) -> None:
        if self._ack_engine is None:
            return
        try:
            if close:
                self._ack_engine.close(timeout)
            else:
                self._ack_engine.wait(timeout)
        finally:
            concurrent.futures.wait(self._ack_finals, timeout)
            if close and self._ack_engine._closed:
                self._ack_finalizer.shutdown(wait=True)
                self._ack_engine = self._ack_finalizer = None
        if sync and self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            self.accelerator.wait_for_everyone()  # rank 0's renames are done; its own failure is raised below
        self._ack_raise_finalize_error()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            output = super().train(*args, **kwargs)
        except BaseException:
            try:  # finish what was staged; do not hide the training error behind a background one
                self._ack_drain(None, close=True, sync=False)  # the other ranks may not be here: no barrier
            except Exception as bg:  # noqa: BLE001
                log.error("while draining checkpoints after an error: %s", bg)
            raise
        finally:
            self._ack_loaded = None
        self.wait_for_checkpoints(close=True)
        return output

    # --------------------------------------------------------------------------------------------- load
    def _ack_state(self, checkpoint: str | None) -> Any:
        """The asyncckpt state of ``checkpoint`` (loaded once per resume), or None for a native checkpoint."""
        if checkpoint is None or not os.path.isdir(os.path.join(checkpoint, ASYNCCKPT_TAG)):
            return None
        if self._ack_loaded is None or self._ack_loaded[0] != checkpoint:
            self._ack_loaded = (checkpoint, self._ack_read(checkpoint))
        return self._ack_loaded[1]

    def _ack_read(self, checkpoint: str) -> Any:
        """This rank's state of the asyncckpt checkpoint inside ``checkpoint`` (a ``checkpoint-N`` directory)."""
        return load(checkpoint, ASYNCCKPT_TAG, map_location="cpu", verify=self.asyncckpt_config.verify_on_load,
                    allow_pickle=self.asyncckpt_config.allow_pickle)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        state = self._ack_state(resume_from_checkpoint)
        if state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        (model if model is not None else self.model).load_state_dict(state["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = self._ack_state(checkpoint)
        if state is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        state = self._ack_state(checkpoint)
        if state is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if "scaler" in state and scaler is not None:
            scaler.load_state_dict(state["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        state = self._ack_state(checkpoint)
        if state is None:
            return super()._load_rng_state(checkpoint)
        if "rng" in state:
            set_rng_state(state["rng"])

    def _load_best_model(self) -> None:
        self.wait_for_checkpoints()  # the best checkpoint may still be in flight
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isdir(os.path.join(best, ASYNCCKPT_TAG)):
            return super()._load_best_model()
        self.model.load_state_dict(self._ack_read(best)["model"])


class AsyncTrainer(AsyncCheckpointMixin, Trainer):
    """``transformers.Trainer`` with asynchronous asyncckpt checkpoints (see :class:`AsyncCheckpointMixin`)."""


def _clean_leftovers(run_dir: str) -> None:
    """Before a run's first save: put back a checkpoint whose replacement was cut short, and remove the hidden
    directories of saves and removals that a crash interrupted."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return
    for n in names:
        m = _LEFTOVER_RE.match(n)
        if m is None:
            continue
        path, original = os.path.join(run_dir, n), os.path.join(run_dir, m.group(1))
        if m.group(2) == "replaced" and not os.path.lexists(original):
            log.warning("restoring %s from %s (its replacement did not finish)", original, path)
            os.rename(path, original)
        else:
            log.warning("removing %s (a save or removal that did not finish)", path)
            remove_tree(path)
