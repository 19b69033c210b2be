"""The save engine: from staged state to a published checkpoint.

The training thread calls :meth:`SaveEngine.save`: it takes a staging slot (backpressure per ``on_busy``),
copies the tensors into it, hands a :class:`SaveJob` to the engine's event loop thread and returns a
:class:`SaveFuture`. On that loop, jobs run one after another in submission order (so every rank issues its
coordination collectives in the same order): wait for the copy → prepare (coordinator) → write files (writer
pool) → commit (coordinator) → release the slot → resolve the future. A save staged through a ring (bounded
host memory, or a device snapshot draining to the host; see :mod:`asyncckpt.staging`) is submitted before its
waves are staged: the writer frees the ring's segments as it writes them.

Saves accepted before the interpreter exits are finished first (see :func:`_drain_at_exit`): a script that
saves and then simply ends must not lose its last checkpoint.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from typing import Callable

import torch

from .codec import ChunkCodec
from .commit import CommitCoordinator, DistContext, orphan_reason, raise_for_rank
from .config import Config
from .commit import BUSY
from .errors import CheckpointError, CommitError, ConfigError, SaverBusyError, TagExistsError
from .format import MANIFEST, checksum, validate_tag
from .future import SaveFuture, raise_first_unobserved
from .io_types import FlatState, RankOutcome, SaveJob, SaveResult, StageItem
from .placement import ReplicatedSplit, fingerprint
from .service.client import ServiceClient
from .packing import alone_items
from .staging import DEVICE_RING_BYTES, LazyStaging, Ring, Slot, Snapshot, StagingPool, ready_now, ring_shape
from .storage import MARKER, Storage, is_url, open_storage
from .writer import WriterPool, lower_thread_priority
from .threads import EventLoopThread, at_shutdown, started_pool

log = logging.getLogger(__name__)


class SaveEngine:
    """Owns the staging pool, the event loop thread that runs the saves, the writer pool and the commit
    coordinator of one saver."""

    def __init__(self, config: Config, ctx: DistContext | None = None):
        self.config = config
        self.ctx = ctx if ctx is not None else DistContext.create(config.commit_timeout_s)
        cuda = torch.cuda.is_available()
        if config.pin_memory == "always" and not cuda:
            raise ConfigError("config key 'pin_memory': 'always' needs CUDA, which is not available here; use auto")
        pin = config.pin_memory == "always" or (config.pin_memory == "auto" and cuda)
        w = config.writer
        if config.snapshot_device == "always" and w.mode == "service":
            raise ConfigError("config key 'snapshot_device': 'always' is not supported with writer.mode service "
                              "(the writer service reads full-size shared staging buffers); use auto or never")
        local = self.ctx.local_world_size
        # writer.mode service: a per-node process writes and publishes (asyncckpt/service); staging is shared memory
        self.service = ServiceClient(config, self.ctx) if w.mode == "service" else None
        self.pool = StagingPool(config.max_inflight, pin=pin,
                                budget_bytes=w.memory_budget_bytes // local if w.memory_budget_bytes else 0,
                                allocate=self.service.allocate if self.service else None,
                                chunk_bytes=0 if self.service else config.codec.chunk_bytes)  # no ring in service mode
        # thread mode: this process encodes and writes (its share of the node's thread budget); service mode:
        # the service does, and the training process runs no writer threads
        self.writer = None if self.service else WriterPool(
            ChunkCodec.from_config(config.codec), threads=max(1, w.node_threads // local),
            chunk_bytes=config.codec.chunk_bytes, files_per_rank=w.files_per_rank, inflight_chunks=w.inflight_chunks,
            fsync=w.fsync, nice=w.nice, ionice_idle=w.ionice_idle)
        self.coordinator = CommitCoordinator(
            self.ctx, tag_validation=config.tag_validation, node_local=config.use_node_local_storage,
            overwrite=config.overwrite, fsync=w.fsync, keep_last=config.keep_last, timeout_s=config.commit_timeout_s,
            save_deadline_s=config.save_deadline_s, storage_for=self.storage_for)
        lower = (lambda: lower_thread_priority(w.nice, w.ionice_idle))
        self._commit_thread = started_pool(1, "asyncckpt-commit", initializer=lower)
        self._retain_thread = None if self.service else started_pool(1, "asyncckpt-retain", initializer=lower)
        self.loop = EventLoopThread("asyncckpt", initializer=lower)  # runs every save's pipeline, in order
        self._order = self.loop.submit(_make_lock()).result()
        self._futures: list[SaveFuture] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a forked child inherits this object but none of its threads
        self.saves = 0
        self._split = ReplicatedSplit()  # the replicated tensors this rank writes, per layout
        self._check_slots: dict[int, Slot] = {}  # verify_replicated: the tensors others write, per staging slot
        _live_engines.add(self)

    # ------------------------------------------------------------------------------------- training side
    def save(self, flat: FlatState | Callable[[], FlatState], save_dir: str | os.PathLike, tag: str, *,
             save_latest: bool = True, manifest_extra: dict | None = None, t0: float | None = None,
             pinned: frozenset[str] = frozenset(), lazy: LazyStaging | None = None) -> SaveFuture:
        """Stage and submit one save. ``flat`` may be a callable, so that an error while collecting the state
        is handled like any other error of this call: with several ranks, a rank that cannot take part in a
        save (error, or no free slot with on_busy skip/error) still submits a placeholder, so every rank
        issues the same coordination collectives and the others skip or fail that save together. This holds
        for any exception, KeyboardInterrupt included: the staging slot is released before it propagates.

        ``save_dir`` is resolved to an absolute path now (a later ``os.chdir`` does not move the save).
        ``t0`` (``time.perf_counter()``) is when the caller's public call began: the reported stall counts
        from there. ``pinned``: key paths of replicated tensors that one rank writes for all (see
        :meth:`_own_share`). ``lazy``: copy in the background (see :class:`LazyStaging`); the caller settles
        ``lazy.snapshot`` before it mutates the state."""
        t0 = time.perf_counter() if t0 is None else t0
        if self._closed:
            raise CheckpointError("this saver is closed")
        save_dir = os.fspath(save_dir)
        save_dir = self.storage_for(save_dir).abspath(save_dir)
        try:
            self.raise_unobserved()
            tag = validate_tag(tag)
            if not self.config.overwrite and self._exists(save_dir, tag):
                raise TagExistsError(f"checkpoint tag {tag!r} already exists in {save_dir}; choose another tag or "
                                     "set overwrite: true")
            flat = flat() if callable(flat) else flat
            flat, replicated_fp, checked = self._own_share(flat, pinned)
            written = {id(i) for i in flat.items}
            nbytes = flat.nbytes + sum(i.nbytes for i in checked if id(i) not in written)
            self.pool.check_budget(nbytes)
            waves = self.pool.ring_for(nbytes)
            if waves is not None and checked:
                raise SaverBusyError(
                    f"staging {nbytes} bytes exceeds writer.memory_budget_mib, and verify_replicated needs the "
                    "whole state staged at once: raise the budget or turn verify_replicated off")
            slot = self.pool.acquire(self.config.on_busy, timeout=self.config.slot_wait_s)
        except BaseException as exc:
            self._placeholder(save_dir, tag, _exc_text(exc))
            raise
        if slot is None:
            log.info("skipping checkpoint %r: %d save(s) already in flight (on_busy=skip)", tag, len(self.pool.slots))
            placeholder = self._placeholder(save_dir, tag, BUSY)
            return placeholder or SaveFuture.completed(self._skipped(tag))
        ring = None
        try:
            t_stage = time.perf_counter()
            snapshot = None
            device = self._device_snapshot(slot, flat, lazy, bool(checked))
            if device is not None:  # copied on the device now, drained through the slot's ring
                ring, snapshot = self._start_device_ring(slot, flat, lazy, *device)
                ready = ready_now
            elif waves is not None:  # waves through the slot's ring; the writer waits segment by segment
                ring = self._start_ring(slot, flat, waves, lazy)
                snapshot = None if lazy is None else lazy.start_ring(ring)
                ready = ready_now
            elif lazy is None:
                ready = slot.stage(flat.items)
            else:
                snapshot = lazy.start(slot, flat)
                ready = snapshot.complete
            checks = self._stage_checks(slot, flat, checked)
            stage_s = time.perf_counter() - t_stage
            job = SaveJob(save_dir, tag, save_latest, flat, slot, ready, dict(manifest_extra or {}), t0)
            job.replicated_fp = replicated_fp
            job.staging_bytes = ring.nbytes if ring is not None else slot.capacity + self._check_bytes(slot, checks)
        except BaseException as exc:
            slot.ring = None
            self.pool.release(slot)
            self._placeholder(save_dir, tag, _exc_text(exc))
            raise
        fut = self._submit(job, stage_s, checks, snapshot)
        try:
            if device is not None:  # the drain runs in the copy thread
                self.pool.copy_thread().submit(ring.stage)
            elif ring is not None:  # after the submission: the writer frees the ring's slots as it goes
                self._stage_waves(ring, lazy is not None)
        finally:
            job.stall_s = time.perf_counter() - t0  # everything the caller waited for, the hand-off included
            job.returned.set()
        return fut

    def device_ring(self, nbytes: int) -> tuple[int, int] | None:
        """``(K, S)``: the host ring a device snapshot of ``nbytes`` drains through (at most
        ``DEVICE_RING_BYTES`` per slot, within the budget, no larger than the state needs); None when
        ``snapshot_device`` is never or the budget holds no ring."""
        if self.config.snapshot_device == "never" or self.service is not None:
            return None
        chunk = self.config.codec.chunk_bytes
        per_slot = self.pool.budget_bytes // len(self.pool.slots) if self.pool.budget_bytes else DEVICE_RING_BYTES
        k, seg = ring_shape(min(per_slot, DEVICE_RING_BYTES, max(2 * chunk, -(-nbytes // chunk) * chunk)), chunk)
        return (k, seg) if k else None

    def _device_snapshot(self, slot: Slot, flat: FlatState, lazy: LazyStaging | None, checked: bool):
        """``snapshot_device``: ``(device, ring layout, (K, S))`` when this save is snapshotted on the device
        (the state's CUDA device has room for a flat copy of it beyond ``snapshot_device_headroom_mib``, or the
        slot's device buffer already holds one), else None; ``always`` refuses a save that cannot be."""
        mode = self.config.snapshot_device
        if mode == "never" or self.service is not None:
            return None
        memory = self.pool.device_memory
        device = memory.device_of(flat.items)
        why = ""
        if device is None:
            why = "the state has no CUDA tensor, or its CUDA tensors are on several devices"
        elif checked:
            why = "verify_replicated checksums the staged state on the host"
        else:
            k, seg = self.device_ring(flat.nbytes) or (0, 0)
            if not k:
                why = "writer.memory_budget_mib cannot hold a ring of two chunks per slot"
            else:
                priority = None if lazy is None else lazy.priority(flat.items)
                layout = slot.ring_layout(flat.items, alone_items(flat), self.config.codec.chunk_bytes, seg, priority,
                                          whole=True)
                held = slot.device_bytes(device)
                free = memory.free_bytes(device) + held - int(self.config.snapshot_device_headroom_mib * (1 << 20))
                if layout.total <= held or layout.total <= free:
                    return device, layout, (k, seg)
                why = (f"a snapshot of {layout.total} bytes does not fit the {max(0, free)} bytes free on {device} "
                       f"beyond snapshot_device_headroom_mib={self.config.snapshot_device_headroom_mib:g}")
        if mode == "always":
            raise ConfigError(f"config key 'snapshot_device': 'always' cannot snapshot this save on the device: {why}")
        return None

    def _start_device_ring(self, slot: Slot, flat: FlatState, lazy: LazyStaging | None, device, layout,
                           shape: tuple[int, int]) -> tuple[Ring, Snapshot | None]:
        """Copy the state into the slot's device buffer (eager: the training stream waits for the copy; lazy:
        the hooks settle it) and return the ring that drains it to the host, segment by segment."""
        buf, dsts = slot.device_views(flat.items, layout, device, self.pool.device_memory)
        snapshot = None
        if lazy is None:
            slot.stage(flat.items, dsts)
        else:
            snapshot = lazy.start(slot, flat, dsts)
        start = self.pool.device_memory.after_copies(device)
        k, seg = shape
        slot.ring = Ring(layout, slot.ring_slots(k, seg), flat.items, self.pool.copier, self.config.commit_timeout_s,
                         source=buf, start=start)
        return slot.ring, snapshot

    def _start_ring(self, slot: Slot, flat: FlatState, shape: tuple[int, int], lazy: LazyStaging | None) -> Ring:
        """The ring of one save in ``slot`` (see :class:`~asyncckpt.staging.Ring`): a lazy save places the
        state no hook guards first, then module buffers, then the rest."""
        k, seg = shape
        priority = None if lazy is None else lazy.priority(flat.items)
        layout = slot.ring_layout(flat.items, alone_items(flat), self.config.codec.chunk_bytes, seg, priority)
        start = {}
        for item in flat.items:  # CUDA: the copies of every wave read the values of the call
            if item.src.device.type == "cuda" and item.src.device.index not in start:
                dev = item.src.device.index or 0
                with torch.cuda.device(dev):
                    start[dev] = torch.cuda.Event()
                    start[dev].record(torch.cuda.current_stream())
        slot.ring = Ring(layout, slot.ring_slots(k, seg), flat.items, self.pool.copier, self.config.commit_timeout_s,
                         start=start)
        return slot.ring

    def _stage_waves(self, ring: Ring, lazy: bool) -> None:
        """Eager: stage every wave before returning (each waits for the writer to free a ring slot; bounded
        memory costs stall), then the training stream waits for the last copies. Lazy: stage the waves of the
        state no hook guards now, the rest in the copy thread (the hooks wait for the last wave)."""
        if not lazy:
            ring.stage()
            for dev, event in ring.last_events():
                with torch.cuda.device(dev):
                    torch.cuda.current_stream().wait_event(event)
            return
        ring.stage(ring.layout.eager_segments)
        self.pool.copy_thread().submit(ring.stage)

    def _check_bytes(self, slot: Slot, checks) -> int:
        """Host bytes of the buffer paired with ``slot`` for verify_replicated's checks (0 without checks)."""
        return 0 if checks is None else self._check_slots[slot.index].capacity

    def _submit(self, job: SaveJob, stage_s: float, checks: Callable[[], dict] | None = None,
                snapshot: Snapshot | None = None) -> SaveFuture:
        job.seq = self.saves  # the k-th save of every rank's saver is paired with the k-th of the others
        if self.service is not None:  # handed over to the node's writer service
            fut = SaveFuture(self.service.submit(job, stage_s, self._spec(job), self.pool.release, checks, snapshot),
                             job.tag)
        else:
            fut = SaveFuture(self.loop.submit(self._run(job, stage_s, checks, snapshot)), job.tag)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.unobserved_error() is not None]
            self._futures.append(fut)
        self.saves += 1
        return fut

    def _placeholder(self, save_dir: str, tag: str, reason: str) -> SaveFuture | None:
        """With several ranks, stand in for a save this rank cannot make (see :meth:`save`)."""
        if not self.ctx.distributed or self._closed:
            return None
        job = SaveJob(save_dir, tag, False, FlatState(None, []), None, ready_now, {}, time.perf_counter(), reason=reason)
        job.returned.set()
        fut = self._submit(job, 0.0)
        if reason != BUSY:
            fut.observed = True  # this rank raises the error itself, right now
        return fut

    def _spec(self, job: SaveJob) -> dict | None:
        """What every rank must agree on for one save besides its tag (compared at prepare): a placeholder has
        none (its status already skips or fails the save)."""
        if job.slot is None:
            return None
        save_dir = job.save_dir if is_url(job.save_dir) else os.path.realpath(job.save_dir)
        return {"sequence": job.seq, "save_dir": save_dir, "save_latest": job.save_latest,
                "overwrite": self.config.overwrite, "keep_last": self.config.keep_last,
                "codec": repr(self.config.codec), "verify_replicated": self.config.verify_replicated,
                **{f"manifest {k}": v for k, v in job.meta.items()}}

    def storage_for(self, save_dir: str) -> Storage:
        """The storage of ``save_dir`` (by its URL scheme; the config's ``storage`` group for object stores)."""
        if is_url(save_dir) and self.config.use_node_local_storage:  # before its fsspec package is imported
            raise ConfigError(f"config key 'use_node_local_storage': true needs a local save_dir, not {save_dir!r} "
                              "(an object store is one shared place)")
        return open_storage(save_dir, self.config.storage.fsspec_options())

    def _exists(self, save_dir: str, tag: str) -> bool:
        """``tag`` is published in ``save_dir`` (POSIX: unless it is an orphan a replayed run replaces)."""
        st = self.storage_for(save_dir)
        if st.strategy == MARKER:
            return st.exists(st.join(save_dir, tag, MANIFEST))
        return os.path.lexists(os.path.join(save_dir, tag)) and not self._orphan(save_dir, tag)

    def _orphan(self, save_dir: str, tag: str) -> bool:
        reason = orphan_reason(save_dir, tag)
        if reason:
            log.warning("%s", reason)
        return bool(reason)

    def _skipped(self, tag: str) -> SaveResult:
        return SaveResult(tag, None, skipped=True, rank=self.ctx.rank, world_size=self.ctx.world_size)

    def _own_share(self, flat: FlatState, pinned: frozenset[str]) -> tuple[FlatState, str, list[StageItem]]:
        """Keep this rank's own tensors and its share of the replicated ones (about 1/N of their bytes). The
        replicated tensors named in ``pinned`` (or a storage one of them is a view of) are written by the first
        rank of the copy scope: state that ranks may change locally (module buffers) is saved as one rank had
        it, never as a patchwork of several ranks' values. Also returns, with ``verify_replicated``, every
        replicated tensor that is not pinned: each rank's copy is checksummed and compared at commit."""
        replicated = [i for i in flat.items if i.replicated]
        if not replicated:
            return flat, "", []
        pinned_keys = pinned | {v.base for v in flat.views if v.key in pinned}
        first = {n for n, i in enumerate(replicated) if i.key in pinned_keys}
        fp = fingerprint([(i.key + ("\0pinned" if n in first else ""), i.nbytes) for n, i in enumerate(replicated)])
        if not self.ctx.distributed:
            return flat, fp, []
        position, size = self.coordinator.copy_scope()
        owned = self._split.owned(fp, [i.nbytes for i in replicated], size, first, position)
        mine = {id(replicated[n]) for n in owned}
        items = [i for i in flat.items if not i.replicated or id(i) in mine]
        elsewhere = frozenset(i.key for i in replicated if id(i) not in mine)  # written by the other ranks
        checked = [i for i in replicated if i.key not in pinned_keys] if self.config.verify_replicated else []
        return FlatState(flat.skeleton, items, flat.views, elsewhere=elsewhere), fp, checked

    def _stage_checks(self, slot: Slot, flat: FlatState, checked: list[StageItem]) -> Callable[[], dict] | None:
        """``verify_replicated``: stage the replicated tensors other ranks write (into a buffer paired with
        ``slot``: the training thread may change them once save() returns) and return the job that checksums
        this rank's copy of every tensor in ``checked``, run in the background; None when nothing is checked."""
        if not checked:
            return None
        written = {id(item): n for n, item in enumerate(flat.items)}
        extras = {id(i): n for n, i in enumerate(i for i in checked if id(i) not in written)}
        pair = self._check_slots.setdefault(slot.index, Slot(slot.index, slot.pin))
        ready = pair.stage([i for i in checked if id(i) in extras])
        where = [(slot, written[id(i)]) if id(i) in written else (pair, extras[id(i)]) for i in checked]

        def checksums() -> dict[str, str]:
            ready()
            return {item.key: checksum(s.array(s.layout.offsets[n], s.layout.sizes[n]))
                    for item, (s, n) in zip(checked, where)}

        return checksums

    def coordinated(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the commit thread after every save submitted so far (so that collectives over the
        saver's group keep one order on every rank) and return its result. Called collectively."""
        if self._closed:
            raise CheckpointError("this saver is closed")
        async def run():
            async with self._order:
                return await asyncio.get_running_loop().run_in_executor(self._commit_thread, fn, *args)

        return self.loop.submit(run()).result()

    def raise_unobserved(self) -> None:
        """Raise the oldest background failure nobody has looked at yet."""
        with self._lock:
            raise_first_unobserved(self._futures)

    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Block until every save submitted so far is finished; raise the first unobserved failure."""
        with self._lock:
            pending = list(self._futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        done, not_done = concurrent.futures.wait(
            [f._inner for f in pending], timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not_done:
            raise TimeoutError(f"{len(not_done)} checkpoint save(s) still in flight after {timeout}s")
        self.raise_unobserved()
        return [f.result() for f in pending if f.exception() is None]

    def in_flight(self) -> int:
        """How many submitted saves have not resolved yet."""
        with self._lock:
            return sum(not f.done() for f in self._futures)

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight saves, then stop the background threads. Raises an unobserved failure. When
        ``timeout`` expires first, raises TimeoutError and stays open, so that the saves still in flight finish
        (stopping the event loop under them would leave their futures pending forever): call close() again.
        At interpreter exit a saver nobody closed is closed with ``timeout=commit_timeout_s``."""
        if self._closed:
            return
        try:
            self.wait(timeout)
        finally:
            if not self.in_flight():
                self._closed = True
                _live_engines.discard(self)
                self._commit_thread.shutdown(wait=True)
                self.loop.close()
                if self.service is None:
                    self._retain_thread.shutdown(wait=True)
                    self.writer.close()
                if self.service is not None:
                    self.service.close()
                self.coordinator.close()
                self.pool.close()
                self._check_slots.clear()

    def _close_at_exit(self, deadline: float) -> None:
        """Finish what was accepted, until ``deadline`` (``time.monotonic()``); log what failed or did not
        finish (at exit there is nobody left to raise to)."""
        try:
            self.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.error("%d checkpoint save(s) did not finish within commit_timeout_s=%gs; exiting without them "
                      "(their partial directories are removed by the next save to the same directory)",
                      self.in_flight(), self.config.commit_timeout_s)
            return
        except Exception as exc:  # noqa: BLE001 - the first unobserved failure; the loop below logs the rest
            log.error("checkpoint save failed before exit: %s", exc)
        with self._lock:
            failed = [(f, f.unobserved_error()) for f in self._futures]
        for f, exc in failed:
            if exc is not None:
                f.observed = True
                log.error("checkpoint save failed before exit: %s", exc)
        self.close(timeout=max(0.0, deadline - time.monotonic()))

    # ----------------------------------------------------------------------------------- background side
    async def _run(self, job: SaveJob, stage_s: float, checks: Callable[[], dict] | None,
                   snapshot: Snapshot | None) -> SaveResult:
        loop = asyncio.get_running_loop()
        async with self._order:
            try:
                return await self._pipeline(loop, job, stage_s, checks, snapshot)
            finally:
                if job.slot is not None:
                    ring, job.slot.ring = job.slot.ring, None
                    if ring is not None:  # the stager stops before the slot is reused
                        ring.abort(CheckpointError(f"checkpoint {job.tag!r} ended before its last wave was staged"))
                        await loop.run_in_executor(None, ring.stopped.wait, self.config.commit_timeout_s)
                    self.pool.release(job.slot)

    async def _pipeline(self, loop, job: SaveJob, stage_s: float, checks: Callable[[], dict] | None,
                        snapshot: Snapshot | None) -> SaveResult:
        """``checks``: verify_replicated's checksums of this rank's replicated tensors (run while the files are
        written). ``snapshot``: a lazy copy; a state it finds changed in place before it was settled (see
        :class:`~asyncckpt.staging.Snapshot`) fails this rank's outcome, so nothing is published."""
        ctx = self.ctx
        phases = {"stage": stage_s}
        t = time.perf_counter()
        if job.ready is not ready_now:
            await loop.run_in_executor(None, job.ready)  # CUDA copies finished
        phases["copy_wait"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            prepared = await loop.run_in_executor(self._commit_thread, self.coordinator.prepare, job.save_dir,
                                                  job.tag, job.reason, self._spec(job))
        except CommitError as exc:  # this rank could not create the partial directory (permission denied...)?
            raise_for_rank(exc, ctx.rank, f"starting checkpoint {job.tag!r} in {job.save_dir}")
        phases["prepare"] = time.perf_counter() - t
        if prepared is None:  # some rank had no free slot (on_busy=skip): every rank skips this save
            return self._skipped(job.tag)
        tag = prepared.tag
        st = self.storage_for(job.save_dir)
        t = time.perf_counter()
        sums = loop.run_in_executor(None, checks) if checks is not None else None  # while the files are written
        torn = snapshot.failure() if snapshot is not None else None  # known already: write nothing
        try:
            if torn is not None:
                raise torn
            files = await self.writer.write_rank(directory=st.staging_dir(job.save_dir, tag), rank=ctx.rank,
                                                 flat=job.flat, slot=job.slot, skeleton=job.flat.skeleton, storage=st)
            if snapshot is not None:  # as late as possible: a mutation under way while the copy ran has
                torn = snapshot.failure_after_settling()  # surely bumped its version counter by now
                if torn is not None:
                    raise torn
            outcome = RankOutcome(ctx.rank, True, index_name=files.index_name, index_xxh3=files.index_xxh3,
                                  bytes_written=files.bytes_written, node=ctx.node, replicated_fp=job.replicated_fp)
            write_error = None
        except Exception as exc:  # reported to every rank through the commit; raised below with the cause
            files = None
            write_error = exc
            outcome = RankOutcome(ctx.rank, False, error=f"{type(exc).__name__}: {exc}", node=ctx.node,
                                  replicated_fp=job.replicated_fp)
            log.error("rank %d: writing checkpoint %r failed: %s", ctx.rank, tag, exc)
        phases["write"] = time.perf_counter() - t
        replicated_sums = await sums if sums is not None else None
        try:
            info = await loop.run_in_executor(self._commit_thread, self.coordinator.commit, job.save_dir, tag,
                                              outcome, job.save_latest, job.meta, prepared.save_id, job.t_start,
                                              replicated_sums)
        except CommitError as exc:  # the rank at fault raises its own error, the others this one (README)
            step = f"{'writing' if write_error else 'publishing'} checkpoint {tag!r} in {job.save_dir}"
            raise_for_rank(exc, ctx.rank, step, write_error)
        phases.update(info.phases)
        durable = time.perf_counter() - job.t_start
        if self.config.keep_last:  # deleting old tags is not part of making this one durable
            self._retain_thread.submit(self.coordinator.retain, job.save_dir, tag)
        if not job.returned.is_set():  # the caller is still returning from save(): its stall is not final yet
            await loop.run_in_executor(None, job.returned.wait, 60.0)
        result = SaveResult(tag, info.path, stall_s=job.stall_s, time_to_durable_s=durable,
                            raw_bytes=job.flat.nbytes, staging_peak_bytes=job.staging_bytes,
                            bytes_written=files.bytes_written,
                            total_bytes_written=info.total_bytes_written, phases=phases, rank=ctx.rank,
                            world_size=ctx.world_size)
        if ctx.rank == 0:
            log.info("published checkpoint %s: %.1f MiB raw -> %.1f MiB on disk, stall %.1f ms, durable after %.2f s",
                     info.path, result.raw_bytes / 2**20, result.total_bytes_written / 2**20, job.stall_s * 1e3, durable)
        return result


async def _make_lock() -> asyncio.Lock:
    return asyncio.Lock()


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ------------------------------------------------------------------------------------------ interpreter exit
_live_engines: "weakref.WeakSet[SaveEngine]" = weakref.WeakSet()


def _drain_at_exit() -> None:
    """Finish every save accepted by a saver of this process that was not closed, before the interpreter
    shuts its thread pools down. Each saver waits at most its ``commit_timeout_s``, counted from the start of
    the drain. Never raises: an exception here would skip the exit hooks registered before this one."""
    try:
        engines = [e for e in list(_live_engines) if e._pid == os.getpid() and not e._closed]
        pending = sum(e.in_flight() for e in engines)
        if pending:
            log.warning("waiting for %d checkpoint save(s) in flight before exit", pending)
        start = time.monotonic()
        for engine in engines:
            try:
                engine._close_at_exit(start + engine.config.commit_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the other savers still get their turn
                log.error("closing a checkpoint saver at exit failed: %s", _exc_text(exc))
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt while draining: exit without the rest
        log.error("stopped waiting for checkpoint saves at exit: %s", _exc_text(exc))


at_shutdown(_drain_at_exit)

