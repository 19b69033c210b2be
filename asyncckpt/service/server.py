"""The writer service process: accepts the node's ranks on a Unix socket, writes and publishes what they
hand over, and exits when no rank is attached and nothing is pending (after ``idle_s``).

Per attached rank, a reader thread queues the rank's save descriptors and a worker thread runs them in
order, as the engine's I/O loop does in thread mode: prepare (agreement among the group's ranks) → write
(the group's :class:`~asyncckpt.writer.WriterPool`) → "written" to the rank (its slot is free again) →
commit → the result to the rank. The training process is not needed after its hand-off: a rank whose
connection closes has its queued saves finished all the same. On a job of several nodes the commit's rounds
travel between the nodes' services (:mod:`.link`); when their group fails, each rank of that saver learns it
with its failed save (``retire``) and its connection is closed: it attaches anew with its next save."""
from __future__ import annotations

import concurrent.futures
import fcntl
import importlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time

import torch

from ..commit import CommitCoordinator, raise_for_rank
from ..config import Config
from ..errors import CheckpointError, CommitError
from ..io_types import FlatState, RankOutcome, StageItem
from ..staging import Layout
from ..threads import start_thread, started_pool
from ..writer import lower_session_priority, lower_thread_priority
from .group import Group
from .paths import clean_leftovers, lock_path, log_path, socket_path
from .protocol import PROTOCOL, Channel, error_reply, version_mismatch
from .shm import map_fd

log = logging.getLogger(__name__)

PAUSE_ENV = "ASYNCCKPT_SERVICE_PAUSE_AT"  # fault injection for tests: "<phase>:<tag>", phase prepare|write|publish
HOOKS_ENV = "ASYNCCKPT_SERVICE_HOOKS"  # tests: "module:function[,module:function...]" called once at start

_on_behalf = threading.local()  # .attachment: the rank whose save this thread works on now (log forwarding)


def run_hooks() -> None:
    """Test seam: call each ``module:function`` named in ``$ASYNCCKPT_SERVICE_HOOKS`` (inherited from the
    training process that starts the service; the modules are imported from its ``PYTHONPATH``) once, before
    the service listens, so that they can install storage wrappers (``asyncckpt.storage.add_wrapper``) or
    other instrumentation in the service process."""
    for spec in filter(None, os.environ.get(HOOKS_ENV, "").split(",")):
        module, _, function = spec.strip().partition(":")
        getattr(importlib.import_module(module), function)()


class ForwardToRank(logging.Handler):
    """Sends each record of WARNING and above, emitted while a thread works on a rank's save (its prepare,
    commit or ``keep_last`` removals), to that rank, which logs it under the same logger name: the warnings
    of thread mode reach the training process's log in service mode too."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        attachment = getattr(_on_behalf, "attachment", None)
        if attachment is None:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not fail the save
            message = str(record.msg)
        attachment.reply({"op": "log", "name": record.name, "level": record.levelno, "message": message})


def pause_point(directory: str, phase: str, tag: str) -> None:
    """Test hook: when ``$ASYNCCKPT_SERVICE_PAUSE_AT`` is ``<phase>:<tag>``, announce it with a marker file
    ``paused-<phase>-<pid>`` and stop here for up to 120 s (the test kills the service meanwhile)."""
    if os.environ.get(PAUSE_ENV) != f"{phase}:{tag}":
        return
    with open(os.path.join(directory, f"paused-{phase}-{os.getpid()}"), "w"):
        pass
    time.sleep(120)


class MappedSlot:
    """The writer's view of a rank's staging slot, mapped from the rank's shared memory."""

    def __init__(self, buffer: torch.Tensor, layout: Layout, directory: str, tag: str):
        self.buffer = buffer
        self.layout = layout
        self._directory = directory
        self._tag = tag

    def array(self, offset: int, nbytes: int):
        pause_point(self._directory, "write", self._tag)  # the writer opened its data file and starts on the bytes
        return self.buffer[offset: offset + nbytes].numpy()


class Service:
    def __init__(self, directory: str, key: str, idle_s: float):
        self.directory = directory
        self.key = key
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._groups: dict[str, Group] = {}
        self._attachments = 0
        self._encoders: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # the node's budget

    def serve(self) -> None:
        clean_leftovers(self.directory)
        path = socket_path(self.directory, self.key)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.lexists(path):
            os.unlink(path)  # the starter holds the lock: a socket here belongs to a dead service
        listener.bind(path)
        listener.listen(64)
        listener.settimeout(0.2)
        log.info("writer service %d listening on %s", os.getpid(), path)
        idle_since = time.monotonic()
        while True:
            try:
                sock, _ = listener.accept()
                self._accept(sock)
            except socket.timeout:
                pass
            with self._lock:
                busy = self._attachments > 0
            if busy:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_s and self._try_exit(listener, path):
                return

    def close(self) -> None:
        """After :meth:`serve` returned (no rank attached, no save pending): stop the node's encode threads."""
        if self._encoders is not None:
            self._encoders[1].shutdown(wait=True)

    def _try_exit(self, listener: socket.socket, path: str) -> bool:
        """Stop listening when idle, under the starters' lock (a rank that is connecting holds it until its
        hello was answered, so it is either attached now or connects after the socket is gone)."""
        try:
            fd = os.open(lock_path(self.directory, self.key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the runtime directory was removed: nobody can reach this service any more
            listener.close()
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            listener.setblocking(False)
            try:
                while True:
                    sock, _ = listener.accept()
                    self._accept(sock)
            except BlockingIOError:
                pass
            listener.settimeout(0.2)
            with self._lock:
                if self._attachments:
                    return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            listener.close()
            log.info("writer service %d: no rank attached and nothing pending for %gs; exiting", os.getpid(),
                     self.idle_s)
            return True
        finally:
            os.close(fd)

    def _accept(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            log.warning("refusing a connection from uid %d", uid)
            sock.close()
            return
        with self._lock:
            self._attachments += 1
        start_thread(Attachment(self, Channel(sock)).run, "asyncckpt-service-rank")

    def group(self, hello: dict) -> tuple[Group, CommitCoordinator, list[str]]:
        """The group of the hello's saver (made by its first rank here), the rank's coordinator in it, and
        warnings for the rank."""
        warnings = []
        with self._lock:
            group = self._groups.get(hello["group"])
            if group is None:
                config = Config.from_dict(hello["config"])
                wanted = config.writer.node_threads
                if self._encoders is not None and not self._groups and self._encoders[0] != wanted:
                    self._encoders[1].shutdown(wait=True)  # no saver uses them: the budget is this saver's
                    self._encoders = None
                if self._encoders is None:  # the first saver on this node sets the node's budget
                    self._encoders = (wanted, started_pool(wanted, "asyncckpt-service-encode"))
                threads, encoders = self._encoders
                if wanted != threads:
                    warnings.append(f"writer.threads_per_node: this saver asks for {wanted} encode threads, the "
                                    f"node's writer service (pid {os.getpid()}) runs {threads} (the budget of the "
                                    "saver that started them), shared by every saver of the job on this node")
                group = self._groups[hello["group"]] = Group(hello["group"], config, hello, encoders, threads)
            return group, group.attach(hello), warnings

    def detached(self, group: Group | None, rank: int) -> None:
        with self._lock:
            empty = group is not None and group.detach(rank)
            if empty:
                del self._groups[group.name]
        if empty:
            group.close()
        with self._lock:
            self._attachments -= 1


class Attachment:
    """One rank's connection: its reader (this thread) and its worker (saves in order)."""

    def __init__(self, service: Service, channel: Channel):
        self.service = service
        self.channel = channel
        self.group: Group | None = None
        self.rank = -1
        self._queue: queue.Queue = queue.Queue()
        self._buffers: dict[int, tuple[str, torch.Tensor]] = {}  # slot index -> (buffer id, mapping)
        self._layout: Layout | None = None
        self._alive = True  # the rank still listens

    def run(self) -> None:
        worker = None
        try:
            first = self.channel.recv()
            if first is None:
                return
            hello, fds = first
            _close_all(fds)
            self.rank = hello.get("rank", -1)
            try:
                mismatch = version_mismatch(f"rank {self.rank} (pid {hello.get('pid')})", hello.get("protocol"),
                                            f"this writer service (pid {os.getpid()})")
                if mismatch:
                    raise CheckpointError(mismatch)
                self.group, self.coordinator, warnings = self.service.group(hello)
            except Exception as exc:  # noqa: BLE001 - told to the rank
                self.reply({"op": "refused", "error": f"{type(exc).__name__}: {exc}"})
                raise
            self.reply({"op": "welcome", "pid": os.getpid(), "protocol": PROTOCOL, "warnings": warnings})
            worker = start_thread(self._work, "asyncckpt-service-work")
            while True:
                try:
                    msg = self.channel.recv()
                except (OSError, EOFError) as exc:
                    log.warning("rank %d: connection lost: %s", self.rank, exc)
                    msg = None
                if msg is None:
                    break
                self._queue.put(msg)
        except Exception:  # noqa: BLE001 - a bad peer must not take the service down
            log.exception("rank %d: attachment failed", self.rank)
        finally:
            self._queue.put(None)
            if worker is not None:
                worker.join()
            self.channel.close()
            self._buffers.clear()
            self.service.detached(self.group, self.rank)

    def reply(self, message: dict) -> None:
        if not self._alive:
            return
        try:
            self.channel.send(message)
        except OSError:
            self._alive = False  # the training process is gone; its saves still finish

    def on_behalf(self, fn, *args):
        """``fn(*args)`` with this thread's records of WARNING and above forwarded to this rank."""
        _on_behalf.attachment = self
        try:
            return fn(*args)
        finally:
            _on_behalf.attachment = None

    def _work(self) -> None:
        _on_behalf.attachment = self
        while True:
            item = self._queue.get()
            if item is None:
                return
            desc, fds = item
            if desc["op"] == "close":  # the rank closes its saver: answered once its keep_last removals are done
                _close_all(fds)
                self.group.retainer.submit(lambda: None).result()  # one thread: after every removal queued so far
                self.reply({"op": "closed"})
                continue
            try:
                try:
                    slot = self._map(desc, fds)
                finally:
                    _close_all(fds)
                self._save(desc, slot)
            except Exception as exc:  # noqa: BLE001 - reported to the rank
                log.error("rank %d: checkpoint %r failed: %s", self.rank, desc["tag"], exc)
                retire = self.group is not None and self.group.retired
                self.reply({"op": "done", "seq": desc["seq"], "error": error_reply(exc), "retire": retire})
                if retire:  # the nodes' group failed: the rank attaches anew with its next save
                    self._alive = False
                    self.channel.close()

    def _map(self, desc: dict, fds: list[int]) -> MappedSlot | None:
        if desc.get("buffer") is None:
            return None
        name = desc["buffer"]
        known = self._buffers.get(desc["slot"])
        if known is not None and known[0] == name:
            buffer = known[1]
        else:  # a new buffer of this slot (its earlier one, if any, is gone for good)
            if not fds:
                raise CheckpointError(f"rank {self.rank}: save {desc['tag']!r} names staging buffer {name} "
                                      "without passing it")
            buffer = map_fd(fds[0], os.fstat(fds[0]).st_size)
            self._buffers[desc["slot"]] = (name, buffer)
        offsets, sizes, total = desc["layout"]
        layout = self._layout
        if layout is None or (layout.offsets, layout.sizes, layout.total) != (offsets, sizes, total):
            layout = self._layout = Layout(offsets, sizes, total)  # one object while it repeats (packer cache)
        return MappedSlot(buffer, layout, self.service.directory, desc["tag"])

    def _save(self, desc: dict, slot: MappedSlot | None) -> None:
        seq, tag, save_dir = desc["seq"], desc["tag"], desc["save_dir"]
        coordinator, group = self.coordinator, self.group
        group.begin(seq)
        flat = FlatState(None, [])
        if slot is not None:
            items = [StageItem(key, slot.buffer[off: off + n], dtype, shape, device, gshape, goff, repl)
                     for (key, dtype, shape, device, gshape, goff, repl), off, n
                     in zip(desc["items"], slot.layout.offsets, slot.layout.sizes)]
            flat = FlatState(json.loads(desc["skeleton"]), items, desc["views"], elsewhere=desc["elsewhere"])
        phases: dict[str, float] = {}
        t = time.perf_counter()
        try:
            prepared = coordinator.prepare(save_dir, tag, desc["reason"], desc["spec"])
        except CommitError as exc:
            raise_for_rank(exc, self.rank, f"starting checkpoint {tag!r} in {save_dir}")
        phases["prepare"] = time.perf_counter() - t
        if prepared is None:
            self.reply({"op": "done", "seq": seq, "skipped": True})
            return
        pause_point(self.service.directory, "prepare", tag)
        tag = prepared.tag
        t = time.perf_counter()
        try:
            st = group.storage_for(save_dir)
            files = group.loop.submit(group.writer.write_rank(
                directory=st.staging_dir(save_dir, tag), rank=self.rank, flat=flat, slot=slot,
                skeleton=flat.skeleton, storage=st)).result()
            outcome = RankOutcome(self.rank, True, index_name=files.index_name, index_xxh3=files.index_xxh3,
                                  bytes_written=files.bytes_written, node=coordinator.ctx.node,
                                  replicated_fp=desc["replicated_fp"])
            write_error = None
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the commit
            files, write_error = None, exc
            outcome = RankOutcome(self.rank, False, error=f"{type(exc).__name__}: {exc}", node=coordinator.ctx.node,
                                  replicated_fp=desc["replicated_fp"])
            log.error("rank %d: writing checkpoint %r failed: %s", self.rank, tag, exc)
        phases["write"] = time.perf_counter() - t
        self.reply({"op": "written", "seq": seq})  # the rank may reuse its slot
        pause_point(self.service.directory, "publish", tag)
        try:
            info = coordinator.commit(save_dir, tag, outcome, desc["save_latest"], desc["meta"], prepared.save_id,
                                      desc["t_start"], desc["replicated_sums"])
        except CommitError as exc:
            raise_for_rank(exc, self.rank, f"{'writing' if write_error else 'publishing'} checkpoint {tag!r} in "
                                           f"{save_dir}", write_error)
        phases.update(info.phases)
        self.reply({"op": "done", "seq": seq, "tag": tag, "path": info.path, "bytes_written": files.bytes_written,
                    "total_bytes_written": info.total_bytes_written, "phases": phases})
        if group.config.keep_last:
            group.retain(self.rank, save_dir, tag, self.on_behalf)


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m asyncckpt.service", description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--idle-s", type=float, default=2.0)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--ionice-idle", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s service[{os.getpid()}] %(levelname)s %(message)s")
    logging.getLogger().addHandler(ForwardToRank())
    lower_thread_priority(args.nice, args.ionice_idle)  # every thread of the service inherits it
    lower_session_priority(args.nice)  # its own session (autogroup) too: else niceness does not yield to trainers
    torch.set_num_threads(1)
    run_hooks()
    service = Service(args.dir, args.key, args.idle_s)
    service.serve()
    service.close()
    try:
        os.unlink(log_path(args.dir, args.key))  # a clean exit leaves no log behind
    except FileNotFoundError:
        pass
