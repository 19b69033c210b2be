"""Injected write failures: permission denied, disk full mid-file (in the codec and in the file write). The
future fails with a CheckpointError carrying the cause, the partial directory is removed, ``latest`` still
names the previous tag, which still loads, and the next save works. A failure nobody observed is raised by
the next ``save_checkpoint`` / ``wait`` / ``close``."""
from __future__ import annotations

import errno
import os
import stat
import types

import aiofiles
import pytest
import torch

import asyncckpt
import asyncckpt.commit
from asyncckpt import CheckpointError, WriteError

pytestmark = pytest.mark.timeout(60)


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


# ------------------------------------------------------------------------------------- disk full mid-file
@pytest.mark.parametrize("fsync", [False, True])
def test_disk_full_in_the_writer(fsync, save_dir, trained, make_saver, failing_codec, leftovers, latest, same):
    saver = make_saver(trained, writer={"fsync": fsync, "threads_per_node": 2})
    expected = good_then(save_dir, trained, saver)
    codec = failing_codec(saver.engine, ok_chunks=3)  # a few chunks reach the file first
    fut = saver.save_checkpoint(save_dir, tag="bad")
    exc = fut.exception(timeout=30)
    assert isinstance(exc, WriteError) and isinstance(exc, CheckpointError) and isinstance(exc, OSError)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC
    assert "No space left" in str(exc) and "'bad'" in str(exc)
    with pytest.raises(WriteError):
        fut.result(timeout=0)
    assert codec.calls > 3 and codec.failures >= 1
    assert not os.path.exists(os.path.join(save_dir, "bad"))
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    codec.heal()
    assert_next_save_works(save_dir, saver, latest)
    saver.close()  # the failure was observed: nothing left to raise


class _FullDiskFile:
    """An aiofiles file whose writes fail with ENOSPC after ``ok_writes`` successful writes."""

    def __init__(self, f, budget: dict):
        self._f = f
        self._budget = budget

    async def write(self, data):
        if self._budget["ok_writes"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected write)")
        self._budget["ok_writes"] -= 1
        return await self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_disk_full_in_the_file_write(save_dir, trained, make_saver, monkeypatch, leftovers, latest, same):
    saver = make_saver(trained)
    expected = good_then(save_dir, trained, saver)
    real_open = aiofiles.open
    budget = {"ok_writes": 2}

    class _Ctx:
        def __init__(self, *a, **k):
            self._cm = real_open(*a, **k)

        async def __aenter__(self):
            return _FullDiskFile(await self._cm.__aenter__(), budget)

        async def __aexit__(self, *exc):
            return await self._cm.__aexit__(*exc)

    monkeypatch.setattr(asyncckpt.writer.aiofiles, "open", _Ctx)
    fut = saver.save_checkpoint(save_dir, tag="bad")
    exc = fut.exception(timeout=30)
    assert isinstance(exc, WriteError) and exc.__cause__.errno == errno.ENOSPC
    assert budget["ok_writes"] == 0  # two writes went through: the file was cut mid-way
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    monkeypatch.setattr(asyncckpt.writer.aiofiles, "open", real_open)
    assert_next_save_works(save_dir, saver, latest)


# --------------------------------------------------------------------------------------- read-only dir
def test_read_only_save_dir(save_dir, trained, make_saver, monkeypatch, leftovers, latest, same):
    saver = make_saver(trained)
    expected = good_then(save_dir, trained, saver)
    if os.geteuid() != 0:
        mode = os.stat(save_dir).st_mode
        os.chmod(save_dir, stat.S_IRUSR | stat.S_IXUSR)
        restore = lambda: os.chmod(save_dir, mode)  # noqa: E731
    else:  # root ignores permission bits: make creating the partial directory fail the way EACCES does
        real_os = asyncckpt.commit.os

        def makedirs(path, *a, **k):
            if os.path.dirname(os.path.abspath(path)) == os.path.abspath(save_dir) and not os.path.exists(path):
                raise PermissionError(errno.EACCES, "Permission denied (injected)", path)
            return real_os.makedirs(path, *a, **k)

        proxy = types.SimpleNamespace(**{n: getattr(real_os, n) for n in dir(real_os) if not n.startswith("__")})
        proxy.makedirs = makedirs
        monkeypatch.setattr(asyncckpt.commit, "os", proxy)
        restore = lambda: monkeypatch.setattr(asyncckpt.commit, "os", real_os)  # noqa: E731
    try:
        fut = saver.save_checkpoint(save_dir, tag="bad")
        exc = fut.exception(timeout=30)
    finally:
        restore()
    assert isinstance(exc, WriteError) and isinstance(exc, CheckpointError)
    assert "Permission denied" in str(exc) and "bad" in str(exc)
    assert isinstance(exc.__cause__, PermissionError), "the OS error is chained as the cause"
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    assert_next_save_works(save_dir, saver, latest)


@pytest.mark.parametrize("step", ["write_durable", "replace_atomic"])  # the manifest, then `latest`
def test_publish_failure(step, save_dir, trained, make_saver, monkeypatch, leftovers, latest, same):
    saver = make_saver(trained)
    expected = good_then(save_dir, trained, saver)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, f"No space left on device (injected in {step})")

    monkeypatch.setattr(asyncckpt.commit, step, full)
    exc = saver.save_checkpoint(save_dir, tag="bad").exception(timeout=30)
    assert isinstance(exc, WriteError) and exc.__cause__.errno == errno.ENOSPC and step in str(exc)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(save_dir, "bad"))
    assert_previous_intact(save_dir, expected, leftovers, latest, same)
    assert_next_save_works(save_dir, saver, latest)


# ------------------------------------------------------------------------------ unobserved failures
def _fail_once(save_dir, saver, failing_codec, wait_resolved, tag="bad"):
    codec = failing_codec(saver.engine, ok_chunks=0)
    fut = saver.save_checkpoint(save_dir, tag=tag)
    wait_resolved(fut)  # resolved, but nobody looked at the outcome
    codec.heal()
    return fut


def test_unobserved_failure_raised_by_next_save(save_dir, trained, make_saver, failing_codec, wait_resolved, latest):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, failing_codec, wait_resolved)
    with pytest.raises(WriteError) as ei:
        saver.save_checkpoint(save_dir, tag="next")
    assert ei.value is fut.exception()
    assert not os.path.exists(os.path.join(save_dir, "next"))  # that call saved nothing
    assert saver.save_checkpoint(save_dir, tag="next").result(timeout=30).tag == "next"  # raised once only
    saver.wait(timeout=30)
    assert latest(save_dir) == "next"


def test_unobserved_failure_raised_by_wait(save_dir, trained, make_saver, failing_codec, wait_resolved):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, failing_codec, wait_resolved)
    with pytest.raises(WriteError) as ei:
        saver.wait(timeout=30)
    assert ei.value.__cause__.errno == errno.ENOSPC
    assert saver.wait(timeout=30) == []  # raised once
    assert fut.done()


def test_unobserved_failure_raised_by_close(save_dir, trained, make_saver, failing_codec, wait_resolved):
    saver = make_saver(trained)
    _fail_once(save_dir, saver, failing_codec, wait_resolved)
    with pytest.raises(WriteError):
        saver.close(timeout=30)
    with pytest.raises(CheckpointError, match="closed"):  # closed all the same
        saver.save_checkpoint(save_dir, tag="late")
    saver.close()


def test_unobserved_failure_raised_by_context_exit(save_dir, trained, fast_config, failing_codec, wait_resolved):
    with pytest.raises(WriteError):
        with asyncckpt.AsyncCheckpointer(trained.model, trained.optimizer, config=fast_config()) as saver:
            _fail_once(save_dir, saver, failing_codec, wait_resolved)
    assert saver.engine._closed


def test_context_exit_keeps_the_user_exception(save_dir, trained, fast_config, failing_codec, wait_resolved):
    with pytest.raises(KeyError, match="mine"):
        with asyncckpt.AsyncCheckpointer(trained.model, trained.optimizer, config=fast_config()) as saver:
            _fail_once(save_dir, saver, failing_codec, wait_resolved)
            raise KeyError("mine")  # not hidden behind the background failure


def test_observed_failure_is_not_raised_again(save_dir, trained, make_saver, failing_codec, wait_resolved):
    saver = make_saver(trained)
    fut = _fail_once(save_dir, saver, failing_codec, wait_resolved)
    assert isinstance(fut.exception(), WriteError)
    assert saver.save_checkpoint(save_dir, tag="ok").result(timeout=30).tag == "ok"
    assert [r.tag for r in saver.wait(timeout=30)] == ["ok"]
    saver.close()


def test_failure_while_collecting_state_releases_the_slot(save_dir, trained, make_saver):
    saver = make_saver(trained, on_busy="error")
    with pytest.raises(asyncckpt.PickleNotAllowedError):
        saver.save_checkpoint(save_dir, tag="x", client_state={"bad": object()})
    with pytest.raises(TypeError):
        saver.save_checkpoint(save_dir, tag="y", client_state=42)  # not a mapping
    assert saver.save_checkpoint(save_dir, tag="x").result(timeout=30).tag == "x"  # the only slot is free
    assert asyncckpt.list_tags(save_dir) == ["x"]


def test_functional_save_failure(save_dir, fast_config, monkeypatch, leftovers):
    from asyncckpt import api

    cfg = fast_config(codec={"level": 2})  # its own engine
    asyncckpt.save({"w": torch.ones(5)}, save_dir, "good", config=cfg).result(timeout=30)
    engine = api._engine(cfg)
    real = engine.writer.codec
    monkeypatch.setattr(engine.writer, "codec", types.SimpleNamespace(
        encode=lambda raw, itemsize: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error (injected)"))))
    fut = asyncckpt.save({"w": torch.zeros(5)}, save_dir, "bad", config=cfg)
    with pytest.raises(WriteError, match="Input/output error"):
        fut.result(timeout=30)
    monkeypatch.setattr(engine.writer, "codec", real)
    assert leftovers(save_dir) == [] and asyncckpt.list_tags(save_dir) == ["good"]
    assert torch.equal(asyncckpt.load(save_dir)["w"], torch.ones(5))
    asyncckpt.save({"w": torch.full((5,), 2.0)}, save_dir, "again", config=cfg).result(timeout=30)
    assert torch.equal(asyncckpt.load(save_dir)["w"], torch.full((5,), 2.0))


# ----------------------------------------------------------------------------------- load verification
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

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
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
