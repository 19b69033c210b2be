"""The ranks of one saver as a node's service sees them: the commit coordinator of each rank talks to the others
through an in-process exchange instead of a gloo group, so that the library's own prepare/commit/publish logic
(:class:`~asyncckpt.commit.CommitCoordinator`) runs unchanged over "the world of the ranks handed over". On a
job of several nodes, the exchange holds this node's ranks and a :class:`~.link.Link` carries each round
between the nodes' services."""
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
from .link import Failure, Link

_MISSING = object()


class _Round:
    def __init__(self):
        self.values: dict[int, Any] = {}  # member -> its object
        self.kinds: dict[int, str] = {}  # member -> "gather", "broadcast" or "scatter"
        self.first = 0.0  # when the first member arrived (monotonic)
        self.result: Any = _MISSING  # linked: member -> its result, posted by the link
        self.taken = 0


class Exchange:
    """The rounds of one saver's ranks on this node (``members``): the k-th call of each member pairs with the
    k-th of the others. Alone (one node), a round completes when every member's object is in; ``linked`` (several
    nodes), the :class:`~.link.Link` collects each round (:meth:`collect`) and posts every member's result
    (:meth:`resolve`). A round fails when a member it waits for has left (its training process is gone and
    everything it handed over is finished) or has not come within ``timeout_s``; after one failure every later
    call fails (the group can no longer be trusted, as a broken gloo group)."""

    def __init__(self, members: tuple[int, ...], timeout_s: float, linked: bool = False):
        self.members = members
        self.timeout_s = timeout_s
        self.linked = linked
        self._cond = threading.Condition()
        self._next = {r: 0 for r in members}
        self._rounds: dict[int, _Round] = {}
        self._gone: set[int] = set()
        self._broken: Failure | None = None
        self._closed = False

    @property
    def broken(self) -> Failure | None:
        return self._broken

    def call(self, rank: int, kind: str, obj: Any) -> Any:
        """Member ``rank``'s part of its next round; returns its result (RuntimeError when the round failed)."""
        with self._cond:
            rnd = self._next[rank]
            self._next[rank] += 1
            entry = self._rounds.setdefault(rnd, _Round())
            if not entry.values:
                entry.first = time.monotonic()
            entry.values[rank], entry.kinds[rank] = obj, kind
            self._cond.notify_all()
            deadline = time.monotonic() + (self.timeout_s * 4 + 60 if self.linked else self.timeout_s)
            while True:
                if self._broken is not None:
                    raise RuntimeError(self._broken.text)
                if self.linked and entry.result is not _MISSING:
                    return self._take(rnd, entry, entry.result.get(rank))
                if not self.linked:
                    if len(entry.values) == len(self.members):
                        return self._take(rnd, entry, _result(kind, rank, entry.values))
                    failure = self._failure(self.members, entry.values, deadline)
                    if failure is not None:
                        self._fail(failure)
                        continue
                left = deadline - time.monotonic()
                if left <= 0:  # linked: the link itself failed to answer (it waits less long)
                    self._fail(Failure("the writer services' group did not complete a round within "
                                       f"{self.timeout_s * 4 + 60:g}s"))
                    continue
                self._cond.wait(left)

    def _take(self, rnd: int, entry: _Round, result: Any) -> Any:
        entry.taken += 1
        if entry.taken == len(self.members):
            del self._rounds[rnd]
        return result

    def _failure(self, want, got: dict, deadline: float) -> Failure | None:
        """Why a round that waits for the members ``want`` (``got``: those that came) failed: one of the missing
        left, or ``deadline`` passed; None while it may complete."""
        missing = [r for r in want if r not in got]
        gone = [r for r in missing if r in self._gone]
        if gone:
            return Failure(f"rank(s) {gone} detached from the writer service without handing over their part of "
                           "this save (their training process ended or was killed)")
        if missing and time.monotonic() >= deadline:
            return Failure(f"rank(s) {missing} did not hand over their part within {self.timeout_s:g}s")
        return None

    def _fail(self, failure: Failure) -> None:
        if self._broken is None:
            self._broken = failure
        self._cond.notify_all()

    # ---------------------------------------------------------------------------------- the link's side
    def collect(self, rnd: int, only: int | None = None) -> Any:
        """The link: this node's objects of round ``rnd`` ({member: object}), once every member's is in; with
        ``only``, that member's (kind, object) alone. A :class:`Failure` when the round cannot complete: a member
        left or did not come within ``timeout_s`` of the first one (of the start, with ``only``); None when every
        member left (the link stops)."""
        with self._cond:
            start = time.monotonic()
            while True:
                entry = self._rounds.get(rnd)
                if self._broken is not None:
                    return self._broken
                if self._closed:
                    return None
                if entry is not None and entry.values or only is not None:
                    first = start if only is not None else entry.first
                    want = (only,) if only is not None else self.members
                    got = entry.values if entry is not None else {}
                    if all(r in got for r in want):
                        if only is not None:
                            return entry.kinds[only], got[only]
                        return dict(got)
                    failure = self._failure(want, got, first + self.timeout_s)
                    if failure is not None:
                        return failure
                    self._cond.wait(first + self.timeout_s - time.monotonic())
                else:
                    self._cond.wait()

    def resolve(self, rnd: int, result: dict | Failure) -> None:
        """The link: round ``rnd``'s results (member -> result; a member not named gets None), or its failure
        (every member's call raises it, now and later)."""
        with self._cond:
            if isinstance(result, Failure):
                self._fail(result)
                return
            self._rounds.setdefault(rnd, _Round()).result = result
            self._cond.notify_all()

    def fail(self, failure: Failure) -> None:
        with self._cond:
            self._fail(failure)

    def leave(self, rank: int) -> None:
        """Member ``rank`` will never call again."""
        with self._cond:
            self._gone.add(rank)
            self._cond.notify_all()

    def close(self) -> None:
        """Every member left: the link stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _result(kind: str, rank: int, values: dict[int, Any]) -> Any:
    """Member ``rank``'s result of a complete round on one node (every rank of the world is a member)."""
    if kind == "gather":
        return [values[r] for r in range(len(values))] if rank == ROOT else None
    if kind == "broadcast":
        return values[ROOT]
    return values[ROOT][rank]


class ExchangeCollectives:
    """:class:`~asyncckpt.collectives.Collectives` of one rank over its node's :class:`Exchange` (an all-gather
    is a gather and a broadcast: every round is rank 0's)."""

    def __init__(self, exchange: Exchange, rank: int, world_size: int):
        self.exchange, self.rank, self.world_size = exchange, rank, world_size

    def gather(self, obj: Any) -> list | None:
        return self.exchange.call(self.rank, "gather", obj)

    def broadcast(self, obj: Any) -> Any:
        return self.exchange.call(self.rank, "broadcast", obj)

    def scatter(self, objs: list | None) -> Any:
        return self.exchange.call(self.rank, "scatter", objs)

    def all_gather(self, obj: Any) -> list:
        return self.broadcast(self.gather(obj))

    def close(self) -> None:
        return None


class Group:
    """One saver's ranks on this node: their configuration, a writer pool on the service's encode threads (the
    node's ``writer.threads_per_node`` budget, shared by every saver's group) and the event loop thread its
    writes run on, one commit coordinator per rank, a thread for ``keep_last`` removals and, on a job of several
    nodes, the :class:`~.link.Link` to the other nodes' services."""

    def __init__(self, name: str, config: Config, hello: dict, encoders: concurrent.futures.ThreadPoolExecutor,
                 threads: int):
        self.name = name
        self.config = config
        self.world = hello["world_size"]
        members = tuple(hello["node_ranks"])
        linked = len(members) < self.world
        self.exchange = Exchange(members, config.commit_timeout_s, linked)
        w = config.writer
        # the service process runs at lowered priority as a whole: the writer's threads inherit it (nice=0); the
        # encode threads are the service's (the node's budget), shared by every saver's group
        self.writer = WriterPool(ChunkCodec.from_config(config.codec), threads=threads,
                                 chunk_bytes=config.codec.chunk_bytes, files_per_rank=w.files_per_rank,
                                 inflight_chunks=w.inflight_chunks, fsync=w.fsync, nice=0,
                                 ionice_idle=w.ionice_idle, name="asyncckpt-service", encoders=encoders)
        self.loop = EventLoopThread("asyncckpt-service")  # runs the writer's coroutines
        self.retainer = started_pool(1, "asyncckpt-service-retain")
        self.coordinators: dict[int, CommitCoordinator] = {}
        self.attached: set[int] = set()
        self._cond = threading.Condition()
        self._first_seq: int | None = None
        self._plan: list[list[int]] | None = None  # node 0: every node's ranks (from rank 0's hello)
        self._closed = False
        self.link = None
        if linked:
            self.link = Link(self.exchange, hello.get("node_index", 0), self._node_plan, self._wait_first_seq,
                             hello["job"], hello.get("rendezvous"), dict(os.environ),
                             config.commit_timeout_s)

    @property
    def retired(self) -> bool:
        """The services' group failed: the ranks attach anew with their next save (a new group)."""
        broken = self.exchange.broken
        return broken is not None and broken.retire

    def begin(self, seq: int) -> None:
        """A save of sequence number ``seq`` starts on this node (the first one names the nodes' group)."""
        with self._cond:
            if self._first_seq is None:
                self._first_seq = seq
                self._cond.notify_all()

    def _wait_first_seq(self) -> int | None:
        with self._cond:
            while self._first_seq is None and not self._closed:
                self._cond.wait()
            return self._first_seq

    def _node_plan(self, timeout_s: float) -> list[list[int]]:
        """Node 0: the ranks of every node, in node order (once rank 0 has attached)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._plan is not None or self._closed, timeout_s) or self._plan is None:
                raise RuntimeError(f"rank 0 did not attach to this node's writer service within {timeout_s:g}s")
            return self._plan

    def attach(self, hello: dict) -> CommitCoordinator:
        rank = hello["rank"]
        if rank in self.attached or rank in self.coordinators:
            raise ValueError(f"rank {rank} is already attached to group {self.name}")
        if rank not in self.exchange.members:
            raise ValueError(f"rank {rank} is not one of this node's ranks {list(self.exchange.members)}")
        comm = ExchangeCollectives(self.exchange, rank, self.world) if self.world > 1 else None
        nodes = ()
        if rank == ROOT:
            nodes = tuple(hello.get("nodes") or ()) or (hello["node"],) * self.world
            with self._cond:
                self._plan = _plan(nodes)
                self._cond.notify_all()
        ctx = DistContext(rank, self.world, hello["local_rank"], hello["local_world_size"], hello["node"], comm,
                          tuple(hello["node_ranks"]), hello.get("node_index", 0), nodes, hello["job"])
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
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.exchange.close()
        self.retainer.shutdown(wait=True)
        self.loop.close()
        self.writer.close()

    def retain(self, rank: int, save_dir: str, tag: str, on_behalf) -> concurrent.futures.Future:
        """``keep_last`` after rank ``rank``'s save of ``tag``, on the retention thread, run through
        ``on_behalf(fn, *args)`` (the rank's attachment: its warnings are forwarded to it)."""
        return self.retainer.submit(on_behalf, self.coordinators[rank].retain, save_dir, tag)


def _plan(nodes: tuple[str, ...]) -> list[list[int]]:
    """Every node's ranks, nodes in the order of their first rank (as :meth:`DistContext.join` numbers them)."""
    members: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        members.setdefault(node, []).append(rank)
    return list(members.values())
