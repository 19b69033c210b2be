"""Host staging buffers: allocated once, reused by every save.

A :class:`StagingPool` holds ``max_inflight`` slots. A slot is one contiguous host buffer (pinned when CUDA
is in use) plus a cached *layout*: where each staged item lives in it, and ready-made destination views. A
save whose items have the same byte sizes as the previous save on that slot reuses both, so the steady state
allocates nothing. A slot is owned by the training thread while staging, then by the writer until its data is
durable, then returns to the pool.

On CUDA, copies run on a side stream: it first waits for the training stream (so pending kernels that write
the parameters finish), the copies are issued non-blocking, an event is recorded, and the training stream
waits on that event before the next kernels run, so the next optimizer step cannot overwrite a tensor being
copied. The CPU thread never blocks on the copy; the writer waits on the event.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import SaverBusyError
from .io_types import StageItem

log = logging.getLogger(__name__)
ALIGN = 64


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


class Slot:
    """One reusable host buffer and the views into it of the last layout staged there."""

    def __init__(self, index: int, pin: bool, allocate: Callable[[int, bool], torch.Tensor] | None = None):
        self.index = index
        self.pin = pin
        self._allocate = allocate or host_buffer  # (nbytes, pin) -> uint8 tensor; the writer service's is shared memory
        self.buffer: torch.Tensor | None = None
        self._signature: tuple | None = None
        self._dsts: list[torch.Tensor] = []
        self.layout: Layout | None = None
        self.allocations = 0  # how many times this slot allocated host memory (tests assert steady state)

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def _ensure(self, nbytes: int) -> None:
        if self.buffer is not None and self.capacity >= nbytes:  # (a state of only empty tensors still needs one)
            return
        self.buffer = None  # free the old buffer before allocating the larger one
        t0 = time.perf_counter()
        size = max(nbytes, ALIGN)
        self.buffer = self._allocate(size, self.pin)
        self.allocations += 1
        log.debug("slot %d: allocated %.1f MiB of %s host memory in %.3fs", self.index, size / 2**20,
                  "pinned" if self.pin else "pageable", time.perf_counter() - t0)

    def plan(self, items: Sequence[StageItem]) -> list[torch.Tensor]:
        """Destination views for ``items``; cached while the items' sizes, dtypes and shapes repeat."""
        signature = tuple((i.nbytes, i.src.dtype, tuple(i.src.shape)) for i in items)
        if signature == self._signature and self.buffer is not None:
            return self._dsts
        layout = Layout.of(items)
        self._ensure(layout.total)
        buf = self.buffer
        dsts = []
        for item, off, n in zip(items, layout.offsets, layout.sizes):
            dst = buf[off: off + n].view(item.src.dtype).view(item.src.shape)
            dsts.append(dst)
        self.layout, self._dsts, self._signature = layout, dsts, signature
        return dsts

    def stage(self, items: Sequence[StageItem]) -> Callable[[], None]:
        """Copy every item's bytes into this slot. Returns ``ready()``: blocks until the bytes are valid."""
        dsts = self.plan(items)
        cuda_pairs = []
        for dst, item in zip(dsts, items):
            if item.src.device.type == "cuda":
                cuda_pairs.append((dst, item.src))
            else:
                dst.copy_(item.src)
        if not cuda_pairs:
            return ready_now
        return _stage_cuda(cuda_pairs)

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 numpy view of staged bytes (no copy)."""
        return self.buffer[offset: offset + nbytes].numpy()


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """The default allocator of a slot: private host memory, pinned when ``pin``."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def ready_now() -> None:
    """The waiter of a CPU-only staging: the copies finished before ``stage`` returned."""
    return None


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _stage_cuda(pairs) -> Callable[[], None]:
    """Issue device-to-host copies on a side stream per device; return a waiter on their events."""
    by_device: dict[int, list] = {}
    for dst, src in pairs:
        by_device.setdefault(src.device.index or 0, []).append((dst, src))
    events = []
    for dev, group in by_device.items():
        with torch.cuda.device(dev):
            current = torch.cuda.current_stream()
            side = _side_streams.get(dev)
            if side is None:
                side = _side_streams[dev] = torch.cuda.Stream()
            side.wait_stream(current)  # the values the training stream last wrote
            with torch.cuda.stream(side):
                for dst, src in group:
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(side)  # the allocator must not reuse src's memory before the copy
            event = torch.cuda.Event()
            event.record(side)
            current.wait_event(event)  # the next kernels (optimizer step) run after the copy read the values
            events.append(event)

    def ready() -> None:
        for e in events:
            e.synchronize()

    return ready


class StagingPool:
    """``slots`` reusable host buffers with the backpressure policy of ``on_busy``."""

    def __init__(self, slots: int, pin: bool, budget_bytes: int = 0,
                 allocate: Callable[[int, bool], torch.Tensor] | None = None):
        self.slots = [Slot(i, pin, allocate) for i in range(slots)]
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()
        self.budget_bytes = budget_bytes

    @property
    def staging_bytes(self) -> int:
        return sum(s.capacity for s in self.slots)

    @property
    def allocations(self) -> int:
        return sum(s.allocations for s in self.slots)

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
            if s.buffer is not None:
                s.buffer.fill_(0)  # fault the pages in now rather than during the first save

    def close(self) -> None:
        for s in self.slots:
            s.buffer = None
            s._dsts = []
            s._signature = None
