"""Faults while saving: a full disk, permission denied, the directory removed underneath a save, a slow disk,
and long runs of back-to-back saves. Each must end in a clear error or correct backpressure, never a hang and
never a silent loss: the previous checkpoint stays loadable, training goes on, and the next save works.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
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
from asyncckpt.loader import read_latest
from reliability import record

WAIT_S = 30.0  # every wait in this file has this deadline


class Trainer:
    """A tiny model, its optimizer and an AsyncCheckpointer; ``save`` remembers the digest of what it saved."""

    def __init__(self, save_dir: str, width: int = 32, seed: int = 0, **config):
        self.save_dir = save_dir
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))
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
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1e-3)
        else:
            cc.train_step(self.model, self.opt, self.gen)

    def save(self, tag: str, remember: bool = True):
        if remember:
            self.digests[tag] = cc.digest(self.saver.state_dict())
        return self.saver.save_checkpoint(self.save_dir, tag=tag)

    def assert_loads(self, tag: str) -> None:
        assert cc.digest(asyncckpt.load(self.save_dir, tag)) == self.digests[tag], f"{tag} does not load exactly"

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


# ------------------------------------------------------------------------------------------------ disk full
def test_disk_full_rlimit_fsize_child(tmp_path):
    """RLIMIT_FSIZE in a child (SIGXFSZ ignored, so write() fails with EFBIG) is a disk that fills up."""
    ctx = cc.forkserver_context()
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
        t = Trainer(save_dir, width=256, keep_last=2, codec={"compression": False})  # about 40 KiB per save
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


# ------------------------------------------------------------------------------------------ permission denied
def _deny(path_part: str):
    def raiser(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied (injected)", path_part)

    return raiser


PERMISSION_CASES = ["data file open", "rank index write", "partial directory", "publish rename", "latest replace",
                    "save_dir under a file"]


@pytest.mark.parametrize("case", PERMISSION_CASES)
def test_permission_denied(tmp_path, monkeypatch, case):
    """As root, chmod does not deny anything, so the denial is injected at each file-system step (or the
    save directory is a path under a regular file). The save fails with an error naming the cause; the
    previous checkpoint stays latest and loads; the next save, without the fault, succeeds."""
    save_dir = str(tmp_path / "ckpt")
    t = Trainer(save_dir)
    ok = 0
    try:
        t.save("good").result(WAIT_S)
        t.step()
        expect = "Permission denied"
        with monkeypatch.context() as m:
            if case == "data file open":
                real_open = asyncckpt.writer.aiofiles.open

                def deny_open(path, *a, **kw):
                    if str(path).endswith(".bin"):
                        raise PermissionError(errno.EACCES, "Permission denied (injected)", str(path))
                    return real_open(path, *a, **kw)

                m.setattr(asyncckpt.writer.aiofiles, "open", deny_open)
            elif case == "rank index write":
                m.setattr(asyncckpt.writer, "write_durable", _deny("rank00000.json"))
            elif case == "partial directory":
                real_makedirs = os.makedirs

                def deny_partial(path, *a, **kw):
                    if str(path).endswith(".partial"):
                        raise PermissionError(errno.EACCES, "Permission denied (injected)", str(path))
                    return real_makedirs(path, *a, **kw)

                m.setattr(asyncckpt.commit.os, "makedirs", deny_partial)
            elif case == "publish rename":
                m.setattr(asyncckpt.commit.os, "rename", _deny("rename"))
            elif case == "latest replace":
                m.setattr(asyncckpt.commit, "replace_atomic", _deny("latest"))
            elif case == "save_dir under a file":
                (tmp_path / "a_file").write_text("x")
                t.save_dir = str(tmp_path / "a_file" / "ckpt")
                expect = "Not a directory"
            fut = t.save("denied")
            err = fut.exception(WAIT_S)
        assert isinstance(err, asyncckpt.CheckpointError), repr(err)
        assert expect in str(err) and "'denied'" in str(err), str(err)
        if case == "save_dir under a file":
            t.save_dir = save_dir
        t.assert_intact("good", failed="denied")
        t.step()
        t.save("after").result(WAIT_S)
        t.assert_loads("after")
        assert read_latest(save_dir) == "after"
        ok = 1
    finally:
        t.close()
        record("Faults", f"permission denied: {case}", 1, ok)


# ---------------------------------------------------------------------------------- directory removed underneath
class Gate:
    """Holds a patched step until the test opens it; ``entered`` tells the test the save got there."""

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.opened.wait(WAIT_S), "the gate was never opened"


@pytest.mark.parametrize("what,where", [("save_dir", "writing data"), ("partial dir", "writing data"),
                                        ("save_dir", "before the manifest")])
def test_directory_removed_underneath(tmp_path, monkeypatch, what, where):
    save_dir = str(tmp_path / "ckpt")
    t = Trainer(save_dir)
    ok = 0
    try:
        t.save("good").result(WAIT_S)
        t.step()
        gate = Gate()
        if where == "writing data":
            real_drain = asyncckpt.writer._drain_one

            async def drain(f, window, pos):
                gate.hold()
                return await real_drain(f, window, pos)

            monkeypatch.setattr(asyncckpt.writer, "_drain_one", drain)
        else:
            real_write = asyncckpt.commit.write_durable

            def write(path, data, fsync=True):
                gate.hold()
                return real_write(path, data, fsync)

            monkeypatch.setattr(asyncckpt.commit, "write_durable", write)
        fut = t.save("gone")
        assert gate.entered.wait(WAIT_S)
        shutil.rmtree(save_dir if what == "save_dir" else os.path.join(save_dir, ".gone.partial"))
        gate.opened.set()
        err = fut.exception(WAIT_S)  # never a hang...
        assert isinstance(err, asyncckpt.CheckpointError), f"the save reported success: {fut.result()}"  # ...nor success
        assert "No such file or directory" in str(err) and "'gone'" in str(err), str(err)
        assert "gone" not in asyncckpt.list_tags(save_dir)
        if what == "partial dir":
            t.assert_intact("good", failed="gone")
        monkeypatch.undo()
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
def test_slow_disk_backpressure(fast_dir, monkeypatch, max_inflight, on_busy):
    """The disk stalls (a gate in front of every chunk write) with max_inflight saves in flight: the next save
    waits (and finishes once the disk moves), is skipped with a skipped future, or raises SaverBusyError,
    per on_busy; a save that waits longer than commit_timeout_s gives up with SaverBusyError rather than
    hanging. Once the disk moves, every future resolves and every save not skipped or refused is published
    and loads exactly."""
    opened = threading.Event()
    real_drain = asyncckpt.writer._drain_one

    async def slow_drain(f, window, pos):
        assert opened.wait(WAIT_S)
        return await real_drain(f, window, pos)

    monkeypatch.setattr(asyncckpt.writer, "_drain_one", slow_drain)
    timeout = 1.0 if on_busy == "wait" else WAIT_S
    t = Trainer(os.path.join(fast_dir, "ckpt"), max_inflight=max_inflight, on_busy=on_busy, commit_timeout_s=timeout)
    ok = 0
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
            opened.set()
            waiter.join(WAIT_S)
            assert not waiter.is_alive()
            futs["waited"] = waiter_result["fut"]
        elif on_busy == "skip":
            skipped = t.save("skipped")
            assert time.monotonic() - t0 < 5 and skipped.done() and skipped.result(0).skipped
            opened.set()
        else:
            with pytest.raises(asyncckpt.SaverBusyError, match="on_busy=error"):
                t.save("refused")
            assert time.monotonic() - t0 < 5
            opened.set()
        for tag, fut in futs.items():
            res = fut.result(WAIT_S)
            assert not res.skipped and res.path == os.path.join(t.save_dir, tag)
            t.assert_loads(tag)
        assert set(asyncckpt.list_tags(t.save_dir)) == set(futs)
        assert read_latest(t.save_dir) == list(futs)[-1]
        ok = 1
    finally:
        opened.set()
        t.close()
        record("Faults", f"stalled disk: max_inflight={max_inflight}, on_busy={on_busy}", 1, ok)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("max_inflight", [1, 2])
@pytest.mark.parametrize("on_busy", ["wait", "skip", "error"])
def test_back_to_back_saves_on_a_slow_disk(fast_dir, monkeypatch, max_inflight, on_busy):
    """100 back-to-back saves on a disk slowed by injected delays: every call either returns a future that
    resolves (published or skipped) or raises SaverBusyError (on_busy=error); every published tag loads
    exactly; staging allocations stay at one buffer per slot; RSS stays flat."""
    real_drain = asyncckpt.writer._drain_one

    async def slow_drain(f, window, pos):
        await asyncio.sleep(0.0005)  # a slow disk
        return await real_drain(f, window, pos)

    monkeypatch.setattr(asyncckpt.writer, "_drain_one", slow_drain)
    t = Trainer(os.path.join(fast_dir, "ckpt"), width=1024, max_inflight=max_inflight, on_busy=on_busy, keep_last=3,
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

