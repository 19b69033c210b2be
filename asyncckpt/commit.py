"""The commit coordinator: agree across ranks, then publish atomically, or publish nothing.

Runs on its own thread (one per saver) so that blocking collectives never stall the I/O loop or the training
thread. With several ranks it talks over a dedicated gloo process group (timeout ``commit_timeout_s``),
never over the job's default (often NCCL) group, so background commits cannot interleave with training
collectives. Saves are serialised per saver, so every rank issues the same collectives in the same order.

Protocol for one save (docs/FORMAT.md has the crash-safety argument):

1. ``prepare``: all-gather (tag, save_dir) → tag validation; the publisher takes the lock file
   ``.<tag>.partial.lock`` (held until the save is published or given up), removes partial directories that
   are provably abandoned (see :func:`ownership.clean`) and creates ``.<tag>.partial/``; all-gather
   of the publishers' status (a barrier that carries errors).
2. every rank writes and fsyncs its files (writer.py), then ``commit``: all-gather each rank's outcome.
3. all ok → the publisher writes ``manifest.json``, fsyncs it and the partial dir, renames the partial dir to
   ``<tag>``, fsyncs ``save_dir``, replaces ``latest``; any failure → the partial directory is removed.
4. all-gather of the publishers' status: every rank's future resolves only after publication, or fails with
   the same :class:`CommitError`.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from . import __version__
from .durable import LockFile, exchange, fsync_dir, remove_tree, replace_atomic, write_durable
from .errors import CheckpointError, CommitError, CommitTimeoutError
from .format import FORMAT_NAME, FORMAT_VERSION, LATEST, MANIFEST, partial_dir_name, seal
from .io_types import RankOutcome
from .loader import read_latest
from .ownership import DELETING_SUFFIX, REPLACED_SUFFIX, claim, clean

log = logging.getLogger(__name__)

BUSY = "busy"  # a rank's prepare status when it had no free staging slot (on_busy: skip)


@dataclass
class DistContext:
    """Where this process sits in the job. ``group`` is the dedicated gloo group (None with one rank)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: str = field(default_factory=socket.gethostname)
    group: Any = None
    node_ranks: tuple[int, ...] = (0,)  # the ranks on this node, in order

    @classmethod
    def create(cls, timeout_s: float) -> "DistContext":
        """Join the job if torch.distributed is initialised; must be called collectively on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        rank, world = dist.get_rank(), dist.get_world_size()
        nodes: list = [None] * world
        dist.all_gather_object(nodes, socket.gethostname() + os.environ.get("ASYNCCKPT_NODE_SUFFIX", ""), group=group)
        me = nodes[rank]
        local = [r for r in range(world) if nodes[r] == me]
        return cls(rank, world, local.index(rank), len(local), me, group, tuple(local))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_gather(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # the default group may already be gone at interpreter exit
                pass
            self.group = None


@dataclass
class PublishInfo:
    path: str
    tag: str
    total_bytes_written: int
    phases: dict[str, float]


class CommitCoordinator:
    def __init__(self, ctx: DistContext, *, tag_validation: str = "fail", node_local: bool = False,
                 overwrite: bool = False, fsync: bool = True, keep_last: int = 0, timeout_s: float = 600.0):
        self.ctx = ctx
        self.tag_validation = tag_validation
        self.node_local = node_local
        self.overwrite = overwrite
        self.fsync = fsync
        self.keep_last = keep_last
        self.timeout_s = timeout_s
        self._cleaned: set[str] = set()
        self._claims: dict[str, LockFile] = {}  # partial directories this process is writing, and their locks
        self._published: dict[str, list[str]] = {}
        self._broken: str = ""  # set once a collective failed: the group can no longer be trusted

    @property
    def is_publisher(self) -> bool:
        return self.ctx.local_rank == 0 if self.node_local else self.ctx.rank == 0

    def copy_scope(self) -> tuple[int, ...]:
        """The ranks that together write one full copy of the replicated state (the node's ranks with
        node-local storage, else every rank)."""
        return self.ctx.node_ranks if self.node_local else tuple(range(self.ctx.world_size))

    def publisher_ranks(self, outcomes: list[RankOutcome]) -> list[int]:
        """The ranks whose files this rank's publisher covers."""
        if not self.node_local:
            return [o.rank for o in outcomes]
        return [o.rank for o in outcomes if o.node == self.ctx.node]

    # ------------------------------------------------------------------------------------ collectives
    def _gather(self, obj: Any, what: str) -> list:
        if self._broken:
            raise CommitError(f"checkpoint coordination is unusable after an earlier failure ({self._broken}); "
                              "recreate the saver")
        try:
            return self.ctx.all_gather(obj)
        except Exception as exc:  # gloo: a peer closed the connection (died) or the timeout expired (hung)
            self._broken = f"{what}: {exc}".splitlines()[0][:300]
            raise CommitTimeoutError(
                f"rank {self.ctx.rank}: {what} did not complete within commit_timeout_s={self.timeout_s:g}s or a "
                f"peer rank died or hung: {str(exc).splitlines()[0][:300]}") from exc

    # ---------------------------------------------------------------------------------------- prepare
    def prepare(self, save_dir: str, tag: str, status: str = "") -> str | None:
        """Agree on the tag, create the partial directory. Returns the tag every rank will use, or None when
        some rank could not stage this save (on_busy skip) so that every rank skips it. ``status`` is this
        rank's: "" (staged), BUSY, or the error that stopped it."""
        infos = self._gather((tag, os.path.abspath(save_dir), status), "tag validation")
        errors = {r: i[2] for r, i in enumerate(infos) if i[2] and i[2] != BUSY}
        if errors:
            raise CommitError(_describe(f"checkpoint {tag!r} was not started", errors), errors)
        if any(i[2] == BUSY for i in infos):
            busy = [r for r, i in enumerate(infos) if i[2] == BUSY]
            log.info("skipping checkpoint %r on every rank: rank(s) %s still busy with earlier saves", tag, busy)
            return None
        tags = [i[0] for i in infos]
        if len(set(tags)) > 1:
            detail = ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(tags))
            if self.tag_validation == "fail":
                raise CommitError(f"checkpoint tag differs across ranks ({detail}); tag_validation=fail")
            if self.tag_validation == "warn":
                log.warning("checkpoint tag differs across ranks (%s); publishing under rank 0's tag %r", detail, tags[0])
            tag = tags[0]
        status = ""
        local_error: OSError | None = None
        if self.is_publisher:
            try:
                self._make_partial(save_dir, tag)
            except OSError as exc:
                status = f"cannot create {os.path.join(save_dir, partial_dir_name(tag))}: {exc}"
                local_error = exc
        partial = os.path.join(save_dir, partial_dir_name(tag))
        try:
            statuses = self._gather((self.ctx.rank, status), "prepare")
        except BaseException:
            self._abandon(partial)
            raise
        failures = {r: s for r, s in statuses if s}
        if failures:  # this rank's own OS error (permission denied, ...) is the cause
            self._abandon(partial)
            raise CommitError(_describe("could not start checkpoint " + repr(tag), failures), failures) from local_error
        return tag

    def _make_partial(self, save_dir: str, tag: str) -> None:
        """Take the lock of ``.<tag>.partial``, clean up what earlier saves provably abandoned (once per
        ``save_dir``), create the partial directory. The lock is held until :meth:`commit` is done."""
        os.makedirs(save_dir, exist_ok=True)
        name = partial_dir_name(tag)
        partial = os.path.join(save_dir, name)
        lock = claim(save_dir, name, "save")
        try:
            if save_dir not in self._cleaned:
                self._cleaned.add(save_dir)
                clean(save_dir, own=name)
            if os.path.lexists(partial):  # its owner is gone: we could take its lock
                log.warning("removing leftover partial checkpoint %s (an earlier save did not finish)", partial)
                remove_tree(partial)
            os.makedirs(partial)
        except BaseException:
            lock.release(unlink=not os.path.lexists(partial))
            raise
        self._claims[partial] = lock

    def _release(self, partial: str) -> None:
        """Give up the lock of ``partial`` (this process is done with it). The lock file is removed with the
        directory; a directory still there stays behind with a free lock, for the next cleanup to remove."""
        lock = self._claims.pop(partial, None)
        if lock is not None:
            lock.release(unlink=not os.path.lexists(partial))

    def _abandon(self, partial: str) -> None:
        """A save this process started is given up before any rank wrote into it: remove it, release it."""
        if partial in self._claims:
            _remove_quietly(partial)
            self._release(partial)

    # ----------------------------------------------------------------------------------------- commit
    def commit(self, save_dir: str, tag: str, outcome: RankOutcome, save_latest: bool, manifest_extra: dict) -> PublishInfo:
        try:
            return self._commit(save_dir, tag, outcome, save_latest, manifest_extra)
        finally:
            self._release(os.path.join(save_dir, partial_dir_name(tag)))

    def _commit(self, save_dir: str, tag: str, outcome: RankOutcome, save_latest: bool,
                manifest_extra: dict) -> PublishInfo:
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        outcomes: list[RankOutcome] = self._gather(outcome, "gathering every rank's outcome")
        phases["gather"] = time.perf_counter() - t0
        failures = {o.rank: o.error for o in outcomes if not o.ok}
        if len({o.replicated_fp for o in outcomes}) > 1:  # the same verdict on every rank: all see all outcomes
            for o in outcomes:
                if o.replicated_fp != outcomes[0].replicated_fp:
                    failures.setdefault(o.rank, "its replicated state (keys and sizes) differs from rank 0's; "
                                                "every rank must hold the same replicated tensors")
        partial = os.path.join(save_dir, partial_dir_name(tag))
        final = os.path.join(save_dir, tag)
        status = ""
        publish_error: Exception | None = None
        t1 = time.perf_counter()
        if self.is_publisher:
            if failures:
                _remove_quietly(partial)
            else:
                try:
                    self._publish(save_dir, tag, outcomes, save_latest, manifest_extra)
                except Exception as exc:
                    status = f"publishing {final} failed: {type(exc).__name__}: {exc}"
                    publish_error = exc
                    _remove_quietly(partial)
        if not failures:
            statuses = self._gather((self.ctx.rank, status), "publication")
            failures = {r: s for r, s in statuses if s}
        phases["publish"] = time.perf_counter() - t1
        if failures:
            raise CommitError(_describe(f"checkpoint {tag!r} was not published (the previous checkpoint is intact)",
                                        failures), failures) from publish_error
        return PublishInfo(final, tag, sum(o.bytes_written for o in outcomes), phases)

    def _publish(self, save_dir: str, tag: str, outcomes: list[RankOutcome], save_latest: bool, extra: dict) -> None:
        partial = os.path.join(save_dir, partial_dir_name(tag))
        final = os.path.join(save_dir, tag)
        mine = set(self.publisher_ranks(outcomes))
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": __version__,
            "tag": tag, "world_size": self.ctx.world_size, "created_unix": time.time(),
            "node_local": self.node_local,
            "ranks": [{"rank": o.rank, "index": o.index_name, "xxh3": o.index_xxh3, "bytes": o.bytes_written}
                      for o in outcomes if o.rank in mine],
            **extra,
        }
        if self.node_local:
            manifest["ranks_present"] = sorted(mine)
        write_durable(os.path.join(partial, MANIFEST), seal(manifest), self.fsync)
        if self.fsync:
            fsync_dir(partial)
        old = old_lock = None
        if os.path.lexists(final):
            if not self.overwrite:
                raise FileExistsError(f"tag {tag!r} already exists in {save_dir} (set overwrite: true to replace it)")
            if exchange(partial, final):  # one atomic step: `final` is never missing, even in a crash
                old = partial
            else:  # two renames; a crash between them is repaired by the next save (see _clean)
                old = os.path.join(save_dir, f".{tag}{REPLACED_SUFFIX}")
                old_lock = claim(save_dir, os.path.basename(old), "replaced")
                try:
                    os.rename(final, old)
                except BaseException:
                    old_lock.release(unlink=True)
                    raise
        try:
            if old != partial:
                os.rename(partial, final)
            if self.fsync:
                fsync_dir(save_dir)
            if old is not None:
                remove_tree(old)
        finally:
            if old_lock is not None:
                old_lock.release(unlink=not os.path.lexists(old))
        if save_latest:
            try:
                replace_atomic(os.path.join(save_dir, LATEST), (tag + "\n").encode(), self.fsync)
            except OSError:
                if old is None:  # unpublish, so that a failed save leaves no tag (the caller removes the partial)
                    try:
                        os.rename(final, partial)
                    except OSError as exc:
                        log.warning("could not withdraw %s after updating %s failed: %s", final, LATEST, exc)
                raise

    def retain(self, save_dir: str, tag: str) -> None:
        """``keep_last``: after ``tag`` was published, remove the oldest tags this saver published beyond the
        newest N (never the one ``latest`` names). Runs after the save's future resolved: deleting gigabytes
        is not part of making the new checkpoint durable. Failures are logged, never raised."""
        if not self.is_publisher:
            return
        history = self._published.setdefault(save_dir, [])
        if tag in history:
            history.remove(tag)
        history.append(tag)
        if not self.keep_last or len(history) <= self.keep_last:
            return
        try:  # through the reader's checks: a FIFO, symlink or damaged `latest` must not steer deletion
            protected = read_latest(save_dir)
        except CheckpointError as exc:
            log.warning("keep_last: not removing anything this time: %s", exc)
            return
        for old in history[: len(history) - self.keep_last]:
            if old == protected:
                continue
            history.remove(old)
            doomed = os.path.join(save_dir, f".{old}{DELETING_SUFFIX}")
            lock = None
            try:
                lock = claim(save_dir, os.path.basename(doomed), "deleting")
                os.rename(os.path.join(save_dir, old), doomed)  # the tag disappears atomically...
                if self.fsync:
                    fsync_dir(save_dir)
                remove_tree(doomed)  # ...and its bytes afterwards
                log.info("keep_last=%d: removed checkpoint %s", self.keep_last, os.path.join(save_dir, old))
            except OSError as exc:
                log.warning("keep_last: could not remove %s: %s", os.path.join(save_dir, old), exc)
            finally:
                if lock is not None:
                    lock.release(unlink=not os.path.lexists(doomed))

    def close(self) -> None:
        for partial in list(self._claims):
            self._release(partial)
        self.ctx.close()


def _describe(head: str, failures: dict[int, str]) -> str:
    lines = [f"{head}; {len(failures)} rank(s) failed:"]
    lines += [f"  rank {r}: {why}" for r, why in sorted(failures.items())]
    return "\n".join(lines)


def _remove_quietly(path: str) -> None:
    try:
        remove_tree(path)
    except OSError as exc:
        log.warning("could not remove partial checkpoint %s: %s", path, exc)
