"""The tests' way to inject storage faults: a :class:`asyncckpt.storage.faults.Faults` installed around every
storage opened while the context is active (no private name is patched).

In ``writer.mode: service`` the saves' storage operations run in the node's writer service, another process.
There :func:`injected` yields a :class:`SharedFaults` instead: its rules (``fail``, ``answer``, ``gate``)
are files in ``$ASYNCCKPT_TEST_FAULTS_DIR``, applied by every process that installed :func:`service_hooks`
(tests/conftest.py names it in ``ASYNCCKPT_SERVICE_HOOKS``, so every writer service the tests start does) and
by the test process itself (its loads); its ``log`` is every operation those processes performed while the
block was active. A rule made on a simulated node (``GROUP_RANK`` set) applies on that node only; a rule made by a
rank of a distributed job applies to that rank's files (``rankNNNNN*``) and to files of no rank only."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
import uuid
from typing import Any, Iterator

import pytest

from asyncckpt.storage import add_wrapper, wrapping
from asyncckpt.storage.faults import Answer, Faults, Gate, HookedStorage

__all__ = ["Faults", "Gate", "SharedFaults", "faults_fixture", "injected", "slowed", "killed", "service_hooks",
           "FAULTS_DIR_ENV"]

FAULTS_DIR_ENV = "ASYNCCKPT_TEST_FAULTS_DIR"
GATE_TIMEOUT_S = 120.0


def _own_rank() -> str | None:
    """This process's rank in a distributed job (torchrun's RANK), as the rank files name it."""
    rank = os.environ.get("RANK", "")
    return f"rank{int(rank):05d}" if rank.isdigit() and os.environ.get("WORLD_SIZE", "1") != "1" else None


def _service_mode() -> bool:
    import asyncckpt

    return asyncckpt.Config().writer.mode == "service"


@contextlib.contextmanager
def injected() -> Iterator[Faults]:
    """A fresh set of fault rules, applied to every save and load started inside the block (in service mode,
    to every storage operation of the writer services and of this process while the block is active)."""
    if _service_mode() and os.environ.get(FAULTS_DIR_ENV):
        shared = SharedFaults(os.environ[FAULTS_DIR_ENV])
        with wrapping(SharedRules(shared.directory).wrap):  # this process's own operations (loads)
            try:
                yield shared
            finally:
                shared.end()
        return
    faults = Faults()
    with wrapping(faults.wrap):
        yield faults


def slowed(faults, op: str, seconds: float, match: str = "") -> None:
    """Matching operations take ``seconds`` longer (a slow disk), in either mode."""
    if isinstance(faults, SharedFaults):
        faults.delay(op, seconds, match)
    else:
        faults.on(op, lambda o, p: time.sleep(seconds), match)


def killed(faults, op: str, match: str = "", *, after: int = 0) -> None:
    """The process performing the matching operation dies of SIGKILL there (after ``after`` matches), in either
    mode: the training process in thread mode, the node's writer service in service mode (the training process
    then learns it through its future)."""
    if isinstance(faults, SharedFaults):
        faults.kill(op, match, after=after)
    else:
        faults.on(op, lambda o, p: os.kill(os.getpid(), signal.SIGKILL), match, after=after)


@pytest.fixture(name="faults")
def faults_fixture() -> Iterator[Faults]:
    """:func:`injected` for the whole test."""
    with injected() as f:
        yield f


# ------------------------------------------------------------------------------- service mode: shared rules
class SharedFaults:
    """One :func:`injected` block's rules as files: ``on-<block>`` while active, ``rule-<block>-<n>`` (a pickle
    of op, path substring, action, after, times, node), ``log-<block>`` (``op<TAB>path`` lines) and
    ``off-<block>`` once it ended. Actions: ``("fail", exception)``, ``("answer", value)``, ``("delay", s)``,
    ``("kill", None)`` (SIGKILL of the process performing the operation), ``("gate", id)``
    (held until ``open-<id>`` exists; ``entered-<id>`` says one was held)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.block = uuid.uuid4().hex[:12]
        self._n = 0
        self._touch(f"on-{self.block}")

    def _touch(self, name: str) -> None:
        with open(os.path.join(self.directory, name), "w"):
            pass

    def _add(self, op: str, match: str, action: tuple, after: int, times: int | None) -> None:
        from asyncckpt.storage.faults import FILE_OPS, _OPS

        if op not in _OPS + FILE_OPS:
            raise ValueError(f"no storage operation {op!r}; one of {', '.join(_OPS + FILE_OPS)}")
        self._n += 1
        rule = (op, match, action, after, times, os.environ.get("GROUP_RANK"), _own_rank())
        final = os.path.join(self.directory, f"rule-{self.block}-{self._n:04d}")
        with open(final + ".tmp", "wb") as f:
            pickle.dump(rule, f)
        os.rename(final + ".tmp", final)  # readers never see half a rule

    def fail(self, op: str, match: str, error: BaseException, *, after: int = 0,
             times: int | None = None) -> "SharedFaults":
        self._add(op, match, ("fail", error), after, times)
        return self

    def answer(self, op: str, value: Any, match: str = "") -> "SharedFaults":
        self._add(op, match, ("answer", value), 0, None)
        return self

    def delay(self, op: str, seconds: float, match: str = "") -> "SharedFaults":
        self._add(op, match, ("delay", seconds), 0, None)
        return self

    def kill(self, op: str, match: str = "", *, after: int = 0) -> "SharedFaults":
        self._add(op, match, ("kill", None), after, None)
        return self

    def gate(self, op: str, match: str = "") -> "SharedGate":
        gate = SharedGate(self.directory)
        self._add(op, match, ("gate", gate.id), 0, None)
        return gate

    def on(self, *args, **kwargs):
        raise NotImplementedError("service mode: a Python callable cannot run in the writer service; use fail, "
                                  "answer, delay, kill or gate (or mark the test thread_only)")

    @property
    def log(self) -> list[tuple[str, str]]:
        try:
            with open(os.path.join(self.directory, f"log-{self.block}")) as f:
                return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if "\t" in line]
        except FileNotFoundError:
            return []

    def end(self) -> None:
        self._touch(f"off-{self.block}")


class _FileEvent:
    def __init__(self, path: str):
        self.path = path

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (GATE_TIMEOUT_S if timeout is None else timeout)
        while not self.is_set():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


class SharedGate:
    """:class:`~asyncckpt.storage.faults.Gate` across processes: ``entered`` and ``open`` are files."""

    def __init__(self, directory: str, gate_id: str | None = None):
        self.id = gate_id or uuid.uuid4().hex[:12]
        self.entered = _FileEvent(os.path.join(directory, f"entered-{self.id}"))
        self.opened = _FileEvent(os.path.join(directory, f"open-{self.id}"))

    def hold(self) -> None:
        with open(self.entered.path, "w"):
            pass
        if not self.opened.wait(GATE_TIMEOUT_S):
            raise TimeoutError(f"storage gate held for {GATE_TIMEOUT_S:g}s and never opened")

    def open(self) -> None:
        with open(self.opened.path, "w"):
            pass


class SharedRules:
    """Applies the rules of every active :class:`SharedFaults` block to the storage it wraps (each process keeps
    its own counts for ``after`` and ``times``) and logs every operation into each active block's log."""

    def __init__(self, directory: str):
        self.directory = directory
        self.node = os.environ.get("GROUP_RANK")
        self._rules: dict[str, list] = {}  # rule file -> [op, match, action, after, times, node, rank, seen]
        self._lock = threading.Lock()

    def wrap(self, inner):
        return HookedStorage(inner, self._hook)

    def _hook(self, op: str, path: str) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        active = {n[3:] for n in names if n.startswith("on-")} - {n[4:] for n in names if n.startswith("off-")}
        if not active:
            return
        actions = []
        with self._lock:
            for block in active:
                fd = os.open(os.path.join(self.directory, f"log-{block}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                             0o600)
                try:
                    os.write(fd, f"{op}\t{path}\n".encode())
                finally:
                    os.close(fd)
            for name in sorted(n for n in names if n.startswith("rule-") and not n.endswith(".tmp")):
                if name.split("-")[1] not in active:
                    continue
                rule = self._rules.get(name)
                if rule is None:
                    with open(os.path.join(self.directory, name), "rb") as f:
                        rule = self._rules[name] = [*pickle.load(f), 0]
                r_op, match, action, after, times, node, rank, _ = rule
                if r_op != op or match not in str(path) or (node is not None and node != self.node) \
                        or not _concerns(rank, str(path)):
                    continue
                rule[7] += 1
                n = rule[7] - after
                if n > 0 and (times is None or n <= times):
                    actions.append(action)
        for kind, value in actions:
            if kind == "fail":
                raise value
            if kind == "answer":
                raise Answer(value)
            if kind == "delay":
                time.sleep(value)
                continue
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            SharedGate(self.directory, value).hold()


def _concerns(rank: str | None, path: str) -> bool:
    """A rule made by a rank applies to that rank's own files and to files of no rank (the manifest, latest...),
    not to another rank's files (one service writes every local rank's)."""
    name = os.path.basename(path)
    return rank is None or not (name.startswith("rank") and name[4:9].isdigit()) or name.startswith(rank)


def service_hooks() -> None:
    """``ASYNCCKPT_SERVICE_HOOKS=storage_faults:service_hooks``: the writer service applies the shared rules."""
    directory = os.environ.get(FAULTS_DIR_ENV)
    if directory:
        add_wrapper(SharedRules(directory).wrap)
