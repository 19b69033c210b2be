"""Saves to an object store (``s3://``), against a real S3 server: moto's standalone server, started by the
tests on 127.0.0.1 (pip install 'asyncckpt[test-s3]'; skipped without s3fs and moto).

What is checked: save / load / verify / inspect round trips (library and CLI) with multipart uploads and
ranged reads, the writing process (the trainer; in service mode the writer service) SIGKILLed during an upload
and before its commit marker (the previous ``latest`` still loads, the incomplete tag is invisible to every
reader and removed by the next save), a 2-rank commit over gloo, keep_last, overwrite, and a publish that fails
(nothing visible, the next save works).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import asyncckpt  # noqa: E402
from asyncckpt import CheckpointNotFoundError, TagExistsError, WriteError  # noqa: E402
from asyncckpt.cli import main  # noqa: E402
from asyncckpt.format import (MANIFEST, OWNER_KEYS, OWNER_ROWS, RANK_TABLE, data_file_name,  # noqa: E402
                              rank_index_name)
from click.testing import CliRunner  # noqa: E402
from dist_helpers import assert_all_ok, forkserver_context, free_port, run_ranks  # noqa: E402
from storage_faults import injected  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
WAIT_S = 120


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, for this module's tests."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class Bucket:
    """A fresh bucket: ``url`` is the save directory in it, ``options`` the fsspec options that reach it."""

    def __init__(self, endpoint: str):
        import s3fs

        self.options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        self.name = f"ckpt-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(self.name)
        self.url = f"s3://{self.name}/run"

    def config(self, **extra) -> dict:
        return {"storage": {"options": self.options, "block_mib": 5}, "writer": {"threads_per_node": 2, "nice": 0},
                "codec": {"chunk_mib": 1.0}, **extra}

    def objects(self, under: str = "") -> list[str]:
        self.fs.invalidate_cache()
        prefix = f"{self.name}/run" + (f"/{under}" if under else "")
        return sorted(p[len(self.name) + 5:] for p in self.fs.find(prefix))


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> Bucket:
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    return Bucket(s3_endpoint)


def state(seed: int, n: int = 1_600_000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(n, generator=g), "ints": torch.arange(1000) * seed, "small": torch.ones(3, 3) * seed,
            "meta": {"step": seed, "name": f"s{seed}"}}


def same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a[k], b[k]) for k in ("big", "ints", "small")) and a["meta"] == b["meta"])


def save(bucket: Bucket, tag: str, seed: int, **config) -> asyncckpt.SaveResult:
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=bucket.config(**config)) as saver:
        return saver.save_checkpoint(bucket.url, tag=tag, client_state=state(seed)).result(WAIT_S)


def loaded(bucket: Bucket, tag: str | None = None) -> dict:
    return asyncckpt.load(bucket.url, tag, storage=bucket.options)["client_state"]


def tag_objects(tag: str, ranks: int = 1) -> list[str]:
    """The objects of a published tag of ``ranks`` ranks (one data file each), sorted."""
    names = [MANIFEST, OWNER_KEYS, OWNER_ROWS, RANK_TABLE]
    for r in range(ranks):
        names += [data_file_name(r, 0), rank_index_name(r)]
    return sorted(f"{tag}/{n}" for n in names)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("compression", [False, True], ids=["raw", "zstd"])
def test_save_load_verify_inspect(bucket, compression):
    r1 = save(bucket, "one", 1, codec={"chunk_mib": 1.0, "compression": compression})
    r2 = save(bucket, "two", 2, codec={"chunk_mib": 1.0, "compression": compression})
    assert r1.path == f"{bucket.url}/one" and r2.path == f"{bucket.url}/two"
    assert asyncckpt.list_tags(bucket.url, storage=bucket.options) == ["one", "two"]
    assert same(loaded(bucket), state(2)) and same(loaded(bucket, "one"), state(1))
    assert bucket.objects() == ["latest", *tag_objects("one"), *tag_objects("two")]
    assert bucket.fs.cat_file(f"{bucket.name}/run/latest") == b"two\n"
    if not compression:  # 6.4 MB in 5 MiB parts: a multipart upload (its ETag counts the parts)
        assert bucket.fs.info(f"{bucket.name}/run/two/rank00000-0.bin")["ETag"].strip('"').endswith("-2")
    reader = asyncckpt.CheckpointReader(bucket.url, storage=bucket.options)
    assert reader.tag == "two" and reader.verify()["chunks"] >= 7
    assert reader.bytes_read >= sum(v for k, v in reader.files.items() if k.endswith(".bin"))  # every data byte

    opt = ["--storage-option", f"endpoint_url={bucket.options['endpoint_url']}"]
    res = cli(*opt, "inspect", bucket.url, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["latest"] == "two" and [t["tag"] for t in d["tags"]] == ["one", "two"] and d["partial"] == []
    res = cli(*opt, "inspect", f"{bucket.url}/one", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["tag"] == "one", res.output
    res = cli(*opt, "verify", "--all", bucket.url)
    assert res.exit_code == 0 and "2 of 2 checkpoints OK" in res.output, res.output
    os.environ["AWS_ENDPOINT_URL"] = bucket.options["endpoint_url"]  # the environment alone is enough too
    try:
        res = cli("verify", bucket.url)
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    assert res.exit_code == 0 and f"OK {bucket.url}/two" in res.output, res.output


def test_missing_tag_and_corruption_are_reported(bucket):
    save(bucket, "one", 1, codec={"chunk_mib": 1.0, "compression": False})
    with pytest.raises(CheckpointNotFoundError, match="'nope'.*does not exist.*published tags: one"):
        loaded(bucket, "nope")
    path = f"{bucket.name}/run/one/rank00000-0.bin"
    data = bytearray(bucket.fs.cat_file(path))
    data[1000] ^= 0xFF
    bucket.fs.pipe_file(path, bytes(data))
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="rank00000-0.bin chunk 0 .*checksum mismatch"):
        asyncckpt.CheckpointReader(bucket.url, storage=bucket.options).verify()
    res = cli("--storage-option", f"endpoint_url={bucket.options['endpoint_url']}", "verify", bucket.url)
    assert res.exit_code == 1 and "CORRUPT" in res.output


# ------------------------------------------------------------------------------------- overwrite, keep_last
def test_existing_tag_needs_overwrite(bucket):
    save(bucket, "same", 1)
    with pytest.raises(TagExistsError, match="'same' already exists"):
        save(bucket, "same", 2)
    assert same(loaded(bucket), state(1))
    save(bucket, "same", 3, overwrite=True)
    assert same(loaded(bucket, "same"), state(3))
    assert bucket.objects("same") == tag_objects("same")


def test_keep_last(bucket):
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=bucket.config(keep_last=2)) as saver:
        for i in range(5):
            saver.save_checkpoint(bucket.url, tag=f"t{i}", client_state=state(i, n=1000)).result(WAIT_S)
        saver.wait()
    assert asyncckpt.list_tags(bucket.url, storage=bucket.options) == ["t3", "t4"]
    assert {o.split("/")[0] for o in bucket.objects()} == {"latest", "t3", "t4"}  # no file of a removed tag left
    assert same(loaded(bucket), state(4, n=1000))


# -------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("step,name", [("write_durable", "manifest.json"), ("replace_atomic", "latest"),
                                       ("write", ".bin")])
def test_failed_save_publishes_nothing(bucket, step, name):
    """A failure at the upload of a data file, of the commit marker or of ``latest``: the save fails with a
    WriteError chaining the OS error, the tag is not visible (``latest`` still names the previous one) and
    the next save works."""
    save(bucket, "good", 1)
    with injected() as faults:
        faults.fail(step, name, OSError(errno.EIO, f"injected failure of {step}"))
        with pytest.raises(WriteError, match=f"injected failure of {step}"):
            save(bucket, "bad", 2)
    assert asyncckpt.list_tags(bucket.url, storage=bucket.options) == ["good"]
    assert same(loaded(bucket), state(1))
    assert bucket.objects("bad") == []
    save(bucket, "next", 3)
    assert same(loaded(bucket), state(3))


_SERVICE_DIED = 4  # the child's exit status when its save failed because the writer service died

_CHILD = textwrap.dedent("""
    import sys, torch
    import asyncckpt
    from storage_faults import injected, killed
    from test_s3 import state
    url, options, where = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
    config = {"storage": {"options": options, "block_mib": 5}, "codec": {"chunk_mib": 1.0, "compression": False},
              "writer": {"threads_per_node": 2, "nice": 0}}
    with injected() as faults, asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config=config) as saver:
        saver.save_checkpoint(url, tag="good", client_state=state(1)).result(120)
        if where == "upload":  # 5 MiB of the data file written, its first part sent: the upload is under way
            killed(faults, "write", ".bin", after=5)
        else:  # every file complete, the commit marker not yet written
            killed(faults, "write_durable", "manifest.json")
        future = saver.save_checkpoint(url, tag="bad", client_state=state(2))
        try:
            future.result(120)
        except asyncckpt.CommitError as exc:  # service mode: the writer service died, this process lives on
            print(exc, file=sys.stderr)
            sys.exit(%d)
    sys.exit(3)  # never reached: the kill came first
""" % _SERVICE_DIED)


@pytest.mark.parametrize("where", ["upload", "marker"])
def test_sigkill_during_a_save(bucket, where):
    """The process performing the storage operations SIGKILLed while uploading a data file, or just before writing
    the commit marker (thread mode: the training process; service mode: the writer service, and the training
    process's future fails with a CommitError naming it): the previous ``latest`` loads; the incomplete tag is
    invisible to list_tags, load and the CLI; the next save (another process) removes its files."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, bucket.url, repr(bucket.options), where], env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    if asyncckpt.Config().writer.mode == "service":  # ASYNCCKPT_WRITER_MODE=service
        assert proc.returncode == _SERVICE_DIED, proc.stderr[-3000:]
        assert "checkpoint 'bad': the writer service" in proc.stderr and "ended before" in proc.stderr, \
            proc.stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if where == "marker":
        assert bucket.objects("bad") == [o for o in tag_objects("bad") if not o.endswith(MANIFEST)]  # no marker
    else:
        assert bucket.objects("bad") == []  # an unfinished multipart upload is no object
    assert asyncckpt.list_tags(bucket.url, storage=bucket.options) == ["good"]
    assert same(loaded(bucket), state(1))
    with pytest.raises(CheckpointNotFoundError, match="'bad'"):
        loaded(bucket, "bad")
    res = cli("--storage-option", f"endpoint_url={bucket.options['endpoint_url']}", "inspect", bucket.url, "--json")
    assert res.exit_code == 0 and [t["tag"] for t in json.loads(res.output)["tags"]] == ["good"], res.output
    save(bucket, "next", 3)
    assert bucket.objects("bad") == []
    assert asyncckpt.list_tags(bucket.url, storage=bucket.options) == ["good", "next"]
    assert same(loaded(bucket), state(3))


# ------------------------------------------------------------------------------------------- two ranks
def two_rank_save(rank: int, world: int, url: str, options: dict) -> dict:
    os.environ.update(CREDENTIALS)
    config = {"storage": {"options": options, "block_mib": 5}, "writer": {"threads_per_node": 1, "nice": 0},
              "commit_timeout_s": 60}
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(rank)  # replicated in a real job; here each rank's own copy tells the ranks apart
    with asyncckpt.AsyncCheckpointer(model, config=config) as saver:
        res = saver.save_checkpoint(url, tag="step1", client_state={"mine": torch.full((1000,), rank)}).result(120)
    back = asyncckpt.load(url, storage=options, rank=rank)
    return {"path": res.path, "mine": back["client_state"]["mine"].tolist()[:3]}


def test_two_rank_commit(bucket, tmp_path):
    out = assert_all_ok(run_ranks(two_rank_save, 2, str(tmp_path), bucket.url, bucket.options, timeout=WAIT_S,
                                  ctx=forkserver_context()))
    assert [o["path"] for o in out] == [f"{bucket.url}/step1"] * 2
    assert [o["mine"] for o in out] == [[0, 0, 0], [1, 1, 1]]
    assert bucket.objects() == ["latest", *tag_objects("step1", ranks=2)]
    assert asyncckpt.CheckpointReader(bucket.url, storage=bucket.options).world_size == 2
