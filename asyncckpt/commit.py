"""The commit coordinator: agree across ranks, then publish atomically, or publish nothing.

Runs on its own thread (one per saver) so that blocking collectives never stall the I/O loop or the training
thread. With several ranks it talks over a dedicated gloo process group (timeout ``commit_timeout_s``),
never over the job's default (often NCCL) group, so background commits cannot interleave with training
collectives. Saves are serialised per saver, so every rank issues the same collectives in the same order.

Every step is one *round* (:meth:`CommitCoordinator._round`, over collectives.py): rank 0 gathers each rank's
small record, decides, and sends every rank one small verdict (a broadcast, or a scatter when node
publishers need their node's records). Rank 0 receives O(N) per save, every other rank O(1); there is no
all-gather on the save path.

Protocol for one save (docs/FORMAT.md has the crash-safety argument):

1. ``prepare``, round "tag validation": (tag, status, spec) of every rank. Rank 0's verdict: an error or a
   busy rank fails or skips the save everywhere; the tags are validated (``tag_validation``); the specs
   (sequence number, resolved save_dir, save_latest, overwrite, keep_last, codec, manifest fields such as
   global_steps) must be equal (:func:`agreement.spec_mismatches`), so that save k of one rank is never
   paired with save k+1 of another; rank 0's nonce becomes the ``save_id`` every node's manifest records.
   The publisher (rank 0, or each node's first rank with node-local storage: nodes.py says which node a
   rank is on and checks, with probe files, that node-local directories are not shared) takes the lock file
   ``.<tag>.partial.lock``, removes partial directories that are provably abandoned (see
   :func:`ownership.clean`) and creates ``.<tag>.partial/``; round "prepare": the publishers' status.
2. every rank writes and fsyncs its files (writer.py), then ``commit``: each rank sends its outcome and its
   elapsed time. Rank 0 checks ``save_deadline_s`` and the outcomes; any failure → the partial directories
   are removed.
3. shared storage, all ok → rank 0 writes ``manifest.json`` (with ``save_id`` and ``save_latest``), fsyncs it
   and the partial dir, renames the partial dir to ``<tag>`` (replacing an older one when ``overwrite``, or
   an orphan: :func:`orphan_reason`), fsyncs ``save_dir`` and replaces ``latest``, then sends every rank what
   it did: one round in all for the commit.
4. node-local storage: rank 0 sends each node's publisher its node's outcomes; each publishes its directory;
   round "publication" gathers what each did (:class:`_Publication`). When every node published, every
   publisher replaces its ``latest`` and a last round ("updating latest on every node") follows; when some
   node failed, every node withdraws its copy (unless it replaced an older one of that name). Every rank's
   future resolves only after publication, or fails with a :class:`CommitError` that says where the
   checkpoint was published and whether ``latest`` names it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import torch.distributed as dist

from .collectives import ROOT, Collectives, GlooCollectives
from .errors import CheckpointError, CommitError, CommitTimeoutError, ConfigError, WriteError
from .format import LATEST, MANIFEST, checksum, manifest_doc, partial_dir_name, seal
from .agreement import created, describe_views, rank_ranges, read_manifest, spec_mismatches
from .io_types import RankOutcome
from .nodes import check_nodes, other_nodes_here, remove_probe, this_node, write_probe
from .loader import list_tags, read_latest
from .owners import write_tables
from .ownership import DELETING_SUFFIX, REPLACED_SUFFIX, claim, clean
from .durable import LockFile
from .storage import MARKER, Storage, marker, open_storage

log = logging.getLogger(__name__)

BUSY = "busy"  # a rank's prepare status when it had no free staging slot (on_busy: skip)


@dataclass
class DistContext:
    """Where this process sits in the job. ``comm`` carries the saver's collectives (None with one rank): a
    dedicated gloo group by default (:meth:`create`), or any :class:`~asyncckpt.collectives.Collectives`
    (tests pass an in-process fake, :meth:`join`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: str = field(default_factory=socket.gethostname)
    comm: Collectives | None = None
    node_ranks: tuple[int, ...] = (0,)  # the ranks on this node, in order
    node_index: int = 0  # this node's position among the job's nodes (in the order of their first rank)
    nodes: tuple[str, ...] = ("",)  # the node of every rank: known on rank 0 only (the others hold ())
    job: str = ""  # rank 0's nonce: names this job's node probes (nodes.py)

    @classmethod
    def create(cls, timeout_s: float) -> "DistContext":
        """Join the job if torch.distributed is initialised; must be called collectively on every rank. The
        ranks are grouped into nodes by :func:`nodes.this_node` (torchrun's GROUP_RANK/LOCAL_RANK/
        LOCAL_WORLD_SIZE, else host name and boot id)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls.join(GlooCollectives(group, dist.get_rank(), dist.get_world_size()), this_node())

    @classmethod
    def join(cls, comm: Collectives, key: tuple) -> "DistContext":
        """Group the ranks of ``comm`` into nodes by each rank's :func:`nodes.this_node` ``key``: rank 0 gathers
        the keys, checks them (:func:`nodes.check_nodes`) and sends each rank its node alone, so that a rank
        receives O(ranks on its node), not O(ranks). ConfigError on every rank when the keys disagree."""
        keys = comm.gather((key, uuid.uuid4().hex))
        plans = names = None
        if comm.rank == ROOT:
            try:
                names = check_nodes([k[0] for k in keys])
                members: dict[str, list[int]] = {}
                for r, name in enumerate(names):
                    members.setdefault(name, []).append(r)
                index = {name: i for i, name in enumerate(members)}
                groups = {name: tuple(ranks) for name, ranks in members.items()}
                plans = [(name, index[name], groups[name], keys[0][1]) for name in names]
            except ConfigError as exc:
                plans = [str(exc)] * comm.world_size
        plan = comm.scatter(plans)
        if isinstance(plan, str):
            raise ConfigError(plan)
        node, node_index, local, job = plan
        return cls(comm.rank, comm.world_size, local.index(comm.rank), len(local), node, comm, local, node_index,
                   tuple(names) if names is not None else (), job)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None


@dataclass(frozen=True)
class Prepared:
    """A save every rank agreed to make: its tag and its identity (recorded in every node's manifest)."""

    tag: str
    save_id: str


@dataclass
class PublishInfo:
    path: str
    tag: str
    total_bytes_written: int
    phases: dict[str, float]


class CommitCoordinator:
    def __init__(self, ctx: DistContext, *, tag_validation: str = "fail", node_local: bool = False,
                 overwrite: bool = False, fsync: bool = True, keep_last: int = 0, timeout_s: float = 600.0,
                 save_deadline_s: float = 0.0, storage_for: Callable[[str], Storage] = open_storage):
        self.ctx = ctx
        self.storage_for = storage_for  # the storage of a save directory (storage/__init__.py)
        self.tag_validation = tag_validation
        self.node_local = node_local
        self.overwrite = overwrite
        self.fsync = fsync
        self.keep_last = keep_last
        self.timeout_s = timeout_s
        self.save_deadline_s = save_deadline_s  # 0: none
        self._cleaned: set[str] = set()
        self._probed: set[str] = set()  # save directories checked for being shared between nodes
        self._claims: dict[str, LockFile | None] = {}  # None: a marker-strategy tag (no lock)  # partial directories this process is writing, and their locks
        self._broken: str = ""  # set once a collective failed: the group can no longer be trusted

    @property
    def is_publisher(self) -> bool:
        return self.ctx.local_rank == 0 if self.node_local else self.ctx.rank == 0

    def copy_scope(self) -> tuple[int, int]:
        """(this rank's position, size) in the ranks that together write one full copy of the replicated state
        (the node's ranks with node-local storage, else every rank)."""
        if self.node_local:
            return self.ctx.local_rank, self.ctx.local_world_size
        return self.ctx.rank, self.ctx.world_size

    # ------------------------------------------------------------------------------------ collectives
    def _collective(self, step, obj: Any, what: str) -> Any:
        """``step(obj)``, one of the saver's collectives; CommitTimeoutError when a peer died or hung (then this
        coordinator refuses every later collective)."""
        if self._broken:
            raise CommitError(f"checkpoint coordination is unusable after an earlier failure ({self._broken}); "
                              "restart the job (a load agrees on the newest checkpoint every rank holds), or create "
                              "a new saver at a step every rank reaches after learning of the failure collectively "
                              "(creating one is a collective over the default group)")
        try:
            return step(obj)
        except Exception as exc:  # gloo: a peer closed the connection (died) or the timeout expired (hung)
            self._broken = f"{what}: {exc}".splitlines()[0][:300]
            raise CommitTimeoutError(
                f"rank {self.ctx.rank}: {what} did not complete within commit_timeout_s={self.timeout_s:g}s or a "
                f"peer rank died or hung: {str(exc).splitlines()[0][:300]}") from exc

    def _round(self, obj: Any, what: str, decide, scatter: bool = False) -> "_Verdict":
        """One step of a save: rank 0 gathers every rank's ``obj``, ``decide``s (every rank's objects, in rank
        order -> the verdict; with ``scatter``, one verdict per rank) and sends every rank its verdict. A rank
        other than rank 0 receives one small verdict, whatever the world size. An error while deciding fails
        the step on every rank (no rank is left waiting)."""
        comm = self.ctx.comm
        gathered = self._collective(comm.gather, obj, what) if comm is not None else [obj]
        verdict = None
        if comm is None or comm.rank == ROOT:
            try:
                verdict = decide(gathered)
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                log.exception("rank 0: deciding %s failed", what)
                why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                failed = _Verdict(error=f"checkpoint coordination failed on rank 0 ({what}): {why}", failures={0: why},
                                  refused=True)
                verdict = [failed] * self.ctx.world_size if scatter else failed
        if comm is None:
            return verdict[0] if scatter else verdict
        return self._collective(comm.scatter if scatter else comm.broadcast, verdict, what)

    def gather(self, obj: Any, what: str) -> list:
        """Every rank's ``obj`` (rank order) on every rank: O(world size) per rank, for a load's agreement only,
        never on the save path."""
        comm = self.ctx.comm
        return self._collective(comm.all_gather, obj, what) if comm is not None else [obj]

    def refusal_everywhere(self, error: str, what: str) -> str:
        """For a step that fails on every rank when it fails on one: ``error`` is this rank's refusal ("" when
        it has none); returns the same text on every rank, naming each rank that refused and why ("" when
        none did). Called collectively."""
        head = f"not every rank can go on ({what})"
        return self._round(error, what, lambda errors: _failed(head, dict(enumerate(errors)))).error

    # ---------------------------------------------------------------------------------------- prepare
    def prepare(self, save_dir: str, tag: str, status: str = "", spec: dict | None = None) -> Prepared | None:
        """Agree on the tag and the save identity, create the partial directory. Returns the tag every rank will
        use and the save id (rank 0's nonce), or None when some rank could not stage this save (on_busy skip)
        so that every rank skips it. ``status`` is this rank's: "" (staged), BUSY, or the error that stopped it.
        ``spec`` is what every rank must agree on besides the tag (see :func:`agreement.spec_mismatches`)."""
        st = self.storage_for(save_dir)
        probe = self._probe(save_dir)
        try:
            agreed = self._round((tag, status, spec), "tag validation", lambda infos: self._agree(tag, infos))
        except BaseException:
            remove_probe(probe)
            raise
        if agreed.warning:
            log.warning("%s", agreed.warning)
        if agreed.error or agreed.skip:
            remove_probe(probe)
            if agreed.error:
                raise CommitError(agreed.error, agreed.failures)
            log.info("%s", agreed.skip)
            return None
        tag = agreed.tag
        status = ""
        local_error: OSError | None = None
        if self.is_publisher:
            shared = other_nodes_here(save_dir, self.ctx.job, self.ctx.node_index) if probe else []
            if shared:
                status = (f"use_node_local_storage is set, but {save_dir} is shared with node(s) {shared} (their "
                          "probe files are visible here): give each node a directory of its own, or turn "
                          "use_node_local_storage off")
            else:
                try:
                    self._make_partial(save_dir, tag)
                except OSError as exc:
                    status = f"cannot create {st.staging_dir(save_dir, tag)}: {exc}"
                    local_error = exc
        partial = st.staging_dir(save_dir, tag)
        head = "could not start checkpoint " + repr(tag)
        try:
            started = self._round(status, "prepare", lambda statuses: _failed(head, dict(enumerate(statuses))))
        except BaseException:
            self._abandon(partial)
            raise
        finally:
            remove_probe(probe)
        if started.error:  # this rank's own OS error (permission denied, ...) is the cause
            self._abandon(partial)
            raise CommitError(started.error, started.failures) from local_error
        return Prepared(tag, agreed.save_id)

    def _agree(self, tag: str, infos: list[tuple]) -> "_Verdict":
        """Rank 0: the verdict on every rank's (tag, status, spec) of one save."""
        errors = {r: i[1] for r, i in enumerate(infos) if i[1] and i[1] != BUSY}
        if errors:
            return _failed(f"checkpoint {tag!r} was not started", errors)
        busy = [r for r, i in enumerate(infos) if i[1] == BUSY]
        if busy:
            return _Verdict(skip=f"skipping checkpoint {tag!r} on every rank: {rank_ranges(busy)} still busy with "
                                 "earlier saves")
        groups = [self.ctx.nodes[r] if self.node_local else "" for r in range(len(infos))]
        mismatches = spec_mismatches([i[2] or {} for i in infos], groups)
        if mismatches:
            return _Verdict(error=f"checkpoint {tag!r} was not started: the ranks are not making the same save "
                                  f"({'; '.join(mismatches)})", failures={r: "differs" for r in range(len(infos))})
        tags = {r: i[0] for r, i in enumerate(infos)}
        warning = ""
        if len(set(tags.values())) > 1:
            detail = describe_views({r: repr(t) for r, t in tags.items()})
            if self.tag_validation == "fail":
                return _Verdict(error=f"checkpoint tag differs across ranks ({detail}); tag_validation=fail")
            if self.tag_validation == "warn":
                warning = f"checkpoint tag differs across ranks ({detail}); publishing under rank 0's tag {tag!r}"
        return _Verdict(tag=tag, save_id=uuid.uuid4().hex, warning=warning)

    def _probe(self, save_dir: str) -> str:
        """Node-local storage, a publisher's first save to ``save_dir``: write this node's probe file (see
        nodes.py) before the first collective; the caller removes it after the second. "" otherwise."""
        if not (self.node_local and self.is_publisher and self.ctx.distributed) or save_dir in self._probed:
            return ""
        self._probed.add(save_dir)
        try:
            return write_probe(save_dir, self.ctx.job, self.ctx.node_index)
        except OSError:  # reported by _make_partial, which fails the same way
            return ""

    def _make_partial(self, save_dir: str, tag: str) -> None:
        """Take the lock of ``.<tag>.partial``, clean up what earlier saves provably abandoned (once per
        ``save_dir``), create the partial directory. The lock is held until :meth:`commit` is done. With the
        marker strategy: make ``<tag>/`` ready (:func:`storage.marker.begin`); there are no locks."""
        st = self.storage_for(save_dir)
        first = save_dir not in self._cleaned
        self._cleaned.add(save_dir)
        if st.strategy == MARKER:
            marker.begin(st, save_dir, tag, self.overwrite, clean_first=first)
            self._claims[st.staging_dir(save_dir, tag)] = None
            return
        st.makedirs(save_dir)
        name = partial_dir_name(tag)
        partial = os.path.join(save_dir, name)
        lock = claim(st, save_dir, name, "save", self.fsync)
        try:
            if first:
                clean(st, save_dir, own=name)
            if st.exists(partial):  # its owner is gone: we could take its lock
                log.warning("removing leftover partial checkpoint %s (an earlier save did not finish)", partial)
                st.remove_tree(partial)
            st.makedirs(partial)
        except BaseException:
            lock.release(unlink=not st.exists(partial))
            raise
        self._claims[partial] = lock

    def _release(self, partial: str) -> None:
        """Give up the lock of ``partial`` (this process is done with it). The lock file is removed with the
        directory; a directory still there stays behind with a free lock, for the next cleanup to remove."""
        lock = self._claims.pop(partial, None)
        if lock is not None:
            lock.release(unlink=not os.path.lexists(partial))  # a lock exists on POSIX storage only

    def _abandon(self, partial: str) -> None:
        """A save this process started is given up before any rank wrote into it: remove it, release it."""
        if partial in self._claims:
            _remove_quietly(self.storage_for(partial), partial)
            self._release(partial)

    # ----------------------------------------------------------------------------------------- commit
    def commit(self, save_dir: str, tag: str, outcome: RankOutcome, save_latest: bool, manifest_extra: dict,
               save_id: str = "", started: float | None = None, replicated_sums: dict[str, str] | None = None
               ) -> PublishInfo:
        """Publish the save every rank wrote, or nothing. ``started`` (``time.perf_counter()``) is when this
        rank's save call began: with ``save_deadline_s``, the slowest rank's elapsed time decides, on every
        rank alike, whether the save is still published. ``replicated_sums`` (``verify_replicated``): this
        rank's checksum of its copy of each replicated tensor; a copy that differs from rank 0's fails the
        save on every rank."""
        try:
            return self._commit(save_dir, tag, outcome, save_latest, {**manifest_extra, "save_id": save_id},
                                started, replicated_sums)
        finally:
            self._release(self.storage_for(save_dir).staging_dir(save_dir, tag))

    def _commit(self, save_dir: str, tag: str, outcome: RankOutcome, save_latest: bool,
                manifest_extra: dict, started: float | None, replicated_sums: dict[str, str] | None) -> PublishInfo:
        """Shared storage: rank 0 gathers the outcomes, publishes (or not) and broadcasts what it did: one
        round. Node-local storage: rank 0 gathers the outcomes and sends each node's publisher its node's;
        the publishers publish their directories; rank 0 gathers what they did and tells every rank to put
        ``latest`` in place everywhere (then one more round) or to withdraw every copy."""
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        elapsed = t0 - started if started is not None else 0.0
        mine = _Publication()
        digest = _digest(replicated_sums)  # one checksum of all of them: O(1) bytes per rank unless they differ
        decide = (lambda gathered: self._judge(save_dir, tag, gathered, save_latest, manifest_extra, mine))
        try:
            verdict = self._round((outcome, elapsed, digest), "gathering every rank's outcome" if self.node_local else
                                  "publication", decide, scatter=self.node_local)
        except CommitTimeoutError as exc:
            if self.node_local:  # nothing was published yet
                raise
            raise self._unknown(exc, tag, mine) from exc  # rank 0 may have published before a peer died
        if verdict.recheck:  # some rank's replicated tensors differ from rank 0's: find which, on which ranks
            sums = replicated_sums if self.ctx.rank == ROOT or digest != verdict.recheck else None
            verdict = self._round(sums, "comparing replicated tensors", lambda every: _replicas_differ(tag, every))
        phases["gather"] = time.perf_counter() - t0
        if verdict.refused and self.is_publisher:
            st = self.storage_for(save_dir)
            _remove_quietly(st, st.staging_dir(save_dir, tag))
        if verdict.error:
            kind = CommitTimeoutError if verdict.timeout else CommitError
            raise kind(verdict.error, verdict.failures) from mine.exc
        t1 = time.perf_counter()
        if self.node_local:
            self._publish_on_nodes(save_dir, tag, verdict, save_latest, manifest_extra, mine)
        phases["publish"] = time.perf_counter() - t1
        return PublishInfo(self.storage_for(save_dir).join(save_dir, tag), tag, verdict.total_bytes, phases)

    def _judge(self, save_dir: str, tag: str, gathered: list[tuple[RankOutcome, float, str]], save_latest: bool,
               extra: dict, mine: "_Publication"):
        """Rank 0: every rank's (outcome, elapsed time, replicated digest) -> the save's verdict. With shared
        storage rank 0 publishes here, before the verdict goes out; with node-local storage each publisher
        gets its node's outcomes."""
        outcomes = [g[0] for g in gathered]
        verdict = self._check_deadline(tag, [g[1] for g in gathered]) or self._check_outcomes(tag, outcomes)
        if verdict is None and any(g[2] != gathered[0][2] for g in gathered):
            verdict = _Verdict(recheck=gathered[0][2] or "-", refused=True)
        if verdict is None:
            verdict = _Verdict(total_bytes=sum(o.bytes_written for o in outcomes))
            if not self.node_local:
                mine.run(lambda: self._publish(save_dir, tag, outcomes, save_latest, save_latest, extra, mine))
                if mine.error:
                    verdict = _failed(_publication_text(tag, {ROOT: mine}, save_latest), {ROOT: mine.error})
        if not self.node_local:
            return verdict
        plans = [verdict] * len(outcomes)
        if not verdict.error:
            by_node: dict[str, list[RankOutcome]] = {}
            for o in outcomes:
                by_node.setdefault(o.node, []).append(o)
            for node, members in by_node.items():
                plans[members[0].rank] = dataclasses.replace(verdict, outcomes=members)
        return plans

    def _check_deadline(self, tag: str, elapsed: list[float]) -> "_Verdict | None":
        """``save_deadline_s``: rank 0 sees every rank's elapsed time and takes the verdict for every rank, so
        that no rank publishes while another gives up. The saver's group stays usable: the next save runs."""
        slowest = max(range(len(elapsed)), key=lambda r: (elapsed[r], -r))
        if not self.save_deadline_s or elapsed[slowest] <= self.save_deadline_s:
            return None
        why = f"{elapsed[slowest]:.3g}s since its save call, more than save_deadline_s={self.save_deadline_s:g}s"
        return _Verdict(error=f"checkpoint {tag!r} was not published (the previous checkpoint is intact): rank "
                              f"{slowest} (the slowest) took {why}; every rank gives this save up, and later saves "
                              "run as usual", failures={slowest: why}, timeout=True, refused=True)

    def _check_outcomes(self, tag: str, outcomes: list[RankOutcome]) -> "_Verdict | None":
        failures = {o.rank: o.error for o in outcomes if not o.ok}
        for o in outcomes:
            if o.replicated_fp != outcomes[0].replicated_fp:
                failures.setdefault(o.rank, "its replicated state (keys and sizes) differs from rank 0's; every "
                                            "rank must hold the same replicated tensors")
        if not failures:
            return None
        return dataclasses.replace(
            _failed(f"checkpoint {tag!r} was not published (the previous checkpoint is intact)", failures),
            refused=True)

    def _publish_on_nodes(self, save_dir: str, tag: str, verdict: "_Verdict", save_latest: bool, extra: dict,
                          mine: "_Publication") -> None:
        """Node-local storage: every node's publisher publishes its directory; when every node did, every
        publisher points its ``latest`` at it (two phases); when some node failed, every node withdraws its
        copy (unless it replaced an older one of that name)."""
        if self.is_publisher:
            mine.run(lambda: self._publish(save_dir, tag, verdict.outcomes, save_latest, False, extra, mine))
        decide = (lambda states: self._after_publication(tag, states, save_latest, save_latest, withdraw=True))
        verdict = self._round_after_publishing(mine, tag, "publication", decide)
        if verdict.withdraw:
            if self.is_publisher and mine.published and not mine.replaced:
                mine.run(lambda: self._locked(save_dir, self._withdraw, save_dir, tag, mine))
        elif verdict.latest:
            if self.is_publisher:
                mine.run(lambda: self._locked(save_dir, self._publish_latest, save_dir, tag, mine))
            decide = (lambda states: self._after_publication(tag, states, save_latest, False, withdraw=False))
            verdict = self._round_after_publishing(mine, tag, "updating latest on every node", decide)
        if verdict.error:
            raise CommitError(verdict.error, verdict.failures) from mine.exc

    def _round_after_publishing(self, mine: "_Publication", tag: str, what: str, decide: Callable) -> "_Verdict":
        """A round once publishers may have published: a timeout leaves the outcome unknown (:meth:`_unknown`)."""
        try:
            return self._round(mine, what, decide)
        except CommitTimeoutError as exc:
            raise self._unknown(exc, tag, mine) from exc

    def _after_publication(self, tag: str, states: list["_Publication"], save_latest: bool, then_latest: bool,
                           withdraw: bool) -> "_Verdict":
        """Rank 0, node-local storage: what every publisher does next, from what each one did. When one failed
        and ``withdraw``, every publisher takes its copy back, unless it replaced an older one (which is gone);
        a failure to update ``latest`` has already withdrawn that node's copy (:meth:`_publish_latest`)."""
        failures = {r: st.error for r, st in enumerate(states) if st.error}
        if not failures:
            return _Verdict(latest=then_latest)
        after = {r: dataclasses.replace(st, published=st.published and (st.replaced or not withdraw))
                 for r, st in enumerate(states) if st.published or st.replaced}
        return dataclasses.replace(_failed(_publication_text(tag, after, save_latest), failures), withdraw=withdraw)

    def _unknown(self, exc: CommitTimeoutError, tag: str, mine: "_Publication") -> CommitTimeoutError:
        """A collective after publishing failed: the error says what this rank knows."""
        if not self.is_publisher:
            publisher = self.ctx.node_ranks[0] if self.node_local else ROOT
            known = (f"this rank does not know whether its publisher (rank {publisher}) published it: read "
                     f"{LATEST} to find out")
        elif mine.error:
            known = f"this rank did not publish it: {mine.error}"
        elif not mine.published:
            known = "this rank did not publish it"
        else:
            known = "this rank published it" + (f" and {LATEST} names it" if mine.latest else f" ({LATEST} not updated)")
        return CommitTimeoutError(f"checkpoint {tag!r}: {exc}; {known}")

    def _locked(self, save_dir: str, step, *args) -> None:
        with self._dir_lock(save_dir):
            step(*args)

    def _publish(self, save_dir: str, tag: str, outcomes: list[RankOutcome], save_latest: bool, with_latest: bool,
                 extra: dict, state: "_Publication") -> None:
        """Put the tag directory in place and, ``with_latest``, point ``latest`` at it: one step under the
        directory's lock, so that keep_last never removes a tag in between."""
        with self._dir_lock(save_dir):
            self._publish_dir(save_dir, tag, outcomes, save_latest, extra, state)
            if state.published and with_latest:
                self._publish_latest(save_dir, tag, state)

    def _publish_dir(self, save_dir: str, tag: str, outcomes: list[RankOutcome], save_latest: bool, extra: dict,
                     state: "_Publication") -> None:
        """Write the manifest and put the tag directory in place (replacing an older one of that name when
        allowed); ``latest`` is not touched. With the marker strategy the manifest is the commit marker."""
        st = self.storage_for(save_dir)
        partial = st.staging_dir(save_dir, tag)
        final = st.join(save_dir, tag)
        mine = {o.rank for o in outcomes}  # the ranks whose files this publisher covers
        created_unix = time.time()
        try:
            tables = write_tables(partial, [(o.rank, o.index_name, o.index_xxh3, o.bytes_written)
                                            for o in outcomes if o.rank in mine], self.fsync, storage=st)
            manifest = manifest_doc(tag=tag, world_size=self.ctx.world_size, created_unix=created_unix,
                                    node_local=self.node_local, save_latest=save_latest, tables=tables, extra=extra)
            if st.strategy == MARKER:
                marker.publish(st, save_dir, tag, seal(manifest))
                state.published = True
                return
            st.write_durable(os.path.join(partial, MANIFEST), seal(manifest), self.fsync)
            if self.fsync:
                st.fsync_dir(partial)
            old = old_lock = None
            if st.exists(final):
                if not self.overwrite and not orphan_reason(save_dir, tag):
                    raise FileExistsError(f"tag {tag!r} already exists in {save_dir} (set overwrite: true to replace it)")
                if st.exchange(partial, final):  # one atomic step: `final` is never missing, even in a crash
                    old = partial
                else:  # two renames; a crash between them is repaired by the next save (see ownership.clean)
                    old = os.path.join(save_dir, f".{tag}{REPLACED_SUFFIX}")
                    old_lock = claim(st, save_dir, os.path.basename(old), "replaced", self.fsync)
                    try:
                        st.rename(final, old)
                    except BaseException:
                        old_lock.release(unlink=True)
                        raise
            try:
                if old != partial:
                    st.rename(partial, final)
                state.published, state.replaced = True, old is not None
                if self.fsync:
                    st.fsync_dir(save_dir)
                if old is not None:
                    st.remove_tree(old)
                    if self.fsync:  # the removal is durable before the lock file of `old` goes
                        st.fsync_dir(save_dir)
            finally:
                if old_lock is not None:
                    old_lock.release(unlink=not st.exists(old))
        finally:
            if not state.published:
                _remove_quietly(st, partial)

    def _publish_latest(self, save_dir: str, tag: str, state: "_Publication") -> None:
        """Point ``latest`` at the published tag; when that fails, withdraw the tag (unless it replaced an older
        one of that name, which is gone)."""
        try:
            st = self.storage_for(save_dir)
            st.replace_atomic(st.join(save_dir, LATEST), (tag + "\n").encode(), self.fsync)
        except OSError:
            if not state.replaced:
                self._withdraw(save_dir, tag, state)
            raise
        state.latest = True

    def _withdraw(self, save_dir: str, tag: str, state: "_Publication") -> None:
        """Take a tag this save published back out (another node, or ``latest``, failed), so that no tag is
        left that ``latest`` never named."""
        st = self.storage_for(save_dir)
        partial = st.staging_dir(save_dir, tag)
        try:
            if st.strategy == MARKER:
                st.remove_file(marker.marker_path(st, save_dir, tag))
            else:
                st.rename(os.path.join(save_dir, tag), partial)
        except OSError as exc:
            log.warning("could not withdraw %s: %s", st.join(save_dir, tag), exc)
            return
        state.published = False
        _remove_quietly(st, partial)

    def retain(self, save_dir: str, tag: str) -> None:
        """``keep_last``: after ``tag`` was published, remove every published tag of ``save_dir`` but the newest
        N by their manifest's ``created_unix`` (tags of earlier runs and of other savers included), never the
        one ``latest`` names and never one whose manifest cannot be read. Each removal holds the directory's
        lock (:func:`save_dir_lock`), so that it never interleaves with a publish. Runs after the save's future
        resolved: deleting gigabytes is not part of making the new checkpoint durable. Failures are logged,
        never raised. With the marker strategy (no locks: retention runs only in the one publisher) a tag is
        removed by deleting its marker first (:func:`storage.marker.retire`)."""
        if not self.is_publisher or not self.keep_last:
            return
        st = self.storage_for(save_dir)
        try:
            ages = self._ages(st, save_dir)
        except CheckpointError as exc:
            log.warning("keep_last: not removing anything this time: %s", exc)
            return
        newest = sorted(ages, key=lambda t: (ages[t], t), reverse=True)
        for old in newest[self.keep_last:]:
            if st.strategy == MARKER:
                self._retire_marked(st, save_dir, old, ages[old])
                continue
            doomed = os.path.join(save_dir, f".{old}{DELETING_SUFFIX}")
            lock = None
            try:
                lock = claim(st, save_dir, os.path.basename(doomed), "deleting", self.fsync)
                with self._dir_lock(save_dir):
                    # under the lock, through the reader's checks: a FIFO, symlink or damaged `latest` must not
                    # steer deletion, and a tag published again since the listing is not the old one any more
                    if read_latest(save_dir) == old or created(read_manifest(save_dir, old)[0]) != ages[old]:
                        continue
                    st.rename(os.path.join(save_dir, old), doomed)  # the tag disappears atomically...
                    if self.fsync:
                        st.fsync_dir(save_dir)
                st.remove_tree(doomed)  # ...and its bytes afterwards, without holding up a publish
                if self.fsync:  # the removal is durable before its lock file goes
                    st.fsync_dir(save_dir)
                log.info("keep_last=%d: removed checkpoint %s", self.keep_last, os.path.join(save_dir, old))
            except CheckpointError as exc:
                log.warning("keep_last: not removing anything more this time: %s", exc)
                return
            except OSError as exc:
                log.warning("keep_last: could not remove %s: %s", os.path.join(save_dir, old), exc)
            finally:
                if lock is not None:
                    lock.release(unlink=not st.exists(doomed))

    def _retire_marked(self, st: Storage, save_dir: str, old: str, age: float) -> None:
        """keep_last on the marker strategy: remove ``old`` unless ``latest`` names it or it was published again."""
        try:
            if read_latest(save_dir, storage=st) == old or marker.created(st, save_dir, old) != age:
                return
            marker.retire(st, save_dir, old)
            log.info("keep_last=%d: removed checkpoint %s", self.keep_last, st.join(save_dir, old))
        except (CheckpointError, OSError) as exc:
            log.warning("keep_last: could not remove %s: %s", st.join(save_dir, old), exc)

    def _ages(self, st: Storage, save_dir: str) -> dict[str, float]:
        """The creation time of every published tag of ``save_dir`` whose manifest is readable (the others are
        logged and never removed). CheckpointError when ``latest`` cannot be trusted."""
        read_latest(save_dir, storage=st)
        ages: dict[str, float] = {}
        for name in list_tags(save_dir, storage=st):
            try:
                ages[name] = (marker.created(st, save_dir, name) if st.strategy == MARKER else
                              created(read_manifest(save_dir, name)[0]))
            except CheckpointError as exc:
                log.warning("keep_last: keeping %s, its manifest cannot be read: %s", st.join(save_dir, name), exc)
        return ages

    def _dir_lock(self, save_dir: str):
        """:func:`save_dir_lock` on POSIX storage; nothing on an object store (one publisher, no locks)."""
        if not self.storage_for(save_dir).local:
            return contextlib.nullcontext()
        return save_dir_lock(save_dir, self.timeout_s)

    def close(self) -> None:
        for partial in list(self._claims):
            self._release(partial)
        self.ctx.close()


@dataclass
class _Publication:
    """What one rank's publisher did with a save (gathered, so that every rank's error says exactly where the
    checkpoint was published): its tag directory is in place, it replaced an older directory of that name
    (which is gone), ``latest`` names it; or the error that stopped it."""

    published: bool = False
    replaced: bool = False
    latest: bool = False
    error: str = ""
    exc: Exception | None = field(default=None, compare=False)

    def run(self, step) -> None:
        try:
            step()
        except Exception as exc:
            self.error = self.error or f"publishing failed: {type(exc).__name__}: {exc}"
            self.exc = exc

    def __getstate__(self):  # the exception stays on this rank
        return {**self.__dict__, "exc": None}


def _publication_text(tag: str, states: dict[int, _Publication], save_latest: bool) -> str:
    """Where ``tag`` was published, for the error of a save that failed while publishing (``states``: what
    each publisher that published, replaced or failed did, by rank)."""
    published = sorted(r for r, st in states.items() if st.published)
    replaced = sorted(r for r, st in states.items() if st.replaced)
    gone = (f"; the older checkpoint named {tag!r} was replaced by publisher(s) {rank_ranges(replaced)} and is "
            "gone there") if replaced else ""
    if not published:
        return f"checkpoint {tag!r} was not published (the previous checkpoint is intact){gone}"
    named = [r for r in published if states[r].latest]
    where = (f"checkpoint {tag!r} was published by publisher(s) {rank_ranges(published)} only"
             + (f", and {LATEST} names it there ({rank_ranges(named)})" if named else
                f"; {LATEST} was not updated" if save_latest else ""))
    return where + gone + "; a load agrees on the newest checkpoint every node holds"


def orphan_reason(save_dir: str, tag: str) -> str:
    """Why the published ``tag`` is an orphan, or "" when it is not. An orphan is what a crash between
    publishing a tag and updating ``latest`` leaves: its manifest says ``save_latest`` was asked for, yet
    ``latest`` does not name it and names nothing newer. A replayed run reaches the same tag again and replaces
    it (with a warning) instead of failing with TagExistsError on every restart."""
    try:
        doc, _ = read_manifest(save_dir, tag)
        named = read_latest(save_dir)
        if doc.get("save_latest") is not True or named == tag:
            return ""
        if named is not None and created(read_manifest(save_dir, named)[0]) >= created(doc):
            return ""
    except CheckpointError:  # unreadable: not provably an orphan
        return ""
    latest = "there is no latest file" if named is None else f"{LATEST} names the older {named!r}"
    return (f"checkpoint {os.path.join(save_dir, tag)} was published but {latest} (a crash between publishing "
            "it and updating latest); replacing it")


@contextlib.contextmanager
def save_dir_lock(save_dir: str, timeout_s: float):
    """Exclusive use of ``save_dir`` for a step that changes which tags it holds: a publisher's rename and
    ``latest`` update, or the removal of one tag by ``keep_last``. An ``flock`` on the directory itself (no
    file is left behind), waited for at most ``timeout_s`` (then OSError EBUSY). Where the file system has no
    flock on directories, the step runs without exclusion."""
    fd = os.open(save_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OSError(errno.EBUSY, f"{save_dir} stayed locked by another saver (publishing, or keep_last "
                                               f"removing a tag) for {timeout_s:g}s") from None
                time.sleep(_LOCK_POLL_S)
            except OSError as exc:
                if exc.errno not in _NO_DIR_FLOCK:
                    raise
                break
        yield
    finally:
        os.close(fd)


_LOCK_POLL_S = 0.01
_NO_DIR_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF)


def raise_for_rank(exc: CommitError, rank: int, step: str, own: BaseException | None = None) -> NoReturn:
    """Raise the error this rank raises for a save that failed with ``exc`` (the CommitError every rank holds),
    by one rule for every world size: the rank whose own step failed raises the error of that fault; every
    other rank raises ``exc``, whose ``failures`` name the ranks at fault. The fault is ``own``, this rank's
    failed write (a CheckpointError, such as a torn snapshot or a state a load would refuse, is raised as it
    is; any other error as a WriteError chaining it), or else the OS error that stopped this rank's prepare or
    publish step (``exc.__cause__``; a WriteError chaining it). ``step`` says what failed, with the tag and the
    directory ("writing checkpoint 't' in /dir"). The WriteError's text ends with ``exc``'s (whether the
    checkpoint was published anywhere, which other ranks failed). Called in the handler of ``exc``, which
    becomes the ``__context__`` of what is raised."""
    cause = own if own is not None else exc.__cause__
    if own is None and (isinstance(exc, CommitTimeoutError) or not isinstance(cause, OSError)):
        raise exc  # not this rank's own fault: a peer's, a timeout, a refused save
    if isinstance(cause, CheckpointError):
        raise cause from exc
    raise WriteError(f"{step} failed on rank {rank}: {cause}\n{exc}") from cause


def _describe(head: str, failures: dict[int, str]) -> str:
    """``head`` and one line per cause, naming the ranks that failed of it (ranges: many ranks stay short)."""
    causes: dict[str, list[int]] = {}
    for r, why in sorted(failures.items()):
        causes.setdefault(why, []).append(r)
    lines = [f"{head}; {len(failures)} rank(s) failed:"]
    lines += [f"  {rank_ranges(ranks)}: {why}" for why, ranks in list(causes.items())[:_CAUSES_SHOWN]]
    if len(causes) > _CAUSES_SHOWN:
        rest = sum(len(ranks) for ranks in list(causes.values())[_CAUSES_SHOWN:])
        lines.append(f"  ... and {rest} more rank(s) with other causes (CommitError.failures lists every rank)")
    return "\n".join(lines)


_CAUSES_SHOWN = 32


def _failed(head: str, failures: dict[int, str]) -> "_Verdict":
    """The verdict of a step that failed on the ranks in ``failures`` (rank -> cause; empty: none failed)."""
    failures = {r: why for r, why in failures.items() if why}
    return _Verdict(error=_describe(head, failures), failures=failures) if failures else _Verdict()


@dataclass
class _Verdict:
    """Rank 0's decision on one step of a save, sent to every rank: small, whatever the world size (unless
    the step failed on many ranks: then ``failures`` names each)."""

    error: str = ""  # the save fails on every rank with this text...
    failures: dict[int, str] = field(default_factory=dict)  # ...naming these ranks
    timeout: bool = False  # ...as a CommitTimeoutError (save_deadline_s)
    refused: bool = False  # failed before anything was published: the publishers remove their partial directory
    skip: str = ""  # on_busy skip: every rank skips the save (logged)
    warning: str = ""  # logged on every rank
    tag: str = ""  # prepare: the tag every rank uses...
    save_id: str = ""  # ...and the save's identity
    total_bytes: int = 0  # commit: the bytes every rank wrote
    outcomes: list[RankOutcome] = field(default_factory=list)  # node-local storage: a publisher's node's ranks
    recheck: str = ""  # verify_replicated: rank 0's digest; the ranks whose digest differs send their checksums
    withdraw: bool = False  # node-local storage: some node failed; every publisher takes its copy back
    latest: bool = False  # node-local storage: every node published; every publisher updates latest


def _digest(sums: dict[str, str] | None) -> str:
    """One checksum of a rank's checksums of its replicated tensors ("" when it checks none)."""
    if not sums:
        return ""
    return checksum("".join(f"{k}\0{v}\n" for k, v in sorted(sums.items())).encode())


def _replicas_differ(tag: str, sums: list[dict[str, str] | None]) -> _Verdict:
    """Rank 0 (verify_replicated): which replicated tensors differ from rank 0's copy, on which ranks (None:
    that rank's copies all agree with rank 0's)."""
    reference = sums[ROOT] or {}
    differ: dict[str, list[int]] = {}
    for rank, theirs in enumerate(sums):
        if rank == ROOT or theirs is None:
            continue
        for key in sorted(set(reference) | set(theirs)):
            if theirs.get(key) != reference.get(key):
                differ.setdefault(key, []).append(rank)
    failures: dict[int, list[str]] = {}
    for key, ranks in differ.items():
        for rank in ranks:
            failures.setdefault(rank, []).append(key)
    shown = "; ".join(f"{key!r} on {rank_ranges(ranks)}" for key, ranks in list(differ.items())[:_CAUSES_SHOWN])
    more = f"; and {len(differ) - _CAUSES_SHOWN} more tensor(s)" if len(differ) > _CAUSES_SHOWN else ""
    return _Verdict(
        error=f"checkpoint {tag!r} was not published (the previous checkpoint is intact): replicated tensors "
              f"differ from rank 0's copy (verify_replicated): {shown}{more}. Replicated state must be identical "
              "on every rank: mark state a rank changes locally as rank-local, or find what diverged",
        failures={r: f"its copy of replicated tensor(s) {', '.join(map(repr, keys[:8]))}"
                     f"{' ...' if len(keys) > 8 else ''} differs from rank 0's" for r, keys in sorted(failures.items())},
        refused=True)


def _remove_quietly(st: Storage, path: str) -> None:
    try:
        st.remove_tree(path)
    except OSError as exc:
        log.warning("could not remove partial checkpoint %s: %s", path, exc)
