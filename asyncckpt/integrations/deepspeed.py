"""DeepSpeed integration: ``engine.save_checkpoint`` returns once the state is in host buffers.

One line after ``deepspeed.initialize``, on every rank::

    ckpt = asyncckpt.integrations.deepspeed.enable(engine, config="ckpt.yaml")
    engine.save_checkpoint(save_dir, tag, client_state, save_latest=True)   # returns after staging
    ckpt.wait()                                                             # optional: until durable
    engine.load_checkpoint(save_dir)                                        # DeepSpeed's own loader

How DeepSpeed's checkpoint maps onto asyncckpt:

* **One atomic commit per tag.** DeepSpeed calls ``checkpoint_engine.save(state_dict, path)`` once per file
  (``mp_rank_00_model_states.pt``, ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, ...), all inside
  ``<save_dir>/<tag>/``. Each such call becomes one named entry (the file name) of this rank's state; at
  ``commit`` the entries of every rank are staged and saved as ONE asyncckpt checkpoint ``<save_dir>/<tag>``,
  published only after every rank's files are durable.
* **Stub files for DeepSpeed's loader.** DeepSpeed finds its files with ``glob`` and ``os.path.exists``, so once
  the tag is published, the publisher writes one small text stub per entry under DeepSpeed's file name (it
  only says where the data is); ``load(path)`` reads the entry of that name from the asyncckpt checkpoint.
* **``latest`` only after everything is durable.** DeepSpeed writes ``latest`` itself, right after
  ``commit`` returns, without fsync or rename. :func:`enable` therefore wraps ``engine.save_checkpoint`` so
  that DeepSpeed is always called with ``save_latest=False``; this engine replaces ``latest`` atomically
  (temp file, fsync, rename, fsync) after the tag is published on every rank and its stubs are durable. Code
  that calls ``DeepSpeedEngine.save_checkpoint`` around the wrapper with ``save_latest=True`` gets a ``commit``
  that blocks until the tag is durable, so DeepSpeed's own ``latest`` can only name a durable tag.
* DeepSpeed's state holds Python objects (its ``LossScaler``, ``fragment_address`` records, the client
  state), and DeepSpeed's own engine unpickles every file it loads: this engine saves and loads with
  ``allow_pickle`` on. Tensors are never pickled.
* Files written outside ``<save_dir>/<tag>/`` (``save_16bit_model``) are written synchronously with
  ``torch.save`` (temp file, fsync, rename), as DeepSpeed's default engine would. A tag directory written by
  DeepSpeed's default engine (no asyncckpt manifest) loads with ``torch.load``, so runs can switch engines.

Not covered: ``zero_to_fp32.py`` and ZeRO-3 ``load_checkpoint(load_optimizer_states=False)`` read the ``.pt``
files with ``torch.load`` directly (use ``asyncckpt export`` or :func:`load_file`); DeepSpeed's decoupled
writer and NVMe offload copies are DeepSpeed's own mechanisms and are not routed through this engine.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from typing import Any, Mapping

import torch

try:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
except ImportError as exc:  # pragma: no cover - exercised only without deepspeed
    raise ImportError("asyncckpt.integrations.deepspeed needs DeepSpeed: pip install 'asyncckpt[deepspeed]'") from exc

from ..config import Config
from ..durable import fsync_dir, replace_atomic, write_durable
from ..engine import SaveEngine
from ..errors import CheckpointNotFoundError, KeyCollisionError
from ..format import LATEST, MANIFEST, is_checkpoint_file_name
from ..future import SaveFuture, raise_first_unobserved
from ..io_types import SaveResult
from ..loader import CheckpointReader
from ..state import flatten, skeleton_tensor_refs, unflatten
from ..threads import started_pool
from ._common import drain_at_exit

__all__ = ["AsyncCheckpointEngine", "enable", "load_file"]

log = logging.getLogger(__name__)

ENGINE_NAME = "AsyncCheckpointEngine"
STUB_MARK = b"asyncckpt-deepspeed-stub"


def enable(engine: Any, config: Config | Mapping | str | os.PathLike | None = None) -> "AsyncCheckpointEngine":
    """Route ``engine``'s checkpoints through asyncckpt; call on every rank after ``deepspeed.initialize``
    (it joins a dedicated gloo group). Replaces ``engine.checkpoint_engine`` (a previous asyncckpt engine is
    drained and closed) and wraps ``engine.save_checkpoint`` so that ``latest`` moves only after the tag is
    durable on every rank. Returns the engine: ``wait()``, ``close()``, ``last_future``."""
    previous = engine.checkpoint_engine
    ckpt = AsyncCheckpointEngine(config)
    if previous is not None:
        previous.cleanup()  # DeepSpeed's teardown hook: commits a decoupled save; ours drains and closes
    engine.checkpoint_engine = ckpt
    if not getattr(engine.save_checkpoint, "_asyncckpt_wrapped", False):
        engine.save_checkpoint = _wrap_save_checkpoint(engine, engine.save_checkpoint)
    return ckpt


def _wrap_save_checkpoint(engine: Any, original: Any) -> Any:
    @functools.wraps(original)
    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        ckpt = engine.checkpoint_engine
        client_state = {} if client_state is None else client_state
        if not isinstance(ckpt, AsyncCheckpointEngine):
            return original(save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
        ckpt._write_latest = bool(save_latest)
        try:  # DeepSpeed itself never writes `latest` now: this engine does, once the tag is durable
            return original(save_dir, tag, client_state, False, exclude_frozen_parameters)
        finally:
            ckpt._write_latest = None

    save_checkpoint._asyncckpt_wrapped = True
    return save_checkpoint


class AsyncCheckpointEngine(CheckpointEngine):
    """A DeepSpeed ``CheckpointEngine`` that stages every file of a tag at ``commit`` and writes them as one
    asyncckpt checkpoint in the background. Use :func:`enable` to install it."""

    def __init__(self, config: Config | Mapping | str | os.PathLike | None = None):
        super().__init__(None)
        self.name = ENGINE_NAME
        self.config = Config.coerce(config).replace(allow_pickle=True)
        self.saver = SaveEngine(self.config)
        self._finisher = started_pool(1, "asyncckpt-deepspeed")
        self._lock = threading.Lock()
        self._futures: list[SaveFuture] = []
        self._info: Any = None  # the CheckpointCommitInfo of the save being collected
        self._entries: dict[str, Any] = {}  # file name -> the state dict DeepSpeed gave for it
        self._claimed = False  # DeepSpeed asked for the tag directory: this is a checkpoint save
        self._write_latest: bool | None = None  # set by the save_checkpoint wrapper
        self._reader: tuple[tuple, CheckpointReader] | None = None
        self.last_future: SaveFuture | None = None
        self._closed = False
        drain_at_exit(self, "close")

    # ------------------------------------------------------------------------- DeepSpeed's interface
    def create(self, info: Any) -> None:
        self._info, self._entries, self._claimed = info, {}, False

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self._is_tag_dir(path):
            self._claimed = True  # asyncckpt publishes the tag directory itself, by rename
            return
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        if not self._is_tag_dir(os.path.dirname(path)):
            replace_atomic(path, lambda f: torch.save(state_dict, f), self.config.writer.fsync)  # temp, fsync, rename
            return
        name = os.path.basename(path)
        if name in self._entries or is_checkpoint_file_name(name) or name.startswith("."):
            raise KeyCollisionError(f"cannot save {path} as an entry of checkpoint {self._info.tag!r}: "
                                    + ("saved twice" if name in self._entries else
                                       "the name belongs to asyncckpt's own files in the tag directory"))
        self._entries[name] = state_dict

    def commit(self, info: Any) -> bool:
        """Stage this rank's entries and start the background save (collective: every rank calls it)."""
        entries, claimed = self._entries, self._claimed
        self._info, self._entries, self._claimed = None, {}, False
        if not claimed:  # nothing was saved into a tag directory (save_16bit_model): already written
            return True
        deepspeed_writes_latest = bool(info.save_latest)
        write_latest = bool(self._write_latest)

        def collect():  # raised in here, an earlier failure still lets the other ranks skip this save together
            self._raise_failed()
            return flatten(entries, allow_pickle=True)

        fut = self.saver.save(collect, info.save_dir, info.tag, save_latest=False)
        inner = self._finisher.submit(self._finish, fut, info.save_dir, info.tag, write_latest)
        done = SaveFuture(inner, info.tag)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.unobserved_error() is not None]
            self._futures.append(done)
        self.last_future = done
        if deepspeed_writes_latest:  # called around enable()'s wrapper: DeepSpeed writes `latest` next
            done.result()
        return True

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location, _cache=self)

    def preserves_storage_sharing(self) -> bool:
        return False  # no clone before save: staging copies, and shared storages are saved once

    def cleanup(self) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- our interface
    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Block until every save so far is published and its stub files (and ``latest``, if asked) are durable;
        on ranks other than the publisher (rank 0), until it is published. Raises the first unobserved failure."""
        with self._lock:
            pending = list(self._futures)
        done, not_done = concurrent.futures.wait([f._inner for f in pending], timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} DeepSpeed checkpoint save(s) still in flight after {timeout}s")
        self._raise_failed()
        return [f.result() for f in pending if f.exception() is None]

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight saves, then stop the background threads (idempotent). Raises an unobserved failure."""
        if self._closed:
            return
        try:
            self.wait(timeout)
        finally:
            with self._lock:
                in_flight = any(not f.done() for f in self._futures)
            if not in_flight:  # else (timeout) stay open so that the saves in flight finish: call close() again
                self._closed = True
                self._finisher.shutdown(wait=True)
                self._drop_reader()
                self.saver.close()

    # ----------------------------------------------------------------------------------------- helpers
    def _is_tag_dir(self, path: str) -> bool:
        """Whether ``path`` is the directory of the tag being saved (DeepSpeed's files go into it)."""
        info = self._info
        return info is not None and os.path.abspath(path) == os.path.abspath(os.path.join(info.save_dir, str(info.tag)))

    def _raise_failed(self) -> None:
        with self._lock:
            raise_first_unobserved(self._futures)

    def _finish(self, fut: SaveFuture, save_dir: str, tag: str, write_latest: bool) -> SaveResult:
        """After publication: the publisher writes DeepSpeed's stub files, then (if asked) ``latest``."""
        result = fut.result()
        if result.skipped or not self.saver.coordinator.is_publisher:
            return result
        fsync = self.config.writer.fsync
        tag_dir = os.path.join(save_dir, tag)
        with CheckpointReader(save_dir, tag) as reader:
            indices = reader.indices
        for rank, doc in sorted(indices.items()):
            skeleton = doc.get("skeleton")
            for name in skeleton if isinstance(skeleton, dict) else ():
                stub = (f"{STUB_MARK.decode()}\nThe DeepSpeed file {name!r} (rank {rank}) is an entry of the "
                        f"asyncckpt checkpoint in this directory. Load it through a DeepSpeed engine after "
                        f"asyncckpt.integrations.deepspeed.enable(engine), or with "
                        f"asyncckpt.integrations.deepspeed.load_file(path).\n")
                write_durable(os.path.join(tag_dir, name), stub.encode(), fsync)
        if fsync:
            fsync_dir(tag_dir)
        if write_latest:
            replace_atomic(os.path.join(save_dir, LATEST), (tag + "\n").encode(), fsync)
        return result

    def _open(self, tag_dir: str) -> CheckpointReader:
        st = os.stat(tag_dir)
        key = (os.path.abspath(tag_dir), st.st_dev, st.st_ino)  # an overwritten tag is a new directory
        if self._reader is None or self._reader[0] != key:
            self._drop_reader()
            self._reader = (key, _reader(tag_dir))
        return self._reader[1]

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None


def _reader(tag_dir: str) -> CheckpointReader:
    return CheckpointReader(os.path.dirname(tag_dir), os.path.basename(tag_dir))


def load_file(path: str | os.PathLike, map_location: Any = None, *, _cache: AsyncCheckpointEngine | None = None) -> Any:
    """What ``torch.load`` returned for DeepSpeed's file ``path`` (``<save_dir>/<tag>/<name>``): the entry
    ``<name>`` of the asyncckpt checkpoint ``<save_dir>/<tag>``, read without the other entries. A tag
    directory without an asyncckpt manifest (DeepSpeed's default engine wrote it) is read with ``torch.load``.
    ``map_location`` as for ``torch.load``; a callable (DeepSpeed passes ``lambda storage, loc: storage``)
    keeps every tensor on the device it was saved from."""
    path = os.path.abspath(os.fspath(path))
    tag_dir, name = os.path.split(path)
    if not os.path.lexists(os.path.join(tag_dir, MANIFEST)):
        return torch.load(path, map_location=map_location, weights_only=False)
    verify = _cache is None or _cache.config.verify_on_load
    if _cache is not None:  # the engine keeps its reader open across the files of one load
        return _load_entry(_cache._open(tag_dir), path, name, map_location, verify)
    with _reader(tag_dir) as reader:
        return _load_entry(reader, path, name, map_location, verify)


def _load_entry(reader: CheckpointReader, path: str, name: str, map_location: Any, verify: bool) -> Any:
    tag_dir = reader.path
    for rank, doc in sorted(reader.indices.items()):
        skeleton = doc.get("skeleton")
        if isinstance(skeleton, dict) and name in skeleton:
            break
    else:
        raise CheckpointNotFoundError(f"{path}: the asyncckpt checkpoint {tag_dir} holds no DeepSpeed file "
                                      f"{name!r}; it holds: {', '.join(_entry_names(reader)) or 'none'}")
    node = skeleton[name]
    where = f"{path} (rank {rank})"
    unflatten(node, {}, where=where, check_only=True)  # every node well-formed before any data is read
    keys = list(skeleton_tensor_refs(node, where=where))
    location = None if callable(map_location) else map_location
    tensors = reader.read_tensors(keys, rank=rank, map_location=location, verify=verify)
    return unflatten(node, tensors, allow_pickle=True, where=where)


def _entry_names(reader: CheckpointReader) -> list[str]:
    names = []
    for _, doc in sorted(reader.indices.items()):
        skeleton = doc.get("skeleton")
        names += sorted(skeleton) if isinstance(skeleton, dict) else []
    return names
