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

**Ring mode** (:class:`Ring`): when full-size buffers for every slot exceed ``writer.memory_budget_mib``, a
slot holds a ring of K segments of S bytes instead (:func:`ring_shape`; each segment pinned as one
registration). The items keep a *virtual* layout (:class:`RingLayout`) in which no chunk, pack or
non-contiguous item crosses a segment boundary, so the file is the one a normal save writes; virtual segment
``s`` is staged into ring slot ``s % K`` once the writer has written every chunk of segment ``s - K``. Eager
saves stage every wave before the call returns; lazy saves stage in the copy thread and their hooks wait for
the last wave.

**Device snapshot** (:class:`DeviceMemory`, ``snapshot_device``): CUDA state is copied (eagerly or lazily, as
above) into one flat device buffer per slot in the ring layout, and the ring drains it to the host, one
asynchronous copy per segment, so host staging memory is the ring.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import packing
from .errors import CheckpointError, SaverBusyError, StateMismatchError
from .io_types import StageItem
from .packing import Pack
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
        self.layout: Layout | None = None  # the layout of the last normal (not ring-mode) save
        self._plan_layout: Layout | None = None
        self.allocations = 0  # how many times this slot allocated host memory (tests assert steady state)
        self._reserving: threading.Event | None = None  # set while a background allocation is under way
        self._alloc_lock = threading.Lock()  # the save and the background allocation never allocate at once
        self._ring_host: _HostBuffer | None = None  # ring mode: K segments of S bytes instead of a full buffer
        self._ring_shape = (0, 0)
        self._ring_key: tuple | None = None
        self._ring_layout: "RingLayout | None" = None
        self.ring: "Ring | None" = None  # the ring of the save in flight in this slot (ring mode), else None
        self._device: torch.Tensor | None = None  # a device snapshot's flat device buffer
        self._device_dsts: tuple | None = None  # (layout, destination views in it)
        self.device_allocations = 0  # how many device buffers this slot allocated (tests assert reuse)

    @property
    def buffer(self) -> torch.Tensor | None:
        return None if self._host is None else self._host.tensor

    @property
    def capacity(self) -> int:
        """Host bytes this slot holds (its full-size buffer or its ring)."""
        return sum(h.nbytes for h in (self._host, self._ring_host) if h is not None)

    def ring_slots(self, k: int, s: int) -> list[torch.Tensor]:
        """The ``k`` segments of ``s`` bytes of this slot's ring buffer: allocated once while ``(k, s)`` repeats
        (pinned chunk by chunk on CUDA); the slot's full-size buffer, if any, is freed first."""
        pending = self._reserving
        if pending is not None:
            pending.wait()
        with self._alloc_lock:
            if self._ring_host is None or self._ring_shape != (k, s):
                self._allocate_ring(k, s)
        t = self._ring_host.tensor
        return [t[i * s: (i + 1) * s] for i in range(k)]

    def _allocate_ring(self, k: int, s: int) -> None:
        """Each segment is pinned as a registration of its own: a segment's copies never span two (one
        asynchronous CUDA copy may not)."""
        self._drop()
        t0 = time.perf_counter()
        host = _HostBuffer(k * s, self.pin, chunk=s, allocate=None if self.pool is None else self.pool.allocate)
        if self.pool is not None:
            self.pool._count(host, time.perf_counter() - t0)
        self._ring_host, self._ring_shape = host, (k, s)
        self.allocations += 1

    def ring_layout(self, items: Sequence[StageItem], alone: frozenset[int], chunk: int, segment: int,
                    priority: Sequence[int] | None, whole: bool = False) -> "RingLayout":
        """The ring layout of ``items`` (cached while items, packing and priorities repeat)."""
        key = (tuple([(i.dtype, i.shape, whole or i.src.is_contiguous()) for i in items]), alone, chunk, segment,
               None if priority is None else tuple(priority), whole)
        if key != self._ring_key:
            self._ring_layout = RingLayout.of(items, alone, chunk, segment, priority, whole)
            self._ring_key = key
        return self._ring_layout

    def device_bytes(self, device: torch.device) -> int:
        """Bytes of this slot's device buffer on ``device`` (0: none there)."""
        buf = self._device
        return buf.numel() if buf is not None and buf.device == device else 0

    def device_views(self, items: Sequence[StageItem], layout: "RingLayout", device: torch.device,
                     memory: "DeviceMemory") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A device snapshot's flat buffer (``layout.total`` bytes on ``device``: allocated once, reused while
        it is large enough) and each item's destination view in it (cached while the layout repeats)."""
        buf = self._device
        if buf is None or buf.device != device or buf.numel() < layout.total:
            self._device = self._device_dsts = None  # freed before the larger one is allocated
            buf = self._device = memory.allocate(max(layout.total, ALIGN), device)
            self.device_allocations += 1
        if self._device_dsts is None or self._device_dsts[0] is not layout:
            dsts = [buf[off: off + n].view(i.dtype).view(i.shape) for i, off, n in zip(items, layout.offsets, layout.sizes)]
            self._device_dsts = (layout, dsts)
        return buf[:layout.total], self._device_dsts[1]

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
        for host in (self._host, self._ring_host):
            if host is not None:
                host.free()
        self._host, self._signature, self._dsts = None, None, []
        self._ring_host, self._ring_shape, self._ring_key = None, (0, 0), None

    def _ensure(self, nbytes: int) -> None:
        pending = self._reserving
        if pending is not None:  # a background allocation for this slot: use it, waiting only for the rest
            pending.wait()
        with self._alloc_lock:
            if self._host is not None and self._host.nbytes >= nbytes:  # (a state of only empty tensors needs one)
                return
            self._allocate(nbytes)

    def plan(self, items: Sequence[StageItem]) -> list[torch.Tensor]:
        """Destination views for ``items``; cached while the items' dtypes and shapes repeat."""
        signature = tuple([(i.dtype, i.shape) for i in items])
        if signature == self._signature and self._host is not None:
            self.layout = self._plan_layout  # (a ring-mode save in between had its own)
            return self._dsts
        layout = Layout.of(items)
        self._ensure(layout.total)
        buf = self._host.tensor
        dsts = []
        for item, off, n in zip(items, layout.offsets, layout.sizes):
            dsts.append(buf[off: off + n].view(item.dtype).view(item.shape))
        self.layout = self._plan_layout = layout
        self._dsts, self._signature = dsts, signature
        return dsts

    def stage(self, items: Sequence[StageItem], dsts: Sequence[torch.Tensor] | None = None) -> Callable[[], None]:
        """Copy every item's bytes into this slot (or into ``dsts``: a device snapshot's views of its device
        buffer). Returns ``ready()``: blocks until the bytes are valid."""
        return self._copy_now(zip(self.plan(items) if dsts is None else dsts, items))

    def snapshot(self, items: Sequence[StageItem], groups: Sequence[int], watched: Sequence[Sequence[tuple]],
                 dsts: Sequence[torch.Tensor] | None = None) -> "Snapshot":
        """Copy ``items`` into this slot (or into ``dsts``): those of group -1 now (as :meth:`stage` does), the
        others in the background, group by group (``groups[i]``: the group of item ``i``; 0 first).
        ``watched[g]``: ``(key path, tensor)`` of the tensors group ``g`` reads, whose version counters are
        recorded now and compared when the group is settled."""
        dsts = self.plan(items) if dsts is None else dsts
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


def _issue_cuda(pairs, training_waits: bool, after: dict | None = None) -> list:
    """Issue device-to-host copies on a side stream per device, after the values the training stream last
    wrote (or, for a device in ``after``, after that event); returns one recorded event per device.
    ``training_waits``: the training stream waits on them."""
    by_device: dict[int, list] = {}
    for dst, src in pairs:
        by_device.setdefault(src.device.index or 0, []).append((dst, src))
    events = []
    for dev, group in by_device.items():
        with torch.cuda.device(dev):
            current = torch.cuda.current_stream()
            side = _side_stream(dev)
            if after and dev in after:
                side.wait_event(after[dev])  # the values the training stream had written at the save call
            else:
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
    if dst.device.type != "cpu":  # a device snapshot's device-to-device copy: no host registrations
        return [(dst, src)]
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
                 eager_ready: Callable[[], None] = ready_now, ring: "Ring | None" = None):
        self._eager_ready = eager_ready  # the copies made at the call (CUDA: their events)
        self._versions = versions
        self._settled = [False] * len(pairs)
        self._lock = threading.Lock()
        self._changed: list[str] = []
        self._error: BaseException | None = None
        self._ring = ring  # ring mode: every group is complete once the ring's last wave is staged
        self._host_done = [threading.Event() if ring is None else ring.done for _ in pairs]
        self._cuda_events: list[list] = [[] for _ in pairs]
        if ring is not None:
            return
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
            for dev, event in self._events(g):
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
            for _, event in self._events(g):
                _wait_event(event, deadline, timeout)
        self.settle(self.groups - 1, timeout=0)

    def complete(self) -> None:
        """Background: block until every copy is complete (versions are not checked)."""
        self._eager_ready()
        for g in range(self.groups):
            self._host_done[g].wait()
            for _, event in self._events(g):
                event.synchronize()

    def _events(self, g: int) -> list:
        """``(device, event)`` recorded after group ``g``'s device-to-host copies."""
        return self._cuda_events[g] if self._ring is None else self._ring.last_events()

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
                "snapshot was complete (a mutation no optimizer-step, forward or load_state_dict hook saw): this "
                "checkpoint would be torn, so it is not published; call saver.wait_snapshot() before changing "
                "saved state outside optimizer.step(), forward and load_state_dict, or set snapshot: eager")
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

    def start(self, slot: Slot, flat, dsts: Sequence[torch.Tensor] | None = None) -> Snapshot:
        """Copy into ``slot`` (or into ``dsts``, a device snapshot's views of its device buffer)."""
        self.snapshot = slot.snapshot(flat.items, self.priority(flat.items), self._watched(), dsts)
        return self.snapshot

    def start_ring(self, ring: "Ring") -> Snapshot:
        """Ring mode: the snapshot is complete once the ring's last wave is staged (every hook waits for it)."""
        watched = self._watched()
        versions = [[(key, t, t._version) for key, t in w] for w in watched]
        self.snapshot = Snapshot([[] for _ in watched], versions, copy_into, None, ring=ring)
        return self.snapshot

    def priority(self, items: Sequence[StageItem]) -> list[int]:
        """The group of every item."""
        return [self.group_of(i.key) for i in items]

    def _watched(self) -> list[list[tuple]]:
        watched: list[list[tuple]] = [[] for _ in range(self.groups)]
        for key, t in self.leaves:
            g = self.group_of(key)
            if g >= 0:
                watched[g].append((key, t))
        self.leaves = []
        return watched


class StagingPool:
    """``slots`` reusable host buffers with the backpressure policy of ``on_busy``.

    ``copier(dst, src)`` makes every host copy of staging (the default :func:`copy_into`); a test may set
    another one to slow copies down or to observe them."""

    def __init__(self, slots: int, pin: bool, budget_bytes: int = 0, copier: Copier = copy_into,
                 allocate: Callable[[int], torch.Tensor] | None = None, chunk_bytes: int = 0):
        self.pin = pin
        self.chunk_bytes = chunk_bytes  # ring mode (a state over the budget) stages in waves of whole chunks;
        #                                 0: no ring mode (such a save is refused, see check_budget)
        self.copier = copier
        self.allocate = allocate  # (nbytes) -> uint8 host tensor; default private memory; the writer service's
        #                           is shared memory (pinned here, chunk by chunk, like the default)
        self.device_memory = DeviceMemory()  # where a device snapshot's buffer lives (a test may stand one in)
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
        """Host memory held (full-size buffers and rings), allocations made, and the throughput of allocating
        (faulting in and, on CUDA, pinning) staging memory: what a first save pays when buffers were not
        allocated ahead; ``device_snapshot_bytes``: the device buffers of device snapshots (not host memory)."""
        with self._stats_lock:
            alloc_s, pin_s, nbytes = self._alloc_s, self._pin_s, self._allocated_bytes
        return {"staging_bytes": self.staging_bytes, "allocations": self.allocations, "allocated_bytes": nbytes,
                "device_snapshot_bytes": sum(s.device_bytes(s._device.device) for s in self.slots
                                             if s._device is not None),
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
        """Refuse a save of ``nbytes`` that fits neither the budget nor a ring (none without ring mode)."""
        if self.chunk_bytes:
            self.ring_for(nbytes)
        elif self.budget_bytes and nbytes * len(self.slots) > self.budget_bytes:
            raise SaverBusyError(
                f"staging {nbytes} bytes x {len(self.slots)} slot(s) exceeds writer.memory_budget_mib "
                f"({self.budget_bytes / 2**20:.0f} MiB for this rank); lower max_inflight or raise the budget")

    def ring_for(self, nbytes: int) -> tuple[int, int] | None:
        """``(K, S)``: the ring each slot stages a save of ``nbytes`` through when full-size buffers for every
        slot exceed the budget; None when they fit (or without ring mode). Raises SaverBusyError when not even a ring of two chunks
        per slot fits."""
        if not self.budget_bytes or nbytes * len(self.slots) <= self.budget_bytes or not self.chunk_bytes:
            return None
        per_slot = self.budget_bytes // len(self.slots)
        chunk = self.chunk_bytes
        k, s = ring_shape(per_slot, chunk)
        if not k:
            raise SaverBusyError(
                f"writer.memory_budget_mib ({self.budget_bytes / 2**20:g} MiB for this rank, {per_slot} bytes per "
                f"slot with max_inflight={len(self.slots)}) cannot hold even two chunks of {chunk} bytes "
                "(codec.chunk_mib) per slot; raise the budget or lower codec.chunk_mib or max_inflight")
        return k, s

    def prepare(self, items: Sequence[StageItem]) -> None:
        """Allocate every slot for ``items`` ahead of the first save (so the first save only copies); in ring
        mode, every slot's ring."""
        nbytes = sum(i.nbytes for i in items)
        self.check_budget(nbytes)
        ring = self.ring_for(nbytes)
        for s in self.slots:
            if ring is None:
                s.plan(items)
            else:
                s.ring_slots(*ring)

    def reserve(self, estimate: Callable[[], int],
                ring_of: Callable[[int], tuple[int, int] | None] | None = None) -> None:
        """Allocate every slot not used yet for ``estimate()`` bytes in the background (the estimate is
        computed there too). A save that finds its slot's allocation under way waits for the rest of it. An
        estimate over the budget reserves the ring of :meth:`ring_for` (none without ring mode);
        ``ring_of(estimate)``, when it gives one, is the ring to reserve instead of a full-size buffer (a
        device snapshot's)."""
        pending = {}
        for s in self.slots:
            if s._reserving is None and s.capacity == 0:  # never used (a used slot always holds a buffer)
                pending[s] = s._reserving = threading.Event()
        if not pending:
            return

        def run() -> None:
            try:
                nbytes = estimate()
                shape = (ring_of(nbytes) if ring_of is not None else None) or self.ring_for(nbytes)
                if shape is None and self.budget_bytes and nbytes * len(self.slots) > self.budget_bytes:
                    return
                for s, done in pending.items():
                    try:
                        with s._alloc_lock:
                            if s.capacity == 0:
                                if shape is None:
                                    s._allocate(nbytes)
                                else:
                                    s._allocate_ring(*shape)
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
            s._device = s._device_dsts = None


# ------------------------------------------------------------------------------------------------ ring mode
RING_SEGMENTS = 4  # at least this many segments in a ring when the budget allows segments of one chunk (else 2)
RING_SEGMENT_MAX = RESERVE_CHUNK_BYTES  # a larger budget makes more segments, not larger ones


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def ring_shape(budget: int, chunk_bytes: int) -> tuple[int, int]:
    """``(K, S)``: the ring of K segments of S bytes (a multiple of ``chunk_bytes``, at most
    ``RING_SEGMENT_MAX`` unless one chunk is larger) that fits ``budget`` bytes: at least 4 segments where they
    can hold a chunk each, else 2; ``(0, 0)`` when not even 2 chunks fit."""
    for k in (RING_SEGMENTS, 2):
        s = min(budget // k, max(RING_SEGMENT_MAX, chunk_bytes)) // chunk_bytes * chunk_bytes
        if s >= chunk_bytes:
            return budget // s, s
    return 0, 0


def byte_view(src: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor (no copy)."""
    flat = src.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


@dataclass
class RingLayout:
    """Where a ring-mode save's items live in the *virtual* space of ``total`` bytes, cut in segments of
    ``segment`` bytes; virtual segment ``s`` is staged into ring slot ``s % K``. Items are placed in write
    order (``plan``: the same packs as a normal save, so the same records); an item of at least one chunk
    starts chunk-aligned (``segment`` is a multiple of the chunk, so no chunk crosses a segment boundary), a
    smaller item, a pack, and an item whose source is not contiguous (staged whole) never straddle one.
    ``pieces[s]``: ``(item, first byte, end byte, whole)`` of the items overlapping segment ``s``;
    ``units[s]``: how many chunks the writer writes from segment ``s``."""

    offsets: list[int]
    sizes: list[int]
    total: int
    segment: int
    plan: "PackPlan"
    pieces: list[list[tuple[int, int, int, bool]]]
    units: list[int]
    eager_segments: int  # segments holding items of priority < 0 (staged at the call by a lazy save)

    @property
    def segments(self) -> int:
        return len(self.units)

    @classmethod
    def of(cls, items: Sequence[StageItem], alone: frozenset[int], chunk: int, segment: int,
           priority: Sequence[int] | None = None, whole: bool = False) -> "RingLayout":
        """``priority[i]``: items of a lower priority are placed (so staged) first (a lazy save's groups).
        ``whole``: every item is copied whole into one flat buffer first (a device snapshot), so the ring
        copies only contiguous bytes and a source need not be contiguous."""
        sizes = [i.nbytes for i in items]
        itemsizes = [i.dtype.itemsize for i in items]
        entries = packing.plan(sizes, itemsizes, [0] * len(items), alone, chunk).entries
        if priority is not None:
            first = [min(priority[m] for m in e.members) if isinstance(e, Pack) else priority[e] for e in entries]
            entries = tuple(e for _, _, e in sorted(zip(first, range(len(entries)), entries), key=lambda t: t[:2]))
        offsets = [0] * len(items)
        pos = 0

        def place(n: int, big: bool, whole: bool) -> int:
            nonlocal pos
            pos = _round_up(pos, chunk) if big else _align(pos)
            if whole and n and pos // segment != (pos + n - 1) // segment:
                pos = _round_up(pos, segment)
            start, pos = pos, pos + n
            return start

        for e in entries:
            if isinstance(e, Pack):
                start = place(e.nbytes, False, True)
                for m, off in zip(e.members, e.offsets):
                    offsets[m] = start + off
                continue
            n, contiguous = sizes[e], whole or items[e].src.is_contiguous()
            if not contiguous and n > segment:
                raise CheckpointError(
                    f"tensor {items[e].key!r} ({n} bytes) is not contiguous and larger than a staging segment "
                    f"({segment} bytes) of writer.memory_budget_mib: raise the budget, or save a contiguous copy")
            offsets[e] = place(n, n >= chunk, not contiguous or n < chunk)
        total = _align(pos)
        n_seg = max(1, -(-total // segment))
        pieces: list[list] = [[] for _ in range(n_seg)]
        units = [0] * n_seg
        eager = 0
        for i, (off, n) in enumerate(zip(offsets, sizes)):
            if priority is not None and priority[i] < 0 and n:
                eager = max(eager, (off + n - 1) // segment + 1)
            for s in range(off // segment, -(-(off + n) // segment)):
                a, b = max(off, s * segment) - off, min(off + n, (s + 1) * segment) - off
                pieces[s].append((i, a, b, a == 0 and b == n))
        plan = packing.plan(sizes, itemsizes, offsets, alone, chunk)  # the same packs, at their places
        by_key = {p.members: p for p in plan.packs}
        entries = tuple(by_key[e.members] if isinstance(e, Pack) else e for e in entries)
        for e in entries:
            if isinstance(e, Pack):
                units[e.runs[0][0] // segment] += 1 if e.runs else 0
            else:
                for start in range(0, sizes[e], chunk):
                    units[(offsets[e] + start) // segment] += 1
        return cls(offsets, sizes, total, segment, packing.PackPlan(entries), pieces, units, eager)


class Ring:
    """One ring-mode save's waves: segment ``s`` of the virtual layout is copied into ring slot ``s % K``
    once the writer has written every chunk of segment ``s - K`` (:meth:`written`). The stager
    (:meth:`stage`) runs on the training thread (eager) or in the copy thread (lazy); the writer waits for a
    segment with :meth:`wait_staged`. :meth:`abort` (the save failed or ended) wakes both sides.

    ``source``: a flat uint8 tensor holding the whole virtual layout (a device snapshot): each segment is one
    copy out of it. Without it, each segment copies its items' byte ranges from the live tensors; CUDA copies
    run on the side stream after ``start`` (events per device recorded on the training stream at the call)."""

    def __init__(self, layout: RingLayout, slots: list[torch.Tensor], items: Sequence[StageItem], copier: Copier,
                 timeout: float, source: torch.Tensor | None = None, start: dict | None = None):
        self.layout = layout
        self.slots = slots
        self.items = items
        self.copier = copier
        self.timeout = timeout
        self.source = source
        self.start = start or {}
        n = layout.segments
        self._staged = [threading.Event() for _ in range(n)]
        self._events: list[list] = [[] for _ in range(n)]
        self._left = list(layout.units)
        self._released = [u == 0 for u in layout.units]
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._next = 0
        self.done = threading.Event()  # every segment staged, or the ring aborted
        self.stopped = threading.Event()  # done, and no stager is running: the ring slots are the writer's
        self._running = False

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def segment_of(self, offset: int) -> int:
        return offset // self.layout.segment

    def stage(self, until: int | None = None) -> None:
        """Stage segments up to ``until`` (exclusive; None: all), waiting for the writer to free ring slots.
        Returns early, without raising, once the ring is aborted (the save's future carries the failure)."""
        end = self.layout.segments if until is None else min(until, self.layout.segments)
        with self._cond:
            self._running = True
        try:
            while self._next < end:
                s = self._next
                if not self._wait_free(s):
                    return
                self._copy(s)
                self._staged[s].set()
                self._next += 1
            if self._next == self.layout.segments:
                self.done.set()
        except BaseException as exc:
            self.abort(exc)
            raise
        finally:
            with self._cond:
                self._running = False
                if self.done.is_set():
                    self.stopped.set()

    def _wait_free(self, s: int) -> bool:
        k = len(self.slots)
        with self._cond:
            ok = self._cond.wait_for(lambda: self._error is not None or s < k or self._released[s - k],
                                     timeout=self.timeout)
            if self._error is not None:
                return False
            if not ok:
                self._abort_locked(CheckpointError(
                    f"the writer freed no staging segment within {self.timeout}s (writer.memory_budget_mib ring)"))
                return False
        return True

    def _copy(self, s: int) -> None:
        seg = self.layout.segment
        buf = self.slots[s % len(self.slots)]
        base = s * seg
        cuda = []
        if self.source is not None:
            n = min(seg, self.layout.total - base)
            pairs = [(buf[:n], self.source[base: base + n])]
        else:
            pairs = []
            for i, a, b, whole in self.layout.pieces[s]:
                item, off = self.items[i], self.layout.offsets[i] + a - base
                if whole:
                    pairs.append((buf[off: off + b - a].view(item.dtype).view(item.shape), item.src))
                else:
                    pairs.append((buf[off: off + b - a], byte_view(item.src)[a:b]))
        for dst, src in pairs:
            if src.device.type == "cuda":
                cuda.append((dst, src))
            else:
                self.copier(dst, src)
        if cuda:
            self._events[s] = _issue_cuda(cuda, training_waits=False, after=self.start)

    def staged(self, s: int) -> bool:
        return self._staged[s].is_set()

    def wait_staged(self, s: int) -> None:
        """Writer side: block until segment ``s`` is staged (its copies complete); raises if the ring aborted."""
        if not self._staged[s].wait(self.timeout):
            self.abort(CheckpointError(f"staging segment {s} did not finish within {self.timeout}s"))
        if self._error is not None:
            raise CheckpointError(f"staging the checkpoint failed: {self._error}") from self._error
        for _, event in self._events[s]:
            event.synchronize()

    def array(self, s: int) -> np.ndarray:
        """Ring slot of segment ``s`` as a uint8 numpy array (no copy)."""
        return self.slots[s % len(self.slots)].numpy()

    def written(self, s: int) -> None:
        """Writer side: one chunk of segment ``s`` is written; the last one frees its ring slot."""
        with self._cond:
            self._left[s] -= 1
            if self._left[s] == 0:
                self._released[s] = True
                self._cond.notify_all()

    def last_events(self) -> list:
        """The CUDA events of the last segment staged (the side stream runs in order: they cover all)."""
        for events in reversed(self._events):
            if events:
                return events
        return []

    def failure(self) -> BaseException | None:
        return self._error

    def abort(self, exc: BaseException) -> None:
        with self._cond:
            self._abort_locked(exc)

    def _abort_locked(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._cond.notify_all()
        for e in self._staged:
            e.set()
        self.done.set()
        if not self._running:
            self.stopped.set()


# ------------------------------------------------------------------------------------------ device snapshot
DEVICE_RING_BYTES = 256 << 20  # a device snapshot drains through a host ring of at most this much per slot


class DeviceMemory:
    """The device a state's snapshot can live on, its free memory and the allocation of a snapshot buffer:
    CUDA here; a test may set ``StagingPool.device_memory`` to a stand-in (a CPU tensor as the "device"
    buffer) to exercise the drain without a GPU."""

    def device_of(self, items: Sequence[StageItem]) -> torch.device | None:
        """The one CUDA device holding the state's tensors (CPU tensors may be mixed in); None when there is no
        CUDA tensor or when they are spread over several devices."""
        devices = {i.src.device for i in items if i.src.device.type == "cuda" and i.nbytes}
        return devices.pop() if len(devices) == 1 else None

    def free_bytes(self, device: torch.device) -> int:
        """Device memory a new buffer can take: free in the driver plus what torch's allocator caches unused."""
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def after_copies(self, device: torch.device) -> dict:
        """``{device index: event}`` recorded on the side stream after the snapshot's copies issued so far (the
        drain's copies wait for it); empty for a stand-in device."""
        if device.type != "cuda":
            return {}
        dev = device.index or 0
        with torch.cuda.device(dev):
            event = torch.cuda.Event()
            event.record(_side_stream(dev))
        return {dev: event}
