"""Faults while saving: a full disk (real and injected, at every file-system step), permission denied, the
directory removed underneath a save, a slow disk, long runs of back-to-back saves, and failures nobody looked
at. Each must end in a clear error or correct backpressure, never a hang and never a silent loss: the future
fails with a CheckpointError carrying the cause, the partial directory is removed, the previous checkpoint
stays latest and loads exactly, training goes on, and the next save works. A failure nobody observed is
raised by the next ``save_checkpoint`` / ``wait`` / ``close``.

File-system faults go through a faulty or slow storage wrapper (asyncckpt.storage.faults, tests/storage_faults.py).
What lies below the storage seam (the fsync and rename system calls the POSIX storage itself makes, in
test_fsync_before_publish) is patched with tests/patching.patch_existing, which fails the test if the hook point
is gone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import pytest
import torch

import asyncckpt
import asyncckpt.commit
import asyncckpt.writer
import crash_child as cc
from asyncckpt import CheckpointError, WriteError
from asyncckpt.format import MANIFEST
from asyncckpt.loader import read_latest
from dist_helpers import forkserver_context
from patching import patch_existing
from reliability import record
from storage_faults import faults_fixture, injected, slowed  # noqa: F401 - the `faults` fixture
from trainer import digest, mlp, train_step

WAIT_S = 30.0  # every wait in this file has this deadline
QUICK = pytest.mark.timeout(60)  # tests of one or two failing saves


class Rig:
    """A tests/trainer.py model, its optimizer and an AsyncCheckpointer; ``save`` remembers the digest of what
    it saved."""

    def __init__(self, save_dir: str, width: int = 32, seed: int = 0, **config):
        self.save_dir = save_dir
        self.model = mlp(seed, (16, width, 8))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.gen = torch.Generator().manual_seed(seed)
        cfg = {"writer": {"threads_per_node": 2, "nice": 0}, "codec": {"chunk_mib": 1 / 64}, "commit_timeout_s": WAIT_S}
        for k, v in config.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        self.saver = asyncckpt.AsyncCheckpointer(self.model, self.opt, config=cfg)
        self.digests: dict[str, str] = {}
        self.step()

    def step(self, cheap: bool = False) -> None:
        if cheap:  # the state changes as in training, at a fraction of the cost
            self.saver.wait_snapshot()  # (a change outside optimizer.step: the lazy snapshot must be complete)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1e-3)
        else:
            train_step(self.model, self.opt, self.gen)

    def save(self, tag: str, remember: bool = True):
        if remember:
            self.digests[tag] = digest(self.saver.state_dict())
        return self.saver.save_checkpoint(self.save_dir, tag=tag)

    def assert_loads(self, tag: str) -> None:
        assert digest(asyncckpt.load(self.save_dir, tag)) == self.digests[tag], f"{tag} does not load exactly"

    def assert_intact(self, good: str, failed: str | None = None) -> None:
        """``good`` is still latest and loads exactly; ``failed`` left no tag and no partial directory."""
        assert read_latest(self.save_dir) == good
        self.assert_loads(good)
        names = os.listdir(self.save_dir)
        if failed is not None:
            assert failed not in asyncckpt.list_tags(self.save_dir)
            assert not [n for n in names if n.endswith(".partial")], names

    def close(self) -> None:
        try:
            self.saver.close(timeout=WAIT_S)
        except asyncckpt.CheckpointError:
            pass


@pytest.fixture
def fast_dir(tmp_path):
    """tmpfs when there is one (fsync is free, the disk's load from other jobs does not matter)."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="asyncckpt-faults-", dir="/dev/shm")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def trained(make_trainer):
    t = make_trainer()
    t.train(1)
    return t


def good_then(save_dir, trainer, saver):
    """Publish tag 'good' and return the model state it holds."""
    saver.save_checkpoint(save_dir, tag="good").result(timeout=30)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(1)  # the failing save holds different values
    return expected


def assert_previous_intact(save_dir, expected, leftovers, latest, same):
    assert latest(save_dir) == "good"
    assert leftovers(save_dir) == []
    assert asyncckpt.list_tags(save_dir) == ["good"]
    same(dict(asyncckpt.load(save_dir)["module"]), expected)
    assert asyncckpt.CheckpointReader(save_dir).verify()["chunks"] > 0


def assert_next_save_works(save_dir, saver, latest, tag="next"):
    res = saver.save_checkpoint(save_dir, tag=tag).result(timeout=30)
    assert res.path == os.path.join(save_dir, tag) and latest(save_dir) == tag
    assert asyncckpt.CheckpointReader(save_dir, tag).verify()["chunks"] > 0


def test_patch_existing_fails_loudly_for_a_missing_hook(monkeypatch):
    """A fault aimed at a name asyncckpt does not have (renamed, removed) is an error, not a silent no-op."""
    for patch in (monkeypatch, None):
        with pytest.raises(AttributeError, match="'_no_such_step'"):
            patch_existing(patch, asyncckpt.writer, "_no_such_step", lambda: None)
    assert not hasattr(asyncckpt.writer, "_no_such_step")
    assert patch_existing(monkeypatch, asyncckpt.writer, "check_index", None) is not None


# ------------------------------------------------------------------------------------------------ disk full
@pytest.mark.thread_only("the file-size limit (RLIMIT_FSIZE) is set on the training process; the service writes")
def test_disk_full_rlimit_fsize_child(tmp_path):
    """RLIMIT_FSIZE in a child (SIGXFSZ ignored, so write() fails with EFBIG) is a disk that fills up."""
    ctx = forkserver_context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=cc.disk_full_child, args=(child, str(tmp_path / "ckpt"), 8192, str(tmp_path / "log")),
                       daemon=True)
    proc.start()
    child.close()
    ok = 0
    try:
        assert parent.poll(WAIT_S * 2), "the disk-full child did not report"
        out = parent.recv()
        proc.join(WAIT_S)
        assert "crash" not in out, out.get("crash")
        assert out["full_error"] and out["full_is_write_error"], out
        assert "File too large" in out["full_error"] and "'full'" in out["full_error"], out["full_error"]
        assert out["latest_after_failure"] == "before"
        assert [n for n in out["listing_after_failure"] if not n.startswith(".latest.")] == ["before", "latest"], out
        assert out["previous_loads_exactly"]
        assert out["after_path"] and out["after_loads_exactly"]
        ok = 1
    finally:
        parent.close()
        record("Faults", "disk full: RLIMIT_FSIZE in a child (EFBIG), then space frees", 1, ok)


@contextlib.contextmanager
def small_tmpfs(path: str, size_kib: int):
    os.makedirs(path)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
                             capture_output=True, text=True, timeout=WAIT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=WAIT_S)


def fill(path: str, leave: int) -> int:
    """Fill the file system of ``path`` until only ``leave`` bytes are free; returns the bytes written."""
    free = shutil.disk_usage(path).free
    want = max(0, free - leave)
    with open(os.path.join(path, "filler"), "wb") as f:
        try:
            f.write(b"\0" * want)
            f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return os.path.getsize(os.path.join(path, "filler"))


def test_disk_full_real_enospc_at_every_fill_level(tmp_path):
    """A real full file system (a small tmpfs): for free space from none to plenty, page by page, a save
    either publishes completely or fails with a clear WriteError/CommitError naming ENOSPC; the previous
    checkpoint stays latest and loads exactly, no partial directory is left, training goes on, and once the
    space frees the next save succeeds."""
    mnt = str(tmp_path / "mnt")
    tried = held = failed_saves = 0
    where: dict[str, int] = {}  # WriteError: while writing files; CommitError: while publishing
    with small_tmpfs(mnt, 2048):
        save_dir = os.path.join(mnt, "ckpt")
        t = Rig(save_dir, width=256, keep_last=2, codec={"compression": False})  # about 40 KiB per save
        try:
            t.save("base").result(WAIT_S)
            size = sum(os.path.getsize(os.path.join(save_dir, "base", n)) for n in os.listdir(os.path.join(save_dir, "base")))
            good = "base"
            for i, leave in enumerate(range(0, size + 5 * 4096, 4096)):
                tried += 1
                t.step()  # training goes on between saves
                fill(mnt, leave)
                tag = f"s{i}"
                err = t.save(tag).exception(WAIT_S)
                if err is None:
                    assert read_latest(save_dir) == tag
                    t.assert_loads(tag)
                    good = tag
                else:
                    failed_saves += 1
                    where[type(err).__name__] = where.get(type(err).__name__, 0) + 1
                    assert isinstance(err, (asyncckpt.WriteError, asyncckpt.CommitError)), repr(err)
                    assert "No space left on device" in str(err) and repr(tag) in str(err), str(err)
                    t.assert_intact(good, failed=tag)
                os.unlink(os.path.join(mnt, "filler"))  # space frees up
                t.step()
                t.save(f"r{i}").result(WAIT_S)  # ... and the next save succeeds
                good = f"r{i}"
                t.assert_loads(good)
                held += 1
        finally:
            t.close()
            record("Faults", "disk full: real ENOSPC on a small tmpfs, one save per free-space level", tried, held,
                   note=f"{failed_saves} saves failed cleanly ({', '.join(f'{k}: {v}' for k, v in sorted(where.items()))}), "
                        f"the rest fit")
    assert failed_saves >= 3 and tried == held


@QUICK
@pytest.mark.parametrize("fsync", [False, True])
def test_disk_full_in_the_writer(fsync, save_dir, trained, make_saver, leftovers, latest, same):
    saver = make_saver(trained, writer={"fsync": fsync, "threads_per_node": 2})
    expected = good_then(save_dir, trained, saver)
    with injected() as faults:  # a few chunks reach the file first
        faults.fail("write", ".bin", OSError(errno.ENOSPC, "No space left on device (injected)"), after=3)
        fut = saver.save_checkpoint(save_dir, tag="bad")
        exc = fut.exception(timeout=30)
    assert isinstance(exc, WriteError) and isinstance(exc, CheckpointError) and isinstance(exc, OSError)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC
    assert "No space left" in str(exc) and "'bad'" in str(exc)
    with pytest.raises(WriteError):
        fut.result(timeout=0)
    assert len([op for op, p in faults.log if op == "write" and p.endswith(".bin")]) > 3
    assert not os.path.exists(os.path.join(save_dir, "bad"))
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    assert_next_save_works(save_dir, saver, latest)
    saver.close()  # the failure was observed: nothing left to raise


@QUICK
def test_disk_full_in_the_file_write(save_dir, trained, make_saver, leftovers, latest, same):
    saver = make_saver(trained)
    expected = good_then(save_dir, trained, saver)
    with injected() as faults:  # the third chunk write of a data file finds the disk full
        faults.fail("write", ".bin", OSError(errno.ENOSPC, "No space left on device (injected write)"), after=2)
        exc = saver.save_checkpoint(save_dir, tag="bad").exception(timeout=30)
    assert isinstance(exc, WriteError) and exc.__cause__.errno == errno.ENOSPC
    writes = [p for op, p in faults.log if op == "write" and p.endswith(".bin")]
    assert len(writes) >= 3  # two writes went through: the file was cut mid-way
    assert ("abort", writes[0]) in faults.log  # the cut file was given up, not closed as complete
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    assert_next_save_works(save_dir, saver, latest)


@QUICK
@pytest.mark.parametrize("step,name", [("write_durable", "manifest.json"), ("replace_atomic", "latest")])
def test_publish_failure(step, name, save_dir, trained, make_saver, leftovers, latest, same):
    saver = make_saver(trained)
    expected = good_then(save_dir, trained, saver)
    with injected() as faults:
        faults.fail(step, name, OSError(errno.ENOSPC, f"No space left on device (injected in {step})"))
        exc = saver.save_checkpoint(save_dir, tag="bad").exception(timeout=30)
    assert isinstance(exc, WriteError) and exc.__cause__.errno == errno.ENOSPC and step in str(exc)
    assert not os.path.exists(os.path.join(save_dir, "bad"))
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    assert_next_save_works(save_dir, saver, latest)


# ------------------------------------------------------------------------------------------ permission denied
def _denied(path_part: str) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied (injected)", path_part)


PERMISSION_CASES = ["data file open", "rank index write", "partial directory (read-only save_dir)", "publish rename",
                    "latest replace", "save_dir under a file"]


@pytest.mark.parametrize("case", PERMISSION_CASES)
def test_permission_denied(tmp_path, case):
    """Permission denied at each file-system step: a real read-only save_dir when not root; as root, chmod
    denies nothing, so the denial is injected at that step (or the save directory is a path under a regular
    file). The save fails with a WriteError naming the tag and chaining the OS error; the previous checkpoint
    stays the only tag, latest, loads exactly and verifies, nothing partial is left; the next save, without the
    fault, succeeds."""
    save_dir = str(tmp_path / "ckpt")
    t = Rig(save_dir)
    ok = 0
    restore_mode = None
    try:
        t.save("good").result(WAIT_S)
        t.step()
        expect, cause = "Permission denied", errno.EACCES
        with injected() as faults:
            if case == "data file open":
                faults.fail("open_write", ".bin", _denied(".bin"))
            elif case == "rank index write":
                faults.fail("write_durable", "rank00000.json", _denied("rank00000.json"))
            elif case == "partial directory (read-only save_dir)" and os.geteuid() != 0:
                restore_mode = os.stat(save_dir).st_mode
                os.chmod(save_dir, stat.S_IRUSR | stat.S_IXUSR)
            elif case == "partial directory (read-only save_dir)":
                faults.fail("makedirs", ".partial", _denied(".partial"))
            elif case == "publish rename":
                faults.fail("rename", ".denied.partial", _denied("rename"))
            elif case == "latest replace":
                faults.fail("replace_atomic", "latest", _denied("latest"))
            elif case == "save_dir under a file":
                (tmp_path / "a_file").write_text("x")
                t.save_dir = str(tmp_path / "a_file" / "ckpt")
                expect, cause = "Not a directory", errno.ENOTDIR
            fut = t.save("denied")
            err = fut.exception(WAIT_S)
        if restore_mode is not None:
            os.chmod(save_dir, restore_mode)
            restore_mode = None
        assert isinstance(err, WriteError) and isinstance(err, CheckpointError), repr(err)
        assert expect in str(err) and "'denied'" in str(err), str(err)
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == cause, "the OS error is chained as the cause"
        t.save_dir = save_dir
        t.assert_intact("good", failed="denied")
        assert asyncckpt.list_tags(save_dir) == ["good"]
        assert not [n for n in os.listdir(save_dir) if n.endswith((".partial", ".tmp"))], os.listdir(save_dir)
        assert asyncckpt.CheckpointReader(save_dir).verify()["chunks"] > 0
        t.step()
        t.save("after").result(WAIT_S)
        t.assert_loads("after")
        assert read_latest(save_dir) == "after"
        assert asyncckpt.CheckpointReader(save_dir, "after").verify()["chunks"] > 0
        ok = 1
    finally:
        if restore_mode is not None:
            os.chmod(save_dir, restore_mode)
        t.close()
        record("Faults", f"permission denied: {case}", 1, ok)


# ---------------------------------------------------------------------------------- directory removed underneath
@pytest.mark.parametrize("what,where", [("save_dir", "writing data"), ("partial dir", "writing data"),
                                        ("save_dir", "before the manifest")])
def test_directory_removed_underneath(tmp_path, what, where):
    save_dir = str(tmp_path / "ckpt")
    t = Rig(save_dir)
    ok = 0
    try:
        t.save("good").result(WAIT_S)
        t.step()
        with injected() as faults:
            gate = faults.gate("write", ".bin") if where == "writing data" else faults.gate("write_durable", MANIFEST)
            fut = t.save("gone")
            assert gate.entered.wait(WAIT_S)
            shutil.rmtree(save_dir if what == "save_dir" else os.path.join(save_dir, ".gone.partial"))
            gate.open()
            err = fut.exception(WAIT_S)  # never a hang...
        assert isinstance(err, asyncckpt.CheckpointError), f"the save reported success: {fut.result()}"  # ...nor success
        assert "No such file or directory" in str(err) and "'gone'" in str(err), str(err)
        assert "gone" not in asyncckpt.list_tags(save_dir)
        if what == "partial dir":
            t.assert_intact("good", failed="gone")
        t.step()
        t.save("again").result(WAIT_S)  # the directory is recreated
        t.assert_loads("again")
        assert read_latest(save_dir) == "again"
        ok = 1
    finally:
        t.close()
        record("Faults", f"{what} removed underneath a save ({where})", 1, ok)


# ------------------------------------------------------------------------------------------- slow disk
@pytest.mark.parametrize("max_inflight", [1, 2])
@pytest.mark.parametrize("on_busy", ["wait", "skip", "error"])
def test_slow_disk_backpressure(fast_dir, faults, max_inflight, on_busy):
    """The disk stalls (a gate in front of every chunk write) with max_inflight saves in flight: the next save
    waits (and finishes once the disk moves), is skipped with a skipped future, or raises SaverBusyError,
    per on_busy; a save that waits longer than commit_timeout_s gives up with SaverBusyError rather than
    hanging. Once the disk moves, every future resolves and every save not skipped or refused is published
    and loads exactly."""
    timeout = 1.0 if on_busy == "wait" else WAIT_S
    t = Rig(os.path.join(fast_dir, "ckpt"), max_inflight=max_inflight, on_busy=on_busy, commit_timeout_s=timeout)
    ok = 0
    opened = faults.gate("write", ".bin")  # a stalled disk: every chunk write waits
    try:
        futs = {}
        for i in range(max_inflight):  # these take every staging slot and stall in the writer
            futs[f"s{i}"] = t.save(f"s{i}")
            t.step()
        t0 = time.monotonic()
        if on_busy == "wait":
            # no slot frees within commit_timeout_s: the save gives up instead of hanging
            with pytest.raises(asyncckpt.SaverBusyError, match="no staging slot became free"):
                t.save("late")
            assert timeout * 0.9 <= time.monotonic() - t0 < timeout + 5
            # a save that waits while the disk moves again gets its slot and is published
            waiter_result = {}
            waiter = threading.Thread(target=lambda: waiter_result.setdefault("fut", t.save("waited")))
            waiter.start()
            waiter.join(0.3)
            assert waiter.is_alive(), "on_busy=wait returned while every slot was busy"
            opened.open()
            waiter.join(WAIT_S)
            assert not waiter.is_alive()
            futs["waited"] = waiter_result["fut"]
        elif on_busy == "skip":
            skipped = t.save("skipped")
            assert time.monotonic() - t0 < 5 and skipped.done() and skipped.result(0).skipped
            opened.open()
        else:
            with pytest.raises(asyncckpt.SaverBusyError, match="on_busy=error"):
                t.save("refused")
            assert time.monotonic() - t0 < 5
            opened.open()
        for tag, fut in futs.items():
            res = fut.result(WAIT_S)
            assert not res.skipped and res.path == os.path.join(t.save_dir, tag)
            t.assert_loads(tag)
        assert set(asyncckpt.list_tags(t.save_dir)) == set(futs)
        assert read_latest(t.save_dir) == list(futs)[-1]
        ok = 1
    finally:
        opened.open()
        t.close()
        record("Faults", f"stalled disk: max_inflight={max_inflight}, on_busy={on_busy}", 1, ok)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("max_inflight", [1, 2])
@pytest.mark.parametrize("on_busy", ["wait", "skip", "error"])
def test_back_to_back_saves_on_a_slow_disk(fast_dir, faults, max_inflight, on_busy):
    """100 back-to-back saves on a disk slowed by injected delays: every call either returns a future that
    resolves (published or skipped) or raises SaverBusyError (on_busy=error); every published tag loads
    exactly; staging allocations stay at one buffer per slot; RSS stays flat."""
    slowed(faults, "write", 0.0005, ".bin")  # a slow disk
    t = Rig(os.path.join(fast_dir, "ckpt"), width=1024, max_inflight=max_inflight, on_busy=on_busy, keep_last=3,
                codec={"chunk_mib": 1.0})  # about 0.4 MiB of state per save
    n, warm = 100, 5
    futures: list = []
    published: list[str] = []
    skipped = refused = 0
    rss0 = rss1 = 0
    ok = 0
    try:
        for i in range(warm + n):
            if i == warm:
                allocations, rss0 = t.saver.engine.pool.allocations, _rss_bytes()
            t.step(cheap=True)
            try:
                futures.append((f"s{i:03d}", t.save(f"s{i:03d}")))
            except asyncckpt.SaverBusyError:
                assert on_busy == "error"
                refused += 1
        for tag, fut in futures:
            res = fut.result(WAIT_S)
            if res.skipped:
                skipped += 1
            else:
                published.append(tag)
        rss1 = _rss_bytes()
        assert len(published) + skipped + refused == warm + n
        assert t.saver.engine.pool.allocations == allocations <= max_inflight
        assert rss1 - rss0 < 16 << 20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over {n} saves"
        if on_busy == "wait":
            assert len(published) == warm + n
        t.saver.close(timeout=WAIT_S)  # retention runs after each future resolved: let it finish
        kept = asyncckpt.list_tags(t.save_dir)
        assert kept == published[-3:], (kept, published[-3:])
        for tag in kept:
            t.assert_loads(tag)
        assert read_latest(t.save_dir) == published[-1]
        ok = 1
    finally:
        t.close()
        record("Faults", f"{n} back-to-back saves on a slow disk: max_inflight={max_inflight}, on_busy={on_busy}", 1, ok,
               note=f"{warm} warm-up + {n} saves: published {len(published)}, skipped {skipped}, refused {refused}; "
                    f"staging allocations {t.saver.engine.pool.allocations}, RSS {(rss1 - rss0) / 2**20:+.1f} MiB")


# ------------------------------------------------------------------------------ unobserved failures
def _fail_once(save_dir, saver, wait_resolved, tag="bad"):
    with injected() as faults:  # the disk is full for this save only
        faults.fail("write", ".bin", OSError(errno.ENOSPC, "No space left on device (injected)"))
        fut = saver.save_checkpoint(save_dir, tag=tag)
        wait_resolved(fut)  # resolved, but nobody looked at the outcome
    return fut


@QUICK
def test_unobserved_failure_raised_by_next_save(save_dir, trained, make_saver, wait_resolved, latest):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, wait_resolved)
    with pytest.raises(WriteError) as ei:
        saver.save_checkpoint(save_dir, tag="next")
    assert ei.value is fut.exception()
    assert not os.path.exists(os.path.join(save_dir, "next"))  # that call saved nothing
    assert saver.save_checkpoint(save_dir, tag="next").result(timeout=30).tag == "next"  # raised once only
    saver.wait(timeout=30)
    assert latest(save_dir) == "next"


@QUICK
def test_unobserved_failure_raised_by_wait(save_dir, trained, make_saver, wait_resolved):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, wait_resolved)
    with pytest.raises(WriteError) as ei:
        saver.wait(timeout=30)
    assert ei.value.__cause__.errno == errno.ENOSPC
    assert saver.wait(timeout=30) == []  # raised once
    assert fut.done()


@QUICK
def test_unobserved_failure_raised_by_close(save_dir, trained, make_saver, wait_resolved):
    saver = make_saver(trained)
    _fail_once(save_dir, saver, wait_resolved)
    with pytest.raises(WriteError):
        saver.close(timeout=30)
    with pytest.raises(CheckpointError, match="closed"):  # closed all the same
        saver.save_checkpoint(save_dir, tag="late")
    saver.close()


@QUICK
def test_unobserved_failure_raised_by_context_exit(save_dir, trained, fast_config, wait_resolved):
    with pytest.raises(WriteError):
        with asyncckpt.AsyncCheckpointer(trained.model, trained.optimizer, config=fast_config()) as saver:
            _fail_once(save_dir, saver, wait_resolved)
    assert saver.engine._closed


@QUICK
def test_context_exit_keeps_the_user_exception(save_dir, trained, fast_config, wait_resolved):
    with pytest.raises(KeyError, match="mine"):
        with asyncckpt.AsyncCheckpointer(trained.model, trained.optimizer, config=fast_config()) as saver:
            _fail_once(save_dir, saver, wait_resolved)
            raise KeyError("mine")  # not hidden behind the background failure


@QUICK
def test_observed_failure_is_not_raised_again(save_dir, trained, make_saver, wait_resolved):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, wait_resolved)
    assert isinstance(fut.exception(), WriteError)
    assert saver.save_checkpoint(save_dir, tag="ok").result(timeout=30).tag == "ok"
    assert [r.tag for r in saver.wait(timeout=30)] == ["ok"]
    saver.close()


@QUICK
def test_failure_while_collecting_state_releases_the_slot(save_dir, trained, make_saver):
    saver = make_saver(trained, on_busy="error")
    with pytest.raises(asyncckpt.PickleNotAllowedError):
        saver.save_checkpoint(save_dir, tag="x", client_state={"bad": object()})
    with pytest.raises(TypeError):
        saver.save_checkpoint(save_dir, tag="y", client_state=42)  # not a mapping
    assert saver.save_checkpoint(save_dir, tag="x").result(timeout=30).tag == "x"  # the only slot is free
    assert asyncckpt.list_tags(save_dir) == ["x"]


@QUICK
def test_functional_save_failure(save_dir, fast_config, leftovers):
    cfg = fast_config(codec={"level": 2})  # its own engine
    asyncckpt.save({"w": torch.ones(5)}, save_dir, "good", config=cfg).result(timeout=30)
    with injected() as faults:
        faults.fail("write", ".bin", OSError(errno.EIO, "Input/output error (injected)"))
        fut = asyncckpt.save({"w": torch.zeros(5)}, save_dir, "bad", config=cfg)
        with pytest.raises(WriteError, match="Input/output error"):
            fut.result(timeout=30)
    assert leftovers(save_dir) == [] and asyncckpt.list_tags(save_dir) == ["good"]
    assert torch.equal(asyncckpt.load(save_dir)["w"], torch.ones(5))
    asyncckpt.save({"w": torch.full((5,), 2.0)}, save_dir, "again", config=cfg).result(timeout=30)
    assert torch.equal(asyncckpt.load(save_dir)["w"], torch.full((5,), 2.0))


# ----------------------------------------------------------------------------------- load verification
@QUICK
def test_load_verifies_checksums(save_dir, fast_config):
    state = {"noise": torch.randint(0, 256, (50_000,), dtype=torch.uint8)}  # stored raw: easy to damage
    asyncckpt.save(state, save_dir, "t", config=fast_config()).result(timeout=30)
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    rec = reader.records["noise"][0][1]
    chunk = rec.chunks[1]
    assert chunk.codec == "raw"
    path = os.path.join(save_dir, "t", rec.file)
    with open(path, "r+b") as f:
        f.seek(chunk.offset + 7)
        byte = f.read(1)
        f.seek(chunk.offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(asyncckpt.CorruptCheckpointError, match=r"chunk 1 .*'noise'.*checksum mismatch") as ei:
        asyncckpt.load(save_dir, "t")
    assert rec.file in str(ei.value)
    damaged = asyncckpt.load(save_dir, "t", verify=False)["noise"]  # verification can be turned off
    assert (damaged != state["noise"]).sum().item() == 1


@pytest.mark.thread_only("patches os.fsync/os.rename in the training process; the service fsyncs and renames")
@QUICK
def test_fsync_before_publish(save_dir, trained, make_saver, monkeypatch):
    """With fsync on, every file of the tag and the partial directory are fsynced before the rename that
    publishes it, and save_dir after it; with fsync off, nothing is."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", os.path.realpath(src)))
        return real_rename(src, dst, *a, **k)

    patch_existing(monkeypatch, os, "fsync", fsync)
    patch_existing(monkeypatch, os, "rename", rename)
    saver = make_saver(trained, writer={"fsync": True})
    saver.save_checkpoint(save_dir, tag="durable", save_latest=False).result(timeout=30)
    root = os.path.realpath(save_dir)
    partial = os.path.join(root, ".durable.partial")
    publish = events.index(("rename", partial))
    synced_before = {p for kind, p in events[:publish] if kind == "fsync"}
    files = set(asyncckpt.CheckpointReader(save_dir, "durable").files)
    assert files >= {"manifest.json", "rank00000.json", "rank00000-0.bin"}
    assert {os.path.join(partial, n) for n in files} | {partial} <= synced_before
    assert ("fsync", root) in events[publish:]

    events.clear()
    make_saver(trained).save_checkpoint(save_dir, tag="fast").result(timeout=30)  # FAST: fsync off
    assert not [p for kind, p in events if kind == "fsync" and p.startswith(root)]
