"""Host staging buffers: allocated once, reused by every save.

A :class:`StagingPool` holds ``max_inflight`` slots. A slot is one contiguous host buffer (pinned when CUDA
is in use) plus a cached *layout*: where each staged item lives in it, and ready-made destination views. A
save whose items have the same dtypes and shapes as the previous save on that slot reuses both, so the steady
state allocates nothing. A slot is owned by the training thread while staging, then by the writer until its data
is durable, then returns to the pool.

**Eager** staging (:meth:`Slot.stage`) copies before the save call returns. On CUDA, copies run on a side
stream: it first waits for the training stream (so pending kernels that write the parameters finish), the
copies are issued non-blocking, an event is recorded, and the training stream waits on that event before its
next kernels run. The CPU thread never blocks on the copy; the writer waits on the event.

**Lazy** staging (:meth:`Slot.snapshot`) returns before the copy is made: a :class:`Snapshot` copies in the
background (CUDA: on the side stream, without making the training stream wait; CPU: in the pool's copy
thread; torch copies release the GIL), in groups: the first group (module buffers, which forward changes) has
a completion of its own. The training side calls :meth:`Snapshot.settle` before it mutates a group's tensors
(the checkpointer's optimizer-step and forward pre-hooks): it waits for that group's copy (CUDA: the training
stream waits on its event; the CPU does not block) and compares the tensors' version counters with those
recorded at the call. A tensor changed in place in between (a mutation no hook saw) fails the save, naming its
key path: a torn checkpoint is never published.

**Background allocation** (:meth:`StagingPool.reserve`): from construction, a thread allocates every slot's
buffer for an estimated size, in chunks (faulting the pages in; on CUDA pinning each chunk with
``cudaHostRegister``, so no single call holds the driver for seconds); the first save waits only for what is
not ready yet. ``stats()`` reports the bytes allocated and the allocation (and pinning) throughput.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import CheckpointError, SaverBusyError, StateMismatchError
from .io_types import StageItem
from .threads import started_pool

log = logging.getLogger(__name__)
ALIGN = 64
RESERVE_CHUNK_BYTES = 256 << 20  # background allocation faults in (and pins) this much per step

Copier = Callable[[torch.Tensor, torch.Tensor], None]


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The default host copy: torch splits a large copy across its intra-op threads (all cores)."""
    dst.copy_(src)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Layout:
    offsets: list[int]
    sizes: list[int]
    total: int

    @classmethod
    def of(cls, items: Sequence[StageItem]) -> "Layout":
        offsets, pos = [], 0
        sizes = [i.nbytes for i in items]
        for n in sizes:
            offsets.append(pos)
            pos = _align(pos + n)
        return cls(offsets, sizes, pos)


class _HostBuffer:
    """One contiguous host allocation; on CUDA its pages are pinned chunk by chunk (``cudaHostRegister``)."""

    def __init__(self, nbytes: int, pin: bool, chunk: int = RESERVE_CHUNK_BYTES,
                 allocate: Callable[[int], torch.Tensor] | None = None):
        size = max(nbytes, ALIGN)
        self.tensor = allocate(size) if allocate is not None else torch.empty(size, dtype=torch.uint8)
        self._registered: list[int] = []
        self.pin = pin
        self.fault_s = 0.0
        self.pin_s = 0.0
        n = self.tensor.numel()
        for start in range(0, n, chunk):
            piece = self.tensor[start: start + chunk]
            t0 = time.perf_counter()
            piece.fill_(0)  # fault the pages in now rather than during a save
            t1 = time.perf_counter()
            if pin:
                _host_register(piece)
                self._registered.append(piece.data_ptr())
            self.pin_s += time.perf_counter() - t1
            self.fault_s += t1 - t0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def free(self) -> None:
        for ptr in self._registered:
            _host_unregister(ptr)
        self._registered = []
        self.tensor = None


def _host_register(piece: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(piece.data_ptr(), piece.numel(), 0)
    if int(err) != 0:
        raise CheckpointError(f"cudaHostRegister of {piece.numel()} bytes of staging memory failed (error {int(err)})")


def _host_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class Slot:
    """One reusable host buffer and the views into it of the last layout staged there."""

    def __init__(self, index: int, pin: bool, pool: "StagingPool | None" = None):
        self.index = index
        self.pin = pin
        self.pool = pool  # whose copier copies and whose statistics count the allocations
        self._host: _HostBuffer | None = None
        self._signature: tuple | None = None
        self._dsts: list[torch.Tensor] = []
        self.layout: Layout | None = None
        self.allocations = 0  # how many times this slot allocated host memory (tests assert steady state)
        self._reserving: threading.Event | None = None  # set while a background allocation is under way
        self._alloc_lock = threading.Lock()  # the save and the background allocation never allocate at once

    @property
    def buffer(self) -> torch.Tensor | None:
        return None if self._host is None else self._host.tensor

    @property
    def capacity(self) -> int:
        return 0 if self._host is None else self._host.nbytes

    def _allocate(self, nbytes: int) -> None:
        """Replace the buffer with one of at least ``nbytes`` (the old one is freed first)."""
        self._drop()
        t0 = time.perf_counter()
        host = _HostBuffer(nbytes, self.pin, allocate=None if self.pool is None else self.pool.allocate)
        if self.pool is not None:
            self.pool._count(host, time.perf_counter() - t0)
        self._host = host
        self.allocations += 1

    def _drop(self) -> None:
        if self._host is not None:
            self._host.free()
        self._host, self._signature, self._dsts = None, None, []

    def _ensure(self, nbytes: int) -> None:
        pending = self._reserving
        if pending is not None:  # a background allocation for this slot: use it, waiting only for the rest
            pending.wait()
        with self._alloc_lock:
            if self._host is not None and self.capacity >= nbytes:  # (a state of only empty tensors needs one too)
                return
            self._allocate(nbytes)

    def plan(self, items: Sequence[StageItem]) -> list[torch.Tensor]:
        """Destination views for ``items``; cached while the items' dtypes and shapes repeat."""
        signature = tuple([(i.dtype, i.shape) for i in items])
        if signature == self._signature and self._host is not None:
            return self._dsts
        layout = Layout.of(items)
        self._ensure(layout.total)
        buf = self._host.tensor
        dsts = []
        for item, off, n in zip(items, layout.offsets, layout.sizes):
            dsts.append(buf[off: off + n].view(item.dtype).view(item.shape))
        self.layout, self._dsts, self._signature = layout, dsts, signature
        return dsts

    def stage(self, items: Sequence[StageItem]) -> Callable[[], None]:
        """Copy every item's bytes into this slot. Returns ``ready()``: blocks until the bytes are valid."""
        return self._copy_now(zip(self.plan(items), items))

    def snapshot(self, items: Sequence[StageItem], groups: Sequence[int], watched: Sequence[Sequence[tuple]]
                 ) -> "Snapshot":
        """Copy ``items`` into this slot: those of group -1 now (as :meth:`stage` does), the others in the
        background, group by group (``groups[i]``: the group of item ``i``; 0 first). ``watched[g]``: ``(key
        path, tensor)`` of the tensors group ``g`` reads, whose version counters are recorded now and compared
        when the group is settled."""
        dsts = self.plan(items)
        pairs: list[list[tuple]] = [[] for _ in watched]
        eager = []
        for dst, item, g in zip(dsts, items, groups):
            if g < 0:
                eager.append((dst, item))
            else:
                pairs[g].append((dst, item.src))
        versions = [[(key, t, t._version) for key, t in w] for w in watched]
        ready = self._copy_now(eager)
        return Snapshot(pairs, versions, self._copier(), self.pool.copy_thread(), ready)

    def _copier(self) -> Copier:
        return copy_into if self.pool is None else self.pool.copier

    def _copy_now(self, pairs) -> Callable[[], None]:
        copy = self._copier()
        cuda_pairs = []
        for dst, item in pairs:
            if item.src.device.type == "cuda":
                cuda_pairs.append((dst, item.src))
            else:
                copy(dst, item.src)
        return _stage_cuda(cuda_pairs) if cuda_pairs else ready_now

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 numpy view of staged bytes (no copy)."""
        return self._host.tensor[offset: offset + nbytes].numpy()


def ready_now() -> None:
    """The waiter of a CPU-only staging: the copies finished before ``stage`` returned."""
    return None


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(dev: int) -> "torch.cuda.Stream":
    side = _side_streams.get(dev)
    if side is None:
        with torch.cuda.device(dev):
            side = _side_streams[dev] = torch.cuda.Stream()
    return side


def _issue_cuda(pairs, training_waits: bool) -> list:
    """Issue device-to-host copies on a side stream per device, after the values the training stream last
    wrote; returns one recorded event per device. ``training_waits``: the training stream waits on them."""
    by_device: dict[int, list] = {}
    for dst, src in pairs:
        by_device.setdefault(src.device.index or 0, []).append((dst, src))
    events = []
    for dev, group in by_device.items():
        with torch.cuda.device(dev):
            current = torch.cuda.current_stream()
            side = _side_stream(dev)
            side.wait_stream(current)  # the values the training stream last wrote
            with torch.cuda.stream(side):
                for dst, src in group:
                    for d, s in registered_pieces(dst, src):
                        d.copy_(s, non_blocking=True)
                    src.record_stream(side)  # the allocator must not reuse src's memory before the copy
            event = torch.cuda.Event()
            event.record(side)
            if training_waits:
                current.wait_event(event)  # the next kernels (optimizer step) run after the copy read the values
            events.append((dev, event))
    return events


def registered_pieces(dst: torch.Tensor, src: torch.Tensor, chunk: int = RESERVE_CHUNK_BYTES) -> list:
    """One host copy ``dst <- src`` cut where the destination crosses a boundary of its buffer's pinned
    registrations (every ``chunk`` bytes from the start of its storage, as :class:`_HostBuffer` registers
    them): one asynchronous CUDA copy may not span two ``cudaHostRegister`` ranges (it fails with "invalid
    argument"). A non-contiguous source that must be cut is made contiguous first, on the current stream."""
    size = dst.element_size()
    nbytes = dst.numel() * size
    start = dst.storage_offset() * size
    if nbytes == 0 or start // chunk == (start + nbytes - 1) // chunk:
        return [(dst, src)]
    d = dst.reshape(-1).view(torch.uint8)
    s = src.contiguous().reshape(-1).view(torch.uint8)
    pieces, pos = [], 0
    while pos < nbytes:
        end = min(nbytes, ((start + pos) // chunk + 1) * chunk - start)
        pieces.append((d[pos:end], s[pos:end]))
        pos = end
    return pieces


def _stage_cuda(pairs) -> Callable[[], None]:
    """Eager CUDA staging: the training stream waits on the copies; returns a waiter on their events."""
    events = _issue_cuda(pairs, training_waits=True)

    def ready() -> None:
        for _, e in events:
            e.synchronize()

    return ready


class Snapshot:
    """One lazy copy of a save's state into its slot (see the module docstring).

    Groups complete in order. ``settle(g)`` (training side) orders the caller after group ``g``'s copy and
    checks its tensors' version counters; :meth:`failure_after_settling` (background, once the copy is
    complete) settles what the training side has not; :meth:`failure` is then a :class:`StateMismatchError`
    naming every tensor changed in place before its group was settled."""

    def __init__(self, pairs: list[list[tuple]], versions: list[list[tuple]], copier: Copier, thread,
                 eager_ready: Callable[[], None] = ready_now):
        self._eager_ready = eager_ready  # the copies made at the call (CUDA: their events)
        self._versions = versions
        self._settled = [False] * len(pairs)
        self._lock = threading.Lock()
        self._changed: list[str] = []
        self._error: BaseException | None = None
        self._host_done = [threading.Event() for _ in pairs]
        self._cuda_events: list[list] = [[] for _ in pairs]
        host = []
        for g, group in enumerate(pairs):
            cuda = [(d, s) for d, s in group if s.device.type == "cuda"]
            if cuda:
                self._cuda_events[g] = _issue_cuda(cuda, training_waits=False)
            host.append([(d, s) for d, s in group if s.device.type != "cuda"])
        if any(host):
            thread.submit(self._copy_host, host, copier)
        else:
            for done in self._host_done:
                done.set()

    def _copy_host(self, host: list[list[tuple]], copy: Copier) -> None:
        try:
            for g, group in enumerate(host):
                for dst, src in group:
                    copy(dst, src)
                self._host_done[g].set()
        except BaseException as exc:  # noqa: BLE001 - reported by failure(); the waiters must not hang
            self._error = exc
        finally:
            for done in self._host_done:
                done.set()

    @property
    def groups(self) -> int:
        return len(self._settled)

    def settle(self, group: int, timeout: float | None = None) -> None:
        """Training side, before the first mutation of group ``group`` (and of every earlier group): wait for
        their copies (CPU: blocks until they are done; CUDA: the current stream waits on their events, the CPU
        does not block) and check the versions of their tensors."""
        for g in range(group + 1):
            if self._settled[g]:
                continue
            if not self._host_done[g].wait(timeout):
                raise TimeoutError(f"the checkpoint snapshot did not finish copying within {timeout}s")
            for dev, event in self._cuda_events[g]:
                with torch.cuda.device(dev):
                    torch.cuda.current_stream().wait_event(event)
            self._check(g)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the whole copy is complete, then settle every group (``saver.wait_snapshot``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for g in range(self.groups):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._host_done[g].wait(left):
                raise TimeoutError(f"the checkpoint snapshot did not finish copying within {timeout}s")
            for _, event in self._cuda_events[g]:
                _wait_event(event, deadline, timeout)
        self.settle(self.groups - 1, timeout=0)

    def complete(self) -> None:
        """Background: block until every copy is complete (versions are not checked)."""
        self._eager_ready()
        for g in range(self.groups):
            self._host_done[g].wait()
            for _, event in self._cuda_events[g]:
                event.synchronize()

    def failure(self) -> CheckpointError | None:
        """The reason this snapshot cannot be published, as far as known now."""
        if self._error is not None:
            return CheckpointError(f"copying the checkpoint state failed: {type(self._error).__name__}: "
                                   f"{self._error}")
        if self._changed:
            shown = ", ".join(repr(k) for k in self._changed[:8])
            more = f" and {len(self._changed) - 8} more" if len(self._changed) > 8 else ""
            return StateMismatchError(
                f"tensor(s) {shown}{more} changed in place after save_checkpoint() returned and before the lazy "
                "snapshot was complete (a mutation no optimizer-step or forward hook saw): this checkpoint would "
                "be torn, so it is not published; call saver.wait_snapshot() before changing saved state outside "
                "optimizer.step() and forward")
        return None

    def failure_after_settling(self) -> CheckpointError | None:
        """Background, after :meth:`complete`: settle the groups the training side has not settled yet (no
        hook announced a mutation of them, so any change of version is one no hook saw); the failure if any."""
        for g in range(self.groups):
            self._check(g)
        return self.failure()

    def _check(self, g: int) -> None:
        with self._lock:
            if self._settled[g]:
                return
            self._changed += [key for key, t, v in self._versions[g] if t._version != v]
            self._settled[g] = True
            self._versions[g] = []  # drop the references to the live tensors


def _wait_event(event, deadline: float | None, timeout: float | None) -> None:
    if deadline is None:
        event.synchronize()
        return
    while not event.query():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the checkpoint snapshot did not finish copying within {timeout}s")
        time.sleep(0.0005)


class LazyStaging:
    """How one save is staged lazily: ``group_of(key)`` sorts the staged items into groups copied in order
    (0 first; -1: copied at the call, for state no hook guards), and ``leaves`` lists ``(key path, tensor)`` of
    every tensor saved (filled while the state is flattened), whose version counters the snapshot watches.
    :meth:`start` returns the :class:`Snapshot` (also kept in ``snapshot``)."""

    def __init__(self, group_of: Callable[[str], int], groups: int):
        self.group_of = group_of
        self.groups = groups
        self.leaves: list[tuple[str, torch.Tensor]] = []
        self.snapshot: Snapshot | None = None

    def start(self, slot: Slot, flat) -> Snapshot:
        watched: list[list[tuple]] = [[] for _ in range(self.groups)]
        for key, t in self.leaves:
            g = self.group_of(key)
            if g >= 0:
                watched[g].append((key, t))
        self.leaves = []
        self.snapshot = slot.snapshot(flat.items, [self.group_of(i.key) for i in flat.items], watched)
        return self.snapshot


class StagingPool:
    """``slots`` reusable host buffers with the backpressure policy of ``on_busy``.

    ``copier(dst, src)`` makes every host copy of staging (the default :func:`copy_into`); a test may set
    another one to slow copies down or to observe them."""

    def __init__(self, slots: int, pin: bool, budget_bytes: int = 0, copier: Copier = copy_into,
                 allocate: Callable[[int], torch.Tensor] | None = None):
        self.pin = pin
        self.copier = copier
        self.allocate = allocate  # (nbytes) -> uint8 host tensor; default private memory; the writer service's
        #                           is shared memory (pinned here, chunk by chunk, like the default)
        self.slots = [Slot(i, pin, self) for i in range(slots)]
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()
        self.budget_bytes = budget_bytes
        self._stats_lock = threading.Lock()
        self._allocated_bytes = 0
        self._alloc_s = 0.0
        self._pin_s = 0.0
        self._threads = None  # the copy thread (lazy snapshots) and the reserve thread, started on first use
        self._reserve_future = None

    @property
    def staging_bytes(self) -> int:
        return sum(s.capacity for s in self.slots)

    @property
    def allocations(self) -> int:
        return sum(s.allocations for s in self.slots)

    def _count(self, host: _HostBuffer, seconds: float) -> None:
        with self._stats_lock:
            self._allocated_bytes += host.nbytes
            self._alloc_s += seconds
            self._pin_s += host.pin_s

    def stats(self) -> dict:
        """Host memory held, allocations made, and the throughput of allocating (faulting in and, on CUDA,
        pinning) staging memory: what a first save pays when buffers were not allocated ahead."""
        with self._stats_lock:
            alloc_s, pin_s, nbytes = self._alloc_s, self._pin_s, self._allocated_bytes
        return {"staging_bytes": self.staging_bytes, "allocations": self.allocations, "allocated_bytes": nbytes,
                "allocation_s": alloc_s, "pin_s": pin_s,
                "allocation_bytes_per_s": nbytes / alloc_s if alloc_s > 0 else None,
                "pinning_bytes_per_s": nbytes / pin_s if self.pin and pin_s > 0 else None}

    def _pools(self):
        if self._threads is None:
            self._threads = (started_pool(1, "asyncckpt-snapshot"), started_pool(1, "asyncckpt-reserve"))
        return self._threads

    def copy_thread(self):
        """The thread lazy snapshots copy host tensors in."""
        return self._pools()[0]

    def acquire(self, on_busy: str, timeout: float | None = None) -> Slot | None:
        """A free slot; when none is free: ``wait`` (up to ``timeout``), ``skip`` (None) or ``error``."""
        with self._cond:
            if not self._free:
                if on_busy == "skip":
                    return None
                if on_busy == "error":
                    raise SaverBusyError(
                        f"{len(self.slots)} save(s) already in flight (max_inflight={len(self.slots)}, on_busy=error)")
                if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                    raise SaverBusyError(f"no staging slot became free within {timeout}s")
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def check_budget(self, nbytes: int) -> None:
        if self.budget_bytes and nbytes * len(self.slots) > self.budget_bytes:
            raise SaverBusyError(
                f"staging {nbytes} bytes x {len(self.slots)} slot(s) exceeds writer.memory_budget_mib "
                f"({self.budget_bytes / 2**20:.0f} MiB for this rank); lower max_inflight or raise the budget")

    def prepare(self, items: Sequence[StageItem]) -> None:
        """Allocate every slot for ``items`` ahead of the first save (so the first save only copies)."""
        self.check_budget(sum(i.nbytes for i in items))
        for s in self.slots:
            s.plan(items)

    def reserve(self, estimate: Callable[[], int]) -> None:
        """Allocate every slot not used yet for ``estimate()`` bytes in the background (the estimate is
        computed there too). A save that finds its slot's allocation under way waits for the rest of it; a
        budget smaller than the estimate reserves nothing."""
        pending = {}
        for s in self.slots:
            if s._reserving is None and s.capacity == 0:  # never used (a used slot always holds a buffer)
                pending[s] = s._reserving = threading.Event()
        if not pending:
            return

        def run() -> None:
            try:
                nbytes = estimate()
                if self.budget_bytes and nbytes * len(self.slots) > self.budget_bytes:
                    return
                for s, done in pending.items():
                    try:
                        with s._alloc_lock:
                            if s.capacity == 0:
                                s._allocate(nbytes)
                    finally:
                        s._reserving = None
                        done.set()
            except Exception as exc:  # noqa: BLE001 - a first save then allocates what it needs itself
                log.warning("allocating staging buffers in the background failed: %s", exc)
            finally:
                for s, done in pending.items():
                    if s._reserving is done:
                        s._reserving = None
                    done.set()

        self._reserve_future = self._pools()[1].submit(run)

    def wait_reserved(self, timeout: float | None = None) -> None:
        """Block until the background allocation started by :meth:`reserve` is finished (tests, benchmarks)."""
        if self._reserve_future is not None:
            self._reserve_future.result(timeout)

    def close(self) -> None:
        if self._threads is not None:
            for t in self._threads:
                t.shutdown(wait=True, cancel_futures=True)
            self._threads = None
        for s in self.slots:
            s._drop()
