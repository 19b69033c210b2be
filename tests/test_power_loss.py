"""Power-loss crash consistency: every file-system operation of a save is recorded (asyncckpt.storage.recording),
and at every point of that log every state a power loss may leave (tests/powerloss.py has the persistence
model and its bounds) is built in a directory and checked:

* ``latest`` names the previous checkpoint or the new one (nothing, before the first save), and that
  checkpoint verifies (every chunk's checksum) and loads bit-exactly to the state saved under that tag;
* every tag ``list_tags`` lists verifies and loads to a state saved under it (no half-published tag shows);
* the next save succeeds there — the restarted run's: the interrupted tag again when ``latest`` does not hold
  the new state (replay), a later tag when it does — ``latest`` names it afterwards, it loads, and no
  leftover (partial directory, temporary file, lock file) remains.

Saves (one rank): the first one into an empty directory, the second next to a previous checkpoint, an overwrite
of the tag ``latest`` names (``overwrite: true``) with RENAME_EXCHANGE and with two renames (a storage that
answers it cannot exchange), and one with ``keep_last: 1`` removing the older tag.
Then the checker is shown to fail: with a storage that skips the directory fsyncs, or the file fsyncs, it
finds states in which ``latest`` does not load.

A leftover directory always has its lock file: ``ownership.claim`` makes the lock file's name durable before
the directory it guards can appear, and the publisher and keep_last make a removal durable before its lock
file goes, so the next save's cleanup removes whatever a power loss left.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, CheckpointReader, list_tags, storage
from asyncckpt.engine import SaveEngine
from asyncckpt.loader import read_latest
from asyncckpt.state import flatten
from asyncckpt.storage.faults import Faults
from asyncckpt.storage.recording import FSYNC, FSYNC_DIR, RENAME, Recorder, RecordingStorage
from powerloss import check, coalesce, crash_states, log_text, snapshot, summary
from reliability import record
from trainer import digest

CATEGORY = "Power loss"
TIMEOUT_S = 60.0
CONFIG = {"writer": {"threads_per_node": 1, "nice": 0}, "codec": {"chunk_mib": 1 / 64}}


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(96, 128, generator=g), "b": torch.arange(10, dtype=torch.int64) * seed,
            "step": seed, "note": f"state {seed}"}


def _config(**extra) -> asyncckpt.Config:
    return asyncckpt.Config.from_dict({**CONFIG, **extra})


def _save(cfg: asyncckpt.Config, save_dir: str, tag: str, state: dict) -> None:
    """One save with its own engine, closed afterwards: keep_last's removal, which runs after the future
    resolved, is done when this returns."""
    engine = SaveEngine(cfg)
    try:
        engine.save(lambda: flatten(state), save_dir, tag).result(timeout=TIMEOUT_S)
    finally:
        engine.close(timeout=TIMEOUT_S)


def _recorded(cfg: asyncckpt.Config, save_dir: str, tag: str, state: dict, *wrappers):
    """(directory before, operation log, directory after) of one save; ``wrappers`` go around the recorder
    (a broken storage the recorder sits under records what really reached the disk)."""
    before = snapshot(save_dir)
    recorder = Recorder(save_dir)
    storage.add_wrapper(recorder.wrap)
    try:
        for w in wrappers:
            storage.add_wrapper(w)
        try:
            _save(cfg, save_dir, tag, state)
        finally:
            for w in wrappers:
                storage.remove_wrapper(w)
    finally:
        storage.remove_wrapper(recorder.wrap)
    return before, recorder.finish(), snapshot(save_dir)


def _verified(path: str, tag: str | None) -> str:
    """The digest of the checkpoint ``tag`` (None: the one ``latest`` names) after every chunk verified (one
    reader thread: the states are tiny, and there are hundreds)."""
    reader = CheckpointReader(path, tag, threads=1)
    reader.verify()  # every chunk's checksums
    return digest(reader.load_state(verify=False))


def _promises(cfg: asyncckpt.Config, saved: dict[str, list[dict]], latest: dict, new: dict, replay_tag: str,
              next_save: bool = True):
    """The checks run in each crash state. ``saved``: every tag saved so far and the states saved under it;
    ``latest``: what ``latest`` may name after the crash (tag or None) and the states each may hold; ``new``:
    the state of the recorded save; ``next_save`` False: the checks stop before the next save."""
    digests = {t: {digest(s) for s in states} for t, states in saved.items()}
    allowed = {t: {digest(s) for s in states} for t, states in latest.items()}
    new_digest = digest(new)
    follow = _state(99)

    def run(path: str) -> list[str]:
        problems = []
        try:
            named = read_latest(path)
        except CheckpointError as exc:
            return [f"latest: unreadable: {exc}"]
        if named not in allowed:
            return [f"latest: names {named!r}, not one of {sorted(map(str, allowed))}"]
        got = None
        if named is not None:
            try:
                got = _verified(path, None)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                return [f"latest: {named!r} does not load: {type(exc).__name__}: {exc}"]
            if got not in allowed[named]:
                return [f"latest: {named!r} loads a state that was never saved under that tag"]
        for tag in list_tags(path):
            try:
                if tag not in digests or (got if tag == named else _verified(path, tag)) not in digests[tag]:
                    problems.append(f"tags: {tag!r} holds a state never saved under it")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"tags: {tag!r} does not load: {type(exc).__name__}: {exc}")
        if not next_save:
            return problems
        tag = "after" if got == new_digest else replay_tag
        try:
            _save(cfg, path, tag, follow)
            if read_latest(path) != tag or _verified(path, None) != digest(follow):
                problems.append(f"next save: {tag!r} did not become latest")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"next save: {tag!r} failed: {type(exc).__name__}: {exc}")
        leftovers = sorted(n for n in os.listdir(path) if n.startswith("."))
        if leftovers:
            problems.append(f"leftover: the next save left {leftovers} behind")
        return problems

    return run


def _run(name: str, work: str, cfg, save_dir, tag, new, saved, latest, *wrappers, stop_at=(), next_save=True):
    before, log, after = _recorded(cfg, save_dir, tag, new, *wrappers)
    assert any(op.kind == FSYNC for op in log) and any(op.kind == RENAME for op in log)
    states = os.path.join(work, name)
    os.mkdir(states)
    return check(save_dir, before, log, after, states, _promises(cfg, saved, latest, new, tag, next_save),
                 stop_at=stop_at), log


HARD = ("latest", "tags", "next save")


def _assert_held(case: str, report, log, save_dir: str) -> None:
    """No state broke a promise: ``latest``, the listed tags, the next save, and no leftover after it."""
    note = f"{report.prefixes} prefixes, {report.distinct} distinct states"
    record(CATEGORY, f"{case}: latest, listed tags, next save", report.states, report.held(HARD), note)
    record(CATEGORY, f"{case}: leftovers removed by the next save", report.states, report.held(("leftover",)),
           note)
    text = "\n\nlog (writes coalesced):\n" + log_text(coalesce(log), save_dir)
    assert not report.select(HARD), summary(report, report.select(HARD)) + text
    leftovers = report.select(("leftover",))
    assert not leftovers, summary(report, leftovers, 3) + text


@pytest.fixture
def work(tmp_path):
    """Where the crash states are built: tmpfs when there is one (each next save fsyncs)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = tempfile.mkdtemp(prefix="asyncckpt-powerloss-", dir=base)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def save_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    return str(d)


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
def test_first_save_into_an_empty_directory(work, save_dir):
    cfg = _config()
    a = _state(1)
    report, log = _run("first", work, cfg, save_dir, "t1", a, {"t1": [a]}, {None: [], "t1": [a]})
    _assert_held("first save into an empty directory", report, log, save_dir)


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
def test_save_next_to_a_previous_checkpoint(work, save_dir):
    cfg = _config()
    a, b = _state(1), _state(2)
    _save(cfg, save_dir, "t1", a)
    report, log = _run("second", work, cfg, save_dir, "t2", b, {"t1": [a], "t2": [b]},
                       {"t1": [a], "t2": [b]})
    _assert_held("save next to a previous checkpoint", report, log, save_dir)


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_overwrite_of_the_latest_tag(work, save_dir, exchange):
    """With RENAME_EXCHANGE the tag is swapped in one step; without it (a storage answering that it cannot) the
    old tag is renamed aside first: between the two renames the loader reads it from there."""
    cfg = _config(overwrite=True)
    a, b = _state(1), _state(2)
    _save(cfg, save_dir, "t1", a)
    wrappers = [] if exchange else [Faults().answer("exchange", False).wrap]
    report, log = _run("overwrite", work, cfg, save_dir, "t1", b, {"t1": [a, b]}, {"t1": [a, b]}, *wrappers)
    assert any(op.kind == "exchange" for op in log) == exchange, "RENAME_EXCHANGE is not available here"
    how = "RENAME_EXCHANGE" if exchange else "two renames"
    _assert_held(f"overwrite of the tag latest names ({how})", report, log, save_dir)


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
def test_keep_last_removes_the_older_tag(work, save_dir):
    cfg = _config(keep_last=1)
    a, b = _state(1), _state(2)
    _save(cfg, save_dir, "t1", a)
    report, log = _run("keep_last", work, cfg, save_dir, "t2", b, {"t1": [a], "t2": [b]},
                       {"t1": [a], "t2": [b]})
    assert list_tags(save_dir) == ["t2"]
    _assert_held("save with keep_last=1 removing the older tag", report, log, save_dir)


# ------------------------------------------------------------------------------ the recorder
MUTATING = ("makedirs", "open_write", "write_durable", "replace_atomic", "fsync_dir", "rename", "exchange",
            "remove_file", "remove_tree")


def test_the_recorder_logs_every_mutating_operation(save_dir):
    """Every mutating method of the Storage protocol is logged as its primitives, a change made beside the
    storage (a lock file) is noticed, and the log replayed on the model ends in the directory left behind."""
    assert all(name in RecordingStorage.__dict__ for name in MUTATING)
    before = snapshot(save_dir)
    recorder = Recorder(save_dir)
    st = recorder.wrap(storage.PosixStorage())
    j = os.path.join
    st.makedirs(j(save_dir, "a", "b"))
    f = st.open_write(j(save_dir, "a", "b", "data"))
    f.write(memoryview(b"abc"))
    f.write(memoryview(b"def"))
    f.sync()
    f.close()
    st.write_durable(j(save_dir, "a", "index"), b"idx")
    st.write_durable(j(save_dir, "a", "nosync"), b"x", fsync=False)
    st.fsync_dir(j(save_dir, "a"))
    st.replace_atomic(j(save_dir, "latest"), b"one\n")
    st.replace_atomic(j(save_dir, "latest"), lambda out: out.write(b"two\n"))
    with open(j(save_dir, ".x.lock"), "wb") as lock:  # beside the storage, as ownership's lock files are
        lock.write(b"owner")
    st.rename(j(save_dir, "a"), j(save_dir, "c"))
    st.makedirs(j(save_dir, "d"))
    exchanged = st.exchange(j(save_dir, "c"), j(save_dir, "d"))
    full = j(save_dir, "d" if exchanged else "c")
    st.remove_file(j(full, "nosync"))
    st.remove_file(j(save_dir, "missing"))
    st.remove_tree(full)
    os.unlink(j(save_dir, ".x.lock"))
    log = recorder.finish()
    kinds = [op.kind for op in log]
    assert kinds[:6] == ["mkdir", "mkdir", "create", "write", "write", "fsync"]
    assert [op.data for op in log if op.kind == "write"][:2] == [b"abc", b"def"]
    assert [op.offset for op in log if op.kind == "write"][:2] == [0, 3]
    latest = [op for op in log if op.method == "replace_atomic"]
    assert [op.kind for op in latest] == ["create", "write", "fsync", "rename", "fsync_dir"] * 2
    assert latest[3].dst == j(save_dir, "latest") and latest[3].path.endswith(".tmp")
    assert [(op.kind, os.path.basename(op.path)) for op in log if op.external] == [
        ("create", ".x.lock"), ("write", ".x.lock"), ("unlink", ".x.lock")]
    assert ("exchange" in kinds) == exchanged and kinds.count("unlink") == 1 + 2 + 1  # nosync; tree; lock
    assert [(op.kind, os.path.relpath(op.path, full)) for op in log[-5:]] == [  # children first, then the lock
        ("unlink", "b/data"), ("rmdir", "b"), ("unlink", "index"), ("rmdir", "."), ("unlink", "../.x.lock")]
    assert sum(1 for _ in crash_states(save_dir, before, log, snapshot(save_dir))) > len(log)


# ------------------------------------------------------------------------------ the checker can fail
class _SkipDirFsync:
    """A broken storage: ``fsync_dir`` of the save directory itself does nothing (renames there are never
    made durable except by ``latest``'s own replace)."""

    def __init__(self, inner, save_dir: str):
        self.inner, self.save_dir = inner, save_dir
        self.strategy, self.local = inner.strategy, inner.local

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fsync_dir(self, path: str) -> None:
        if os.path.abspath(path) != self.save_dir:
            self.inner.fsync_dir(path)


class _SkipFileSync:
    """A broken storage: the data files' ``sync`` does nothing."""

    def __init__(self, inner):
        self.inner = inner
        self.strategy, self.local = inner.strategy, inner.local

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_write(self, path: str):
        f = self.inner.open_write(path)
        f.sync = lambda: None
        return f


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
@pytest.mark.parametrize("broken", ["dir_fsync", "file_fsync"])
def test_the_checker_finds_a_missing_fsync(work, save_dir, broken):
    cfg = _config()
    a, b = _state(1), _state(2)
    _save(cfg, save_dir, "t1", a)
    wrap = (lambda st: _SkipDirFsync(st, save_dir)) if broken == "dir_fsync" else _SkipFileSync
    report, log = _run(broken, work, cfg, save_dir, "t2", b, {"t1": [a], "t2": [b]},
                       {"t1": [a], "t2": [b]}, wrap, stop_at=("latest",), next_save=False)
    if broken == "dir_fsync":
        assert FSYNC_DIR in {op.kind for op in log}  # the partial directory's fsyncs still happen
    failures = report.select(("latest",))
    assert any("'t2' does not load" in f.problem for f in failures), summary(report, report.failures, 20)
