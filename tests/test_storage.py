"""The storage seam: the storage a save directory gets, the config group, the fault wrappers, and that every
file operation of a POSIX save goes through the storage object, in the order that makes it crash-safe."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import asyncckpt
from asyncckpt import ConfigError, WriteError
from asyncckpt.config import Config
from asyncckpt.storage import MARKER, RENAME, PosixStorage, is_url, open_storage, wrapping
from asyncckpt.storage.faults import Faults
from storage_faults import injected

WAIT_S = 60


def test_storage_by_save_dir(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), PosixStorage) and open_storage(str(tmp_path)).strategy == RENAME
    assert open_storage("relative/dir").local
    for url in ("s3://bucket/run", "S3://bucket/run", "gs://bucket/x", "memory://x"):
        assert is_url(url), url
    for path in ("/abs/dir", "rel/dir", "file:///abs/dir", "weird:name/dir", "1x://y", "dir"):
        assert not is_url(path), path
    pytest.importorskip("s3fs")
    s3 = open_storage("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:1", "block_size": 5 << 20})
    assert s3.strategy == MARKER and not s3.local and s3.block_size == 5 << 20
    assert s3.fs.config_kwargs["retries"] == {"mode": "standard", "max_attempts": 10}  # botocore's backoff
    assert s3.staging_dir("s3://bucket/run", "t") == "s3://bucket/run/t"  # written in place, marker last
    assert open_storage("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:1", "block_size": 5 << 20}) is s3
    mine = open_storage("s3://b/r", {"config_kwargs": {"retries": {"max_attempts": 2}}})
    assert mine.fs.config_kwargs["retries"] == {"max_attempts": 2}  # the options' own retries win


@pytest.mark.parametrize("bad,key", [
    ({"options": 5}, "storage.options"), ({"options": ["endpoint_url"]}, "storage.options"),
    ({"options": {"not an identifier": 1}}, "storage.options"), ({"options": {3: 1}}, "storage.options"),
    ({"options": {"block_size": 1 << 20}}, "storage.options.block_size"),
    ({"block_mib": 4}, "storage.block_mib"), ({"block_mib": 6000}, "storage.block_mib"),
    ({"block_mib": "64"}, "storage.block_mib"), ({"block_mib": float("nan")}, "storage.block_mib"),
    ({"endpoint_url": "x"}, "storage.endpoint_url"),
])
def test_storage_config_is_checked(bad, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        Config.from_dict({"storage": bad})


def test_storage_config_reaches_the_storage():
    c = Config.from_dict({"storage": {"options": {"endpoint_url": "http://h:1", "client_kwargs": {"a": 1}},
                                      "block_mib": 8}})
    assert c.storage.fsspec_options() == {"endpoint_url": "http://h:1", "client_kwargs": {"a": 1},
                                          "block_size": 8 << 20}
    assert hash(c) == hash(Config.from_dict({"storage": {"block_mib": 8}}))  # still hashable (engines are cached)


def test_node_local_storage_needs_a_local_path():
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config={"use_node_local_storage": True}) as saver:
        with pytest.raises(ConfigError, match="use_node_local_storage.*s3://b/run"):
            saver.save_checkpoint("s3://b/run", tag="t")


# -------------------------------------------------------------------------------------------- faults
def test_fault_rules_count_and_answer(tmp_path):
    faults = Faults()
    faults.fail("write_durable", "x", OSError(errno.EIO, "boom"), after=1, times=2)
    faults.answer("exchange", False)
    st = faults.wrap(open_storage(str(tmp_path)))
    outcomes = []
    for i in range(5):
        try:
            st.write_durable(str(tmp_path / f"x{i}"), b"data")
            outcomes.append("ok")
        except OSError:
            outcomes.append("fail")
    assert outcomes == ["ok", "fail", "fail", "ok", "ok"]  # one through, then two failures, then through again
    st.write_durable(str(tmp_path / "y"), b"data")  # no match: never counted
    assert sorted(os.listdir(tmp_path)) == ["x0", "x3", "x4", "y"]
    os.mkdir(tmp_path / "a")
    os.mkdir(tmp_path / "b")
    assert st.exchange(str(tmp_path / "a"), str(tmp_path / "b")) is False  # not performed
    assert [op for op, _ in faults.log] == ["write_durable"] * 6 + ["exchange"]
    with pytest.raises(ValueError, match="no storage operation 'fsync'"):
        faults.on("fsync", lambda op, path: None)


def test_wrapping_ends_with_its_block(tmp_path):
    faults = Faults()
    with wrapping(faults.wrap):
        assert open_storage(str(tmp_path)) is not open_storage.__globals__["POSIX"]
    assert open_storage(str(tmp_path)) is open_storage.__globals__["POSIX"]


def test_a_failing_chunk_write_aborts_the_file_and_publishes_nothing(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    state = {"w": torch.randn(50_000)}
    asyncckpt.save(state, save_dir, "good", config={"codec": {"chunk_mib": 1 / 16}}).result(WAIT_S)
    with injected() as faults:
        faults.fail("write", ".bin", OSError(errno.ENOSPC, "No space left on device (injected)"), after=1)
        with pytest.raises(WriteError, match="No space left"):
            asyncckpt.save(state, save_dir, "bad", config={"codec": {"chunk_mib": 1 / 16}}).result(WAIT_S)
    ops = [op for op, p in faults.log if p.endswith(".bin")]
    assert ops[:3] == ["open_write", "write", "write"] and "abort" in ops and "close" not in ops
    assert asyncckpt.list_tags(save_dir) == ["good"]


# --------------------------------------------------------------------------- every operation is seen
def _index(log, op, suffix):
    hits = [i for i, (o, p) in enumerate(log) if o == op and p.endswith(suffix)]
    assert hits, f"no {op} of *{suffix} in {log}"
    return hits


@pytest.mark.thread_only("records the file operations in this process (a storage wrapper); the service does them")
def test_every_file_operation_of_a_save_goes_through_storage(tmp_path):
    """A save, an overwrite and keep_last on POSIX storage: every file and directory the save directory ends up
    with (and every one removed) was made by an operation of the storage object, in the rename strategy's
    order: data files written, fsynced and closed, the rank index written, the partial directory fsynced;
    then the manifest, the partial directory fsynced again, the rename (or exchange) to the tag, save_dir
    fsynced, and only then ``latest`` replaced."""
    save_dir = str(tmp_path / "ckpt")
    cfg = {"codec": {"chunk_mib": 1 / 16}, "writer": {"files_per_rank": 2}, "keep_last": 2, "overwrite": True}
    with injected() as faults, asyncckpt.AsyncCheckpointer(torch.nn.Linear(200, 200), config=cfg) as saver:
        for tag in ("t1", "t2", "t2", "t3", "t4"):  # t2 twice: an overwrite (RENAME_EXCHANGE where the kernel has it)
            saver.save_checkpoint(save_dir, tag=tag).result(WAIT_S)
    # closing the saver joined its keep_last removals
    log = faults.log
    made = {p for op, p in log if op in ("open_write", "write_durable", "replace_atomic", "makedirs")}
    for tag in asyncckpt.list_tags(save_dir):  # every file of a published tag, under its partial name
        for name in os.listdir(os.path.join(save_dir, tag)):
            assert os.path.join(save_dir, f".{tag}.partial", name) in made, (tag, name)
    assert os.path.join(save_dir, "latest") in made
    # the order of one save (the last one, t4)
    start = max(i for i, (op, p) in enumerate(log) if op == "makedirs" and p.endswith(".t4.partial"))
    log = log[start:]
    closes = _index(log, "close", ".bin")
    for i in closes:
        path = log[i][1]
        assert max(_index(log, "write", path)) < _index(log, "sync", path)[0] < i  # fsync before close
    index_write = _index(log, "write_durable", "rank00000.json")[0]
    first_dir_sync = _index(log, "fsync_dir", ".t4.partial")[0]
    assert max(closes) < first_dir_sync and index_write < first_dir_sync
    manifest = _index(log, "write_durable", "manifest.json")[0]
    second_dir_sync = _index(log, "fsync_dir", ".t4.partial")[1]
    publish = next(i for i, (op, p) in enumerate(log) if op in ("rename", "exchange") and p.endswith(".t4.partial"))
    dir_sync = next(i for i, (op, p) in enumerate(log) if op == "fsync_dir" and p == save_dir and i > publish)
    latest = _index(log, "replace_atomic", "latest")[0]
    assert first_dir_sync < manifest < second_dir_sync < publish < dir_sync < latest
    # keep_last removed t1 and t2 through the storage too (rename to a .deleting name, then remove_tree)
    assert asyncckpt.list_tags(save_dir) == ["t3", "t4"]
    removed = [p for op, p in faults.log if op == "remove_tree"]
    assert any(p.endswith(".t1.deleting.partial") for p in removed)
    assert any(op == "exchange" or (op == "rename" and p.endswith(".t2.replaced.partial")) for op, p in faults.log
               if "t2" in p)


# --------------------------------------------------------------------- the marker strategy, in memory
def test_ranged_reads_return_each_range_whatever_their_order():
    store = open_storage("memory://ranges")
    data = bytes(range(256)) * 64
    store.write_durable("memory://ranges/f", data)
    ranges = [(4000, 96), (0, 10), (10, 20), (30, 0), (5000, 3000), (100, 1), (8000, 8384), (30, 70)]
    assert [bytes(b) for b in store.read_ranges("memory://ranges/f", ranges)] == [data[o:o + n] for o, n in ranges]


@pytest.mark.thread_only("an in-memory fsspec file system lives in this process; the service would write its own")
def test_marker_strategy_save_load_overwrite_keep_last_in_memory():
    """The object-store protocol on fsspec's in-memory file system (no server): files are written in place,
    the manifest (commit marker) last, then ``latest``; a tag without its marker is invisible and removed by
    the next saver's first save; overwrite unpublishes first; keep_last removes whole tags."""
    import fsspec

    url = f"memory://run-{os.getpid()}-{id(object())}"
    fs = fsspec.filesystem("memory")
    cfg = {"keep_last": 2, "overwrite": True, "codec": {"chunk_mib": 1 / 16}}
    with injected() as faults, asyncckpt.AsyncCheckpointer(torch.nn.Linear(100, 100), config=cfg) as saver:
        for tag in ("a", "b", "b", "c"):
            saver.save_checkpoint(url, tag=tag, client_state={"tag": tag}).result(WAIT_S)
    assert asyncckpt.list_tags(url) == ["b", "c"]
    assert asyncckpt.load(url)["client_state"] == {"tag": "c"}
    ops = [(op, p[len(url) + 1:]) for op, p in faults.log if op != "read_bytes"]
    c = ops.index(("write_durable", "c/manifest.json"))
    assert ("write_durable", "c/rank00000.json") in ops[:c] and ops[c + 1] == ("replace_atomic", "latest")
    assert not [op for op, _ in ops if op in ("rename", "exchange")]  # no rename anywhere
    b_again = [i for i, o in enumerate(ops) if o == ("remove_file", "b/manifest.json")]
    assert b_again and b_again[0] < ops.index(("write_durable", "b/manifest.json"), b_again[0])  # unpublished first
    # an aborted save: files, no marker
    fs.pipe(f"{url}/d/rank00000.json", b"{}")
    fs.pipe(f"{url}/d/rank00000-0.bin", b"x")
    fs.pipe(f"{url}/notes/readme.txt", b"not a checkpoint file: left alone")
    assert asyncckpt.list_tags(url) == ["b", "c"]
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="never completed"):
        asyncckpt.load(url, "d")
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(100, 100), config=cfg) as saver:
        saver.save_checkpoint(url, tag="e").result(WAIT_S)
    assert not fs.exists(f"{url}/d/rank00000.json") and fs.exists(f"{url}/notes/readme.txt")
    assert asyncckpt.list_tags(url) == ["c", "e"]
    assert asyncckpt.CheckpointReader(url).verify()["chunks"] > 0


@pytest.mark.parametrize("url,kind,names", [
    ("gcs://bucket/ckpts", "MissingPackageError", ["gcs://bucket/ckpts", "gcsfs"]),  # fsspec knows it; gcsfs absent
    ("nosuchscheme://bucket/ckpts", "ConfigError", ["nosuchscheme://bucket/ckpts", "nosuchscheme"]),
])
def test_a_url_without_its_filesystem_package_is_a_checkpoint_error(tmp_path, url, kind, names):
    pytest.importorskip("fsspec")
    if kind == "MissingPackageError":
        try:
            import gcsfs  # noqa: F401
            pytest.skip("gcsfs is installed here")
        except ImportError:
            pass
    with pytest.raises(getattr(asyncckpt, kind)) as info:
        asyncckpt.save({"w": torch.ones(2)}, url, "t")
    assert isinstance(info.value, asyncckpt.CheckpointError)
    for name in names:
        assert name in str(info.value)
    with pytest.raises(getattr(asyncckpt, kind)):
        asyncckpt.load(url, "t")


def test_a_url_without_fsspec_installed_names_the_extra(monkeypatch):
    import sys

    from asyncckpt.storage.fsspec_store import FsspecStorage

    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if fsspec were not installed: its import fails
    with pytest.raises(asyncckpt.MissingPackageError, match=r"s3://b/c.*fsspec.*asyncckpt\[s3\]") as info:
        FsspecStorage("s3://b/c")
    assert isinstance(info.value, ImportError) and isinstance(info.value, asyncckpt.CheckpointError)
