"""The ranks of one saver as the service sees them: the commit coordinator of each rank talks to the others
through an in-process exchange instead of a gloo group, so the library's own prepare/commit/publish logic
(:class:`~asyncckpt.commit.CommitCoordinator`) runs unchanged over "the world of the ranks handed over"."""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Any

from ..codec import ChunkCodec
from ..collectives import ROOT
from ..commit import CommitCoordinator, DistContext
from ..config import Config
from ..storage import Storage, open_storage
from ..threads import EventLoopThread, started_pool
from ..writer import WriterPool

_MISSING = object()


class Exchange:
    """All-gathers among the ``world`` members of one group: the k-th gather of each member pairs with the
    k-th of the others. A gather fails when a member it waits for has left (its training process is gone and
    everything it handed over is finished) or after ``timeout_s``; after one failure every later gather fails
    (the group can no longer be trusted, as a broken gloo group)."""

    def __init__(self, world: int, timeout_s: float):
        self.world = world
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._next = [0] * world
        self._rounds: dict[int, list] = {}  # round -> [values, how many members took the result]
        self._gone: set[int] = set()
        self._broken = ""

    def gather(self, rank: int, obj: Any) -> list:
        with self._cond:
            rnd = self._next[rank]
            self._next[rank] += 1
            entry = self._rounds.setdefault(rnd, [[_MISSING] * self.world, 0])
            values = entry[0]
            values[rank] = obj
            self._cond.notify_all()
            deadline = time.monotonic() + self.timeout_s
            while True:
                missing = [r for r, v in enumerate(values) if v is _MISSING]
                if not missing:
                    entry[1] += 1
                    if entry[1] == self.world:
                        del self._rounds[rnd]
                    return list(values)
                if self._broken:
                    raise RuntimeError(self._broken)
                gone = [r for r in missing if r in self._gone]
                if gone:
                    self._broken = (f"rank(s) {gone} detached from the writer service without handing over their "
                                    "part of this save (their training process ended or was killed)")
                    self._cond.notify_all()
                    raise RuntimeError(self._broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._broken = f"rank(s) {missing} did not hand over their part within {self.timeout_s:g}s"
                    self._cond.notify_all()
                    raise RuntimeError(self._broken)
                self._cond.wait(left)

    def leave(self, rank: int) -> None:
        """Member ``rank`` will never gather again."""
        with self._cond:
            self._gone.add(rank)
            self._cond.notify_all()


class ExchangeCollectives:
    """:class:`~asyncckpt.collectives.Collectives` over the group's in-process :class:`Exchange` (every call is
    an all-gather there: in one process, what a member receives costs nothing on a wire)."""

    def __init__(self, exchange: Exchange, rank: int, world_size: int):
        self.exchange, self.rank, self.world_size = exchange, rank, world_size

    def gather(self, obj: Any) -> list | None:
        values = self.exchange.gather(self.rank, obj)
        return values if self.rank == ROOT else None

    def broadcast(self, obj: Any) -> Any:
        return self.exchange.gather(self.rank, obj)[ROOT]

    def scatter(self, objs: list | None) -> Any:
        return self.exchange.gather(self.rank, objs)[ROOT][self.rank]

    def all_gather(self, obj: Any) -> list:
        return self.exchange.gather(self.rank, obj)

    def close(self) -> None:
        return None


class Group:
    """One saver's ranks: their configuration, the node's writer pool (the whole ``writer.threads_per_node``
    budget) and the event loop thread its writes run on, one commit coordinator per rank and a thread for
    ``keep_last`` removals."""

    def __init__(self, name: str, config: Config, world: int):
        self.name = name
        self.config = config
        self.world = world
        w = config.writer
        self.exchange = Exchange(world, config.commit_timeout_s)
        threads = w.threads_per_node or max(1, min(8, os.cpu_count() or 1))
        # the service process runs at lowered priority as a whole: the writer's threads inherit it (nice=0)
        self.writer = WriterPool(ChunkCodec.from_config(config.codec), threads=threads,
                                 chunk_bytes=config.codec.chunk_bytes, files_per_rank=w.files_per_rank,
                                 inflight_chunks=w.inflight_chunks, fsync=w.fsync, nice=0,
                                 ionice_idle=w.ionice_idle, name="asyncckpt-service")
        self.loop = EventLoopThread("asyncckpt-service")  # runs the writer's coroutines
        self.retainer = started_pool(1, "asyncckpt-service-retain")
        self.coordinators: dict[int, CommitCoordinator] = {}
        self.attached: set[int] = set()

    def attach(self, hello: dict) -> CommitCoordinator:
        rank = hello["rank"]
        if rank in self.attached or rank in self.coordinators:
            raise ValueError(f"rank {rank} is already attached to group {self.name}")
        comm = ExchangeCollectives(self.exchange, rank, self.world) if self.world > 1 else None
        ctx = DistContext(rank, self.world, hello["local_rank"], hello["local_world_size"], hello["node"], comm,
                          tuple(hello["node_ranks"]), 0, (hello["node"],) * self.world if rank == ROOT else (),
                          hello["job"])
        c = self.config
        coordinator = CommitCoordinator(
            ctx, tag_validation=c.tag_validation, node_local=c.use_node_local_storage, overwrite=c.overwrite,
            fsync=c.writer.fsync, keep_last=c.keep_last, timeout_s=c.commit_timeout_s,
            save_deadline_s=c.save_deadline_s, storage_for=self.storage_for)
        self.coordinators[rank] = coordinator
        self.attached.add(rank)
        return coordinator

    def storage_for(self, save_dir: str) -> Storage:
        """The storage of ``save_dir``, with the saver's ``storage`` options (as in the training process)."""
        return open_storage(save_dir, self.config.storage.fsspec_options())

    def detach(self, rank: int) -> bool:
        """Rank ``rank`` is done (all it handed over is finished). True when the group is empty now."""
        self.exchange.leave(rank)
        self.attached.discard(rank)
        coordinator = self.coordinators.get(rank)
        if coordinator is not None:
            coordinator.close()
        return not self.attached

    def close(self) -> None:
        self.retainer.shutdown(wait=True)
        self.loop.close()
        self.writer.close()

    def retain(self, rank: int, save_dir: str, tag: str) -> concurrent.futures.Future:
        return self.retainer.submit(self.coordinators[rank].retain, save_dir, tag)
