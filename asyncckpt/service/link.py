"""The writer services of a job's nodes, coordinating one saver's commits among themselves.

Each node's service holds the commit coordinators of its node's ranks (:mod:`.group`); their collectives go
through the node's in-process :class:`~.group.Exchange`, and a :class:`Link` thread carries each round
between the nodes over the services' own gloo group (one member per node, :class:`~asyncckpt.collectives.GlooCollectives` over
:func:`~asyncckpt.collectives.standalone_gloo_group`), formed from the job's rendezvous store under a prefix
of its own (``asyncckpt-service/<job>/<seq>``: never the training group's keys).

The coordinators' rounds are rank 0's (commit.py ``_round``): a gather to rank 0, then a broadcast or a
scatter from it. Between nodes, a gather round is a gather of each node's records to node 0 (rank 0's node),
and the verdict round a scatter from node 0 of each node's verdicts: node 0 receives O(ranks), every other
node O(its ranks). A round that fails on one node (a rank that does not hand its part over within
``commit_timeout_s``, or whose training process ended without handing it over) goes on between the nodes as
a :class:`Failure`, so that every node learns it in the same round, naming the ranks at fault; after one
failure the link stops (the group is broken, as a broken gloo group in thread mode). A failure of the
services' group itself (a node's service died: gloo reports the closed connection) is *retired*: the ranks
of that saver attach to their service anew with their next save, which forms a new group."""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from ..collectives import ROOT, GlooCollectives, standalone_gloo_group
from ..threads import start_thread
from .protocol import PROTOCOL, version_mismatch

log = logging.getLogger(__name__)

STORE_PREFIX = "asyncckpt-service"
_POLL_S = 0.05  # forming a group: how often a service looks whether every node's service came


def job_rendezvous() -> tuple | None:
    """In a training process: where the job's rendezvous store is, for the node's service to reach it — the
    store of the default process group (a TCP store: ("tcp", host, port); a file store: ("file", path)), else
    None (the service falls back on MASTER_ADDR/MASTER_PORT of its environment)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return ("tcp", store.host, store.port)
    if isinstance(store, dist.FileStore):
        return ("file", store.path)
    return None


def _raise_to(store: Any, key: str, value: int) -> None:
    """Set the number ``key`` to ``value`` unless it is already as large (atomically, by compare-and-set)."""
    expected = ""
    while True:
        got = store.compare_set(key, expected, str(value)).decode()
        if got == str(value) or (got and int(got) > value):
            return
        expected = got


def open_store(rendezvous: tuple | None, environ: dict, timeout_s: float) -> Any:
    """A client of the job's rendezvous store (see :func:`job_rendezvous`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rendezvous is None:
        if not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
            raise RuntimeError("the job's rendezvous store is unknown (no torch.distributed default group in the "
                               "training process, no MASTER_ADDR/MASTER_PORT)")
        rendezvous = ("tcp", environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
    if rendezvous[0] == "file":
        return dist.FileStore(rendezvous[1], -1)
    return dist.TCPStore(rendezvous[1], rendezvous[2], None, False, timeout=timeout)


@dataclass
class Failure:
    """A round that failed on some node: every node raises ``text`` to its ranks. ``retire``: the services'
    group itself failed (not a rank): the ranks attach anew with their next save."""

    text: str
    retire: bool = False


def check_protocols(store: Any, count: int, me: int) -> None:
    """Raise unless each of the ``count`` nodes' services that counted themselves in under ``store`` speaks this
    service's protocol (a node running another asyncckpt would misread this one's rounds). Each sets its
    ``protocol/<node>`` before it counts itself in; one of before versions never does."""
    for node in range(count):
        key = f"protocol/{node}"
        theirs = store.get(key).decode() if store.check([key]) else None
        mismatch = version_mismatch(f"node {node}'s writer service", int(theirs) if theirs and theirs.isdigit()
                                    else theirs, f"node {me}'s")
        if mismatch:
            raise RuntimeError(mismatch)


class Link:
    """One saver's rounds between the nodes, on a thread of this node's service. ``exchange`` is the node's
    :class:`~.group.Exchange` (it hands over each local round and takes its results); ``node_index`` this
    node's place among the job's nodes; ``plan(timeout_s)`` (node 0 only) returns every node's ranks once rank 0
    is attached; ``first_seq()`` waits for the sequence number of the saver's first save here (None: closed
    before), which names the group in the store."""

    def __init__(self, exchange, node_index: int, plan: Callable[[float], list[list[int]]],
                 first_seq: Callable[[], int | None], job: str, rendezvous: tuple | None, environ: dict,
                 timeout_s: float):
        self.exchange = exchange
        self.node_index = node_index
        self._plan = plan
        self._first_seq = first_seq
        self.job = job
        self.rendezvous = rendezvous
        self.environ = environ
        self.timeout_s = timeout_s  # a round's local wait; the services' group waits twice as long
        self._dead = False  # the services' group failed: it carries nothing any more
        self._thread = start_thread(self._run, "asyncckpt-service-link")

    def _run(self) -> None:
        try:
            comm, members = self._form()
        except Exception as exc:  # noqa: BLE001 - every waiting rank is told
            log.error("writer services: could not form the nodes' group: %s", exc)
            self.exchange.fail(Failure(f"the writer services of the job's nodes could not form their group: "
                                       f"{type(exc).__name__}: {exc}".splitlines()[0][:400], retire=True))
            return
        rnd = 0
        while not self._dead:
            failure = self._gather(comm, rnd) if rnd % 2 == 0 else self._scatter(comm, members, rnd)
            if failure is not None and rnd % 2 == 1:
                return  # every node has learnt it: the group is broken
            rnd += 1

    def _form(self) -> tuple[GlooCollectives, list[list[int]] | None]:
        """The services' gloo group, formed when this saver's first save reaches this node. Each node counts
        itself in under the save's prefix and waits (at most ``2 x timeout_s``) for the others; it gives up at
        once when another node's service began to form a group for a later save (it failed this one already:
        after a service died, the nodes form their next group on the same save)."""
        seq = self._first_seq()
        if seq is None:
            raise RuntimeError("the saver closed before its first save")
        root = open_store(self.rendezvous, self.environ, 2 * self.timeout_s)
        newest = f"{STORE_PREFIX}/{self.job}/newest"
        _raise_to(root, newest, seq)
        store = dist.PrefixStore(f"{STORE_PREFIX}/{self.job}/{seq}", root)
        members = None
        if self.node_index == 0:
            members = self._plan(2 * self.timeout_s)
            store.set("nodes", str(len(members)))
        store.set(f"protocol/{self.node_index}", str(PROTOCOL))
        store.add("joined", 1)
        deadline = time.monotonic() + 2 * self.timeout_s
        while not (store.check(["nodes"]) and store.add("joined", 0) >= int(store.get("nodes"))):
            later = int(root.get(newest))
            if later > seq:
                raise RuntimeError(f"the other nodes' services gave save {seq} up (they form a group for save {later})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every node's writer service reached save {seq} within {2 * self.timeout_s:g}s")
            time.sleep(_POLL_S)
        count = int(store.get("nodes"))
        check_protocols(store, count, self.node_index)
        group = standalone_gloo_group(store, self.node_index, count, 2 * self.timeout_s)
        log.info("writer services: node %d of %d joined the nodes' group of save %d", self.node_index, count, seq)
        return GlooCollectives(group, self.node_index, count), members

    def _gather(self, comm: GlooCollectives, rnd: int) -> Failure | None:
        """A gather round: this node's records (or its failure) to node 0; rank 0 gets every rank's."""
        local = self.exchange.collect(rnd)
        if local is None:  # every rank of the saver detached from this node's service
            self._dead = True
            return None
        try:
            every = comm.gather(local)
        except Exception as exc:  # noqa: BLE001 - a node's service died or hung
            failure = self._lost(exc)
            self.exchange.resolve(rnd, failure)
            return failure
        if isinstance(local, Failure):
            self.exchange.resolve(rnd, local)
            return local
        if every is None:  # not node 0: the verdict comes with the next round
            self.exchange.resolve(rnd, {})
            return None
        failures = [f for f in every if isinstance(f, Failure)]
        if failures:
            failure = Failure("; ".join(f.text for f in failures), retire=any(f.retire for f in failures))
            self.exchange.resolve(rnd, failure)
            return failure
        values: dict[int, Any] = {}
        for part in every:
            values.update(part)
        self.exchange.resolve(rnd, {ROOT: [values[r] for r in range(len(values))]})
        return None

    def _scatter(self, comm: GlooCollectives, members, rnd: int) -> Failure | None:
        """A verdict round: rank 0's broadcast or scatter, from node 0 to every node's ranks."""
        payloads = None
        if self.node_index == 0:
            broken = self.exchange.broken
            if broken is not None:
                payloads = [broken] * len(members)
            else:
                got = self.exchange.collect(rnd, only=ROOT)
                if got is None:  # every rank of the saver detached (after a failure elsewhere)
                    got = Failure("the saver's ranks on node 0 detached from their writer service")
                if isinstance(got, Failure):
                    payloads = [got] * len(members)
                else:
                    kind, value = got
                    payloads = [(kind, {r: value[r] if kind == "scatter" else value for r in ranks})
                                for ranks in members]
        try:
            mine = comm.scatter(payloads)
        except Exception as exc:  # noqa: BLE001 - a node's service died or hung
            mine = self._lost(exc)
        if isinstance(mine, Failure):
            self.exchange.resolve(rnd, mine)
            return mine
        self.exchange.resolve(rnd, mine[1])
        return None

    def _lost(self, exc: BaseException) -> Failure:
        self._dead = True
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        log.error("writer services: the nodes' group failed: %s", why)
        return Failure(f"the writer services' group of the job's nodes failed (the writer service of another node "
                       f"died or did not answer within {2 * self.timeout_s:g}s): {why}", retire=True)
