"""A rank's side of the writer service: start or join the node's service, hand saves over, learn results.

:meth:`ServiceClient.submit` is what the engine calls instead of running a save on its own I/O loop: once
the staged bytes are valid (at once on CPU; after the device copy on CUDA) the descriptor goes to the service
on a handover thread, and on CPU ``save`` returns only after it went, so that a training process killed as
soon as ``save`` returned has still handed its save over. A reader thread resolves each save's future from
the service's replies and frees its staging slot when the service says the bytes are written. When the
service dies, every pending future fails with a :class:`CommitError` (socket end of stream) and the next
save starts a new service."""
from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

from .. import errors
from ..commit import DistContext
from ..config import Config
from ..errors import CheckpointError, CommitError
from ..io_types import SaveJob, SaveResult
from ..staging import Snapshot, ready_now
from ..threads import start_thread, started_pool
from .link import job_rendezvous
from .paths import job_id, lock_path, log_path, runtime_dir, service_key, socket_path
from .protocol import PROTOCOL, Channel, version_mismatch
from .shm import SharedBuffers

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a fresh service imports torch: seconds on a busy node
IDLE_S = 2.0  # how long an idle service waits for a rank before it exits


class ServiceClient:
    def __init__(self, config: Config, ctx: DistContext):
        self.config = config
        self.ctx = ctx
        self.directory = runtime_dir()
        self.key = service_key(job_id(ctx.distributed, ctx.job), ctx.node)
        self.allocate = SharedBuffers(self.directory)
        self._group = ctx.job or uuid.uuid4().hex  # the saver's ranks, as the service groups them
        self._generation = 0
        self._link: _Link | None = None
        self._handover = started_pool(1, "asyncckpt-handover")
        self._closed = False
        self._handover.submit(self._warm)  # start or join the service now, not during the first save

    def _warm(self) -> None:
        try:
            self._connected()
        except Exception as exc:  # noqa: BLE001 - the first save tries again and reports it
            log.warning("writer service not reachable yet: %s", exc)

    @property
    def service_pid(self) -> int | None:
        link = self._link
        return link.pid if link is not None and link.alive else None

    def submit(self, job: SaveJob, stage_s: float, spec: dict | None, release: Callable,
               checks: Callable[[], dict] | None, snapshot: Snapshot | None) -> concurrent.futures.Future:
        """Hand ``job`` over; the returned future resolves to its :class:`SaveResult`. ``release(slot)`` gives
        the staging slot back (once the service wrote its bytes, or the save failed).

        ``checks`` (``verify_replicated``): this rank's checksums of its copy of each replicated tensor, computed
        here once the bytes are valid; they travel with the descriptor to the service's commit. ``snapshot``: a
        lazy copy into the slot; it is complete before the descriptor goes, and its version counters are
        checked then: a torn state is not handed over (the save goes as a placeholder that fails it on every
        rank: nothing is published) and this rank's future raises the snapshot's error, as in thread mode."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        pending = _Pending(job, stage_s, fut, release, self.ctx)
        sent = self._handover.submit(self._send, pending, spec, checks, snapshot)
        if job.ready is ready_now:  # the bytes are valid now: be handed over before save() returns
            try:
                sent.result(timeout=self.config.commit_timeout_s)
            except concurrent.futures.TimeoutError:
                pass  # the future fails on its own
        return fut

    def _send(self, pending: "_Pending", spec: dict | None, checks: Callable[[], dict] | None,
              snapshot: Snapshot | None) -> None:
        job = pending.job
        try:
            job.ready()
            sums = checks() if checks is not None else None
            link = self._connected()
            # as late as possible before the hand-over: a mutation under way during the copy has bumped its version
            torn = snapshot.failure_after_settling() if snapshot is not None else None
            if torn is None:
                desc, fds = self._describe(job, spec, sums)
            else:
                pending.own = torn
                pending.release()
                desc, fds = self._describe(job, None, None, f"{type(torn).__name__}: {torn}")
            link.send(pending, desc, fds)
        except BaseException as exc:  # noqa: BLE001 - the save's future carries it
            if not isinstance(exc, CheckpointError):
                exc = CommitError(f"checkpoint {job.tag!r} could not be handed to the writer service: "
                                  f"{type(exc).__name__}: {exc}")
            pending.fail(exc)

    def _describe(self, job: SaveJob, spec: dict | None, sums: dict | None,
                  reason: str = "") -> tuple[dict, tuple[int, ...]]:
        """The save's descriptor and the descriptor of its buffer; with a ``reason``, a placeholder that fails
        the save on every rank (this rank could not make it)."""
        desc = {"op": "save", "seq": job.seq, "save_dir": job.save_dir, "tag": job.tag,
                "save_latest": job.save_latest, "meta": job.meta, "t_start": job.t_start,
                "reason": reason or job.reason, "spec": spec, "replicated_fp": job.replicated_fp,
                "replicated_sums": sums, "buffer": None}
        slot = job.slot
        if slot is None or reason:
            return desc, ()
        name, fd = self.allocate.handle(slot.buffer)
        flat = job.flat
        desc.update(buffer=name, slot=slot.index, layout=(slot.layout.offsets, slot.layout.sizes, slot.layout.total),
                    items=[(i.key, i.dtype, i.shape, i.device, i.global_shape, i.global_offset, i.replicated)
                           for i in flat.items],
                    views=flat.views, elsewhere=flat.elsewhere,
                    skeleton=json.dumps(flat.skeleton))  # text: a state nested MAX_DEPTH deep is too deep to pickle
        return desc, (fd,)

    def _connected(self) -> "_Link":
        link = self._link
        if link is not None and link.alive:
            return link
        if self._closed:
            raise CheckpointError("this saver is closed")
        self._generation += 1
        hello = {"op": "hello", "protocol": PROTOCOL, "group": f"{self._group}/{self._generation}",
                 "rank": self.ctx.rank, "world_size": self.ctx.world_size, "local_rank": self.ctx.local_rank,
                 "local_world_size": self.ctx.local_world_size, "node": self.ctx.node,
                 "node_ranks": list(self.ctx.node_ranks), "job": self.ctx.job,
                 "node_index": self.ctx.node_index, "nodes": list(self.ctx.nodes), "rendezvous": job_rendezvous(),
                 "config": self.config.to_dict(), "pid": os.getpid()}
        self._link = _Link.open(self.directory, self.key, hello, self.config)
        return self._link

    def close(self) -> None:
        """Detach from the service (every save was waited for by the engine) once it finished what this rank
        handed over, ``keep_last`` removals included (as thread mode's close joins its retention thread), or
        after ``commit_timeout_s``."""
        self._closed = True
        self._handover.shutdown(wait=True)
        if self._link is not None:
            self._link.close(self.config.commit_timeout_s)


class _Pending:
    """One handed-over save, until the service answered for it."""

    def __init__(self, job: SaveJob, stage_s: float, fut: concurrent.futures.Future, release: Callable,
                 ctx: DistContext):
        self.job, self.stage_s, self.fut, self._release, self.ctx = job, stage_s, fut, release, ctx
        self.t_sent = 0.0
        self.own: BaseException | None = None  # this rank's own fault, which its future raises (thread mode's rule)
        self._released = False

    def release(self) -> None:
        if not self._released and self.job.slot is not None:
            self._released = True
            self._release(self.job.slot)

    def fail(self, exc: BaseException) -> None:
        self.release()
        if not self.fut.done():
            self.fut.set_exception(exc)

    def finish(self, reply: dict) -> None:
        self.release()
        job, ctx = self.job, self.ctx
        if "error" in reply:
            error = _rebuild(reply["error"])
            if self.own is not None:
                self.own.__cause__ = error  # what every rank learnt (raise_for_rank's "raise own from exc")
                error = self.own
            self.fut.set_exception(error)
            return
        if reply.get("skipped"):
            self.fut.set_result(SaveResult(job.tag, None, skipped=True, rank=ctx.rank, world_size=ctx.world_size))
            return
        durable = time.perf_counter() - job.t_start
        job.returned.wait(60.0)  # the caller is still returning from save(): its stall is not final yet
        phases = {"stage": self.stage_s, "handover": self.t_sent, **reply["phases"]}
        self.fut.set_result(SaveResult(reply["tag"], reply["path"], stall_s=job.stall_s, time_to_durable_s=durable,
                                       raw_bytes=job.flat.nbytes, bytes_written=reply["bytes_written"],
                                       total_bytes_written=reply["total_bytes_written"], phases=phases,
                                       staging_peak_bytes=job.staging_bytes, rank=ctx.rank,
                                       world_size=ctx.world_size))


class _Link:
    """One connection to a running service and the saves pending on it."""

    def __init__(self, channel: Channel, pid: int):
        self.channel = channel
        self.pid = pid
        self.alive = True
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._finished = threading.Event()  # the service answered "closed" (or the connection ended)
        self._reader = start_thread(self._read, "asyncckpt-replies")  # the service's replies to this rank

    @classmethod
    def open(cls, directory: str, key: str, hello: dict, config: Config) -> "_Link":
        """Connect to the job's service on this node, starting it first if none is running (under the lock
        file, which a service exiting for idleness takes too)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        fd = os.open(lock_path(directory, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CommitError(f"writer service: lock {lock_path(directory, key)} stayed held for "
                                          f"{START_TIMEOUT_S:g}s") from None
                    time.sleep(0.01)
            while True:
                welcome = _hello(directory, key, hello, config, deadline)
                if welcome is not None:
                    return cls(*welcome)
                time.sleep(0.05)  # a service that was killed or is exiting: its socket goes away shortly
        finally:
            os.close(fd)  # releases the lock

    def send(self, pending: _Pending, desc: dict, fds: tuple[int, ...]) -> None:
        with self._lock:
            if not self.alive:
                raise CommitError(f"checkpoint {desc['tag']!r}: the writer service (pid {self.pid}) is gone")
            self._pending[desc["seq"]] = pending
        pending.t_sent = time.perf_counter() - pending.job.t_start
        try:
            self.channel.send(desc, fds)
        except OSError as exc:
            with self._lock:
                self._pending.pop(desc["seq"], None)
            raise CommitError(f"checkpoint {desc['tag']!r} could not be handed to the writer service (pid "
                              f"{self.pid}): {exc}") from exc

    def _read(self) -> None:
        why = "it closed the connection"
        try:
            while True:
                msg = self.channel.recv()
                if msg is None:
                    break
                reply, fds = msg
                for fd in fds:
                    os.close(fd)
                if reply["op"] == "closed":
                    self._finished.set()
                    continue
                if reply["op"] == "log":  # a warning the service logged about this rank's save
                    logging.getLogger(reply["name"]).log(reply["level"], "%s", reply["message"],
                                                         extra={"writer_service_pid": self.pid})
                    continue
                with self._lock:
                    if reply.get("retire"):  # the nodes' services lost their group: the next save attaches anew
                        self.alive = False
                    pending = (self._pending.get if reply["op"] == "written" else self._pending.pop)(reply["seq"], None)
                if pending is None:
                    continue
                if reply["op"] == "written":
                    pending.release()
                else:
                    pending.finish(reply)
        except (OSError, EOFError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self.alive = False
                lost, self._pending = list(self._pending.values()), {}
            self._finished.set()
            for pending in lost:
                pending.fail(CommitError(
                    f"checkpoint {pending.job.tag!r}: the writer service (pid {self.pid}) ended before it reported "
                    f"the save ({why}); the save is not confirmed: the previous checkpoint is the latest unless "
                    "'latest' names this one. The next save starts a new service."))

    def close(self, timeout: float) -> None:
        """Say goodbye and wait (at most ``timeout``) for the service's "closed": everything this rank handed
        over is finished, its keep_last removals too; then close the connection."""
        try:
            if self.alive:
                self.channel.send({"op": "close"})
                if not self._finished.wait(timeout):
                    log.warning("writer service (pid %d): still busy with this rank's saves after %gs; detaching",
                                self.pid, timeout)
        except OSError:
            pass  # the service is gone: nothing to wait for
        self.channel.close()
        self._reader.join(timeout=10.0)


def _hello(directory: str, key: str, hello: dict, config: Config, deadline: float) -> tuple[Channel, int] | None:
    """Connect (starting the service when nobody listens) and attach; None when the connection broke during
    the hello (the listener belonged to a service that is dying: try again)."""
    sock = _connect(socket_path(directory, key))
    if sock is None:
        _start(directory, key, config)
        while sock is None:
            if time.monotonic() > deadline:
                raise CommitError(f"writer service did not start within {START_TIMEOUT_S:g}s; see "
                                  f"{log_path(directory, key)}")
            time.sleep(0.02)
            sock = _connect(socket_path(directory, key))
    channel = Channel(sock)
    try:
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        channel.send(hello)
        welcome = channel.recv()
        sock.settimeout(None)
    except (ConnectionError, EOFError):
        welcome = None
    except BaseException:
        channel.close()
        raise
    if welcome is not None and welcome[0].get("op") == "welcome":
        mismatch = version_mismatch(f"the writer service (pid {welcome[0].get('pid')})", welcome[0].get("protocol"),
                                    f"rank {hello['rank']}")
        if mismatch is None:
            for text in welcome[0].get("warnings") or ():  # e.g. the node's budget is another saver's
                log.warning("rank %d: %s", hello["rank"], text)
            return channel, welcome[0]["pid"]
        welcome = ({"error": mismatch}, [])
    channel.close()
    if welcome is not None:
        raise CommitError(f"writer service refused rank {hello['rank']}: {welcome[0].get('error')}")
    if time.monotonic() > deadline:
        raise CommitError(f"writer service: could not attach within {START_TIMEOUT_S:g}s; see {log_path(directory, key)}")
    return None


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def _start(directory: str, key: str, config: Config) -> None:
    """Start the service detached from this process (its own session, re-parented), at lowered priority."""
    w = config.writer
    cmd = [sys.executable, "-m", "asyncckpt.service", "--detach", "--dir", directory, "--key", key,
           "--idle-s", str(IDLE_S), "--nice", str(w.nice)] + (["--ionice-idle"] if w.ionice_idle else [])
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path(directory, key), "wb") as logf:
        launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                    start_new_session=True, close_fds=True)
    try:
        rc = launcher.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        raise CommitError(f"writer service launcher did not return within {START_TIMEOUT_S:g}s") from None
    if rc != 0:
        raise CommitError(f"writer service failed to start (exit status {rc}); see {log_path(directory, key)}")


def _rebuild(error: dict) -> BaseException:
    """The service's exception, as the class the engine would have raised in thread mode, chaining the OS error
    that caused it (``OSError(errno, ...)`` is the errno's subclass: FileNotFoundError, PermissionError...)."""
    cls = getattr(errors, error["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        exc = CheckpointError(f"{error['type']}: {error['message']}")
    elif issubclass(cls, CommitError):
        exc = cls(error["message"], error["failures"])
    else:
        exc = cls(error["message"])
    if error.get("cause") is not None:
        code, text, filename = error["cause"]
        exc.__cause__ = OSError(code, text, filename) if code is not None else OSError(text)
    return exc
