"""An in-process fake of the saver's collectives (asyncckpt/collectives.py) for N simulated ranks, one thread
each, that counts what every rank receives.

Every rank's k-th call meets the other ranks' k-th calls (they must be the same kind, as over a real group).
Objects travel pickled, as over gloo, and each rank is charged the bytes the real transport would deliver to
it (the model in collectives.py's docstring: 8-byte sizes, payloads padded to the largest where torch pads).
"""
from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from asyncckpt.collectives import ROOT

SIZE = 8  # a torch.int64 size tensor


@dataclass
class Meter:
    """What one rank received: bytes, and calls (one per Collectives method call; ``ops``: torch collectives)."""

    bytes: int = 0
    calls: int = 0
    ops: int = 0

    def take(self, nbytes: int, ops: int) -> None:
        self.bytes += nbytes
        self.calls += 1
        self.ops += ops


@dataclass
class _Meeting:
    kind: str
    payloads: list
    arrived: int = 0
    left: int = 0


@dataclass
class FakeJob:
    """N simulated ranks. ``comm(rank)`` is rank ``rank``'s :class:`FakeCollectives`; ``meters[rank]`` what it
    received so far.

    One thread per rank, but only one runs at a time: a baton goes round the ranks in order. A rank runs until
    its next call, leaves its payload and hands the baton on; when the baton is back, every rank has made that
    call. (Thousands of threads woken at once by one condition spend seconds per call fighting for the GIL;
    a baton costs one hand-off per rank.)"""

    world_size: int
    timeout_s: float = 120.0
    meters: list[Meter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meters = [Meter() for _ in range(self.world_size)]
        self._meetings: dict[int, _Meeting] = {}
        self._turns = [_taken() for _ in range(self.world_size)]  # released: that rank's turn
        self._done: set[int] = set()
        self._finished = threading.Event()

    def comm(self, rank: int) -> "FakeCollectives":
        return FakeCollectives(self, rank)

    def meet(self, seq: int, rank: int, kind: str, payload: Any) -> list:
        """Every rank's payload of the ``seq``-th call, once every rank made it (the caller holds the baton)."""
        m = self._meetings.setdefault(seq, _Meeting(kind, [None] * self.world_size, left=self.world_size))
        if m.kind != kind:
            raise RuntimeError(f"rank {rank}: call {seq} is {kind}, another rank's is {m.kind}")
        m.payloads[rank] = payload
        m.arrived += 1
        self._hand_on(rank)
        if not self._turns[rank].acquire(timeout=self.timeout_s):
            raise TimeoutError(f"rank {rank}: {kind} #{seq}: no turn within {self.timeout_s}s")
        if m.arrived != self.world_size:
            raise RuntimeError(f"rank {rank}: {kind} #{seq}: only {m.arrived} of {self.world_size} ranks came (the "
                               "others finished)")
        m.left -= 1
        if not m.left:
            del self._meetings[seq]
        return m.payloads

    def _hand_on(self, rank: int) -> None:
        for step in range(1, self.world_size + 1):
            nxt = (rank + step) % self.world_size
            if nxt not in self._done:
                self._turns[nxt].release()
                return
        self._finished.set()

    def run(self, fn: Callable[[int], Any], stack_bytes: int = 512 * 1024) -> list:
        """``fn(rank)`` on every rank; every rank's result (or the exception it raised)."""
        results: list = [None] * self.world_size

        def body(rank: int) -> None:
            self._turns[rank].acquire()
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                results[rank] = exc
            self._done.add(rank)
            self._hand_on(rank)

        old = threading.stack_size(stack_bytes)
        try:
            threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world_size)]
            for t in threads:
                t.start()
        finally:
            threading.stack_size(old)
        self._turns[0].release()
        if not self._finished.wait(self.timeout_s):
            raise TimeoutError(f"the simulated ranks are still running after {self.timeout_s}s")
        for t in threads:
            t.join(self.timeout_s)
        return results


def _taken() -> threading.Lock:
    """A lock held from the start, released by whoever hands the baton on (a plain lock wakes its waiter
    several times faster than a threading.Semaphore)."""
    lock = threading.Lock()
    lock.acquire()
    return lock


class FakeCollectives:
    """One simulated rank's :class:`asyncckpt.collectives.Collectives`."""

    def __init__(self, job: FakeJob, rank: int):
        self.job = job
        self.rank = rank
        self.world_size = job.world_size
        self._seq = 0

    def _meet(self, kind: str, payload: bytes | None) -> list:
        self._seq += 1
        return self.job.meet(self._seq, self.rank, kind, payload)

    def _meter(self) -> Meter:
        return self.job.meters[self.rank]

    def gather(self, obj: Any) -> list | None:
        payloads = self._meet("gather", pickle.dumps(obj))
        if self.rank != ROOT:
            self._meter().take(SIZE, 3)  # the largest size; its own size and payload are sent, not received
            return None
        cap = max(len(p) for p in payloads)
        self._meter().take((self.world_size - 1) * (SIZE + cap), 3)
        return [pickle.loads(p) for p in payloads]

    def broadcast(self, obj: Any) -> Any:
        payload = self._meet("broadcast", pickle.dumps(obj) if self.rank == ROOT else None)[ROOT]
        self._meter().take(0 if self.rank == ROOT else SIZE + len(payload), 2)
        return pickle.loads(payload)

    def scatter(self, objs: list | None) -> Any:
        if self.rank == ROOT:
            parts = [pickle.dumps(o) for o in objs]
            mine = (max(len(p) for p in parts), parts)
        cap, parts = self._meet("scatter", mine if self.rank == ROOT else None)[ROOT]
        self._meter().take(0 if self.rank == ROOT else SIZE + cap + SIZE, 3)  # the largest size, padded payload, size
        return pickle.loads(parts[self.rank])

    def all_gather(self, obj: Any) -> list:
        payloads = self._meet("all_gather", pickle.dumps(obj))
        cap = max(len(p) for p in payloads)
        self._meter().take((self.world_size - 1) * (SIZE + cap), 2)
        return [pickle.loads(p) for p in payloads]

    def close(self) -> None:
        pass
