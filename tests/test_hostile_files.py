"""Hostile files and forged structure around a checkpoint.

* Every kind of file system entry where asyncckpt expects a control file (``latest``, ``manifest.json``, a rank
  index, a data file) or a tag directory: a symlink to a file inside, to a file outside, to a directory, a
  dangling symlink, a FIFO, a directory, a socket, an empty file, a file over the size limit. Each is refused
  with a CheckpointError naming the path, by load, verify, ``asyncckpt inspect`` and ``list_tags`` alike;
  nothing hangs on a FIFO, no symlink is followed, and no byte of a file asyncckpt did not write is echoed.
* ``latest`` holds exactly ``<tag>\\n``: any other content is a damaged ``latest``, never a missing tag.
* Tags: full-match grammar, ints accepted as their decimal string, InvalidTagError.
* ``verify`` checks what ``load`` checks: forged (re-sealed) indexes whose views, skeleton references or DTensor
  shards do not resolve are refused by verify, not only by load.
* Metadata bounded by the data it describes: chunk counts per tensor, no empty chunks.
"""
from __future__ import annotations

import errno
import json
import base64
import os
import pickle
import shutil
import socket
import threading

import pytest
import torch
from click.testing import CliRunner

import asyncckpt
import asyncckpt.format as fmt
from asyncckpt.cli import main
from asyncckpt.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, InvalidTagError,
                              UnsafeCheckpointError)
from asyncckpt.loader import read_latest, refused_tags
from asyncckpt.owners import restamp

GOOD = "good"
INDEX = "rank00000.json"
DATA = "rank00000-0.bin"
SECRET = b"TOPSECRET-password=hunter2\n"
HANG_S = 60  # a call still running after this long is blocked on a FIFO


def state() -> dict:
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(1024, generator=g)
    return {"w": torch.randn(64, 64, generator=g), "va": shared[:512], "vb": shared[256:],
            "small": torch.arange(4, dtype=torch.int32), "empty": torch.zeros(0), "meta": {"epoch": 1}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("hostile_files") / "pristine")
    # 16 KiB chunks: "w" (16 KiB) is written on its own, "small" (16 bytes) in a pack of its own
    asyncckpt.save(state(), d, GOOD, config={"codec": {"chunk_mib": 1 / 64}}).result(60)
    asyncckpt.wait_all(60)
    return d


class Ckpt:
    """A scratch copy of the pristine save directory (tag ``good``, named by ``latest``), with a directory
    outside it holding a secret."""

    def __init__(self, pristine: str, root) -> None:
        self.save_dir = str(root / "ckpt")
        shutil.copytree(pristine, self.save_dir, symlinks=True)
        self.tag_dir = os.path.join(self.save_dir, GOOD)
        self.outside = root / "outside"
        self.outside.mkdir()
        self.secret = self.outside / "secret"
        self.secret.write_bytes(SECRET)

    def path(self, name: str) -> str:
        return os.path.join(self.tag_dir, name)

    def doc(self, name: str) -> dict:
        with open(self.path(name), "rb") as f:
            return fmt.unseal(f.read(), name)

    def write_index(self, doc: dict, rank: int = 0) -> None:
        """Re-seal a rank index and update the manifest's checksum of it, so only validation can object."""
        data = fmt.seal(doc)
        name = fmt.rank_index_name(rank)
        with open(self.path(name), "wb") as f:
            f.write(data)
        restamp(self.tag_dir)

    def write_manifest(self, doc: dict) -> None:
        with open(self.path(fmt.MANIFEST), "wb") as f:
            f.write(fmt.seal(doc))


@pytest.fixture
def ck(pristine, tmp_path) -> Ckpt:
    return Ckpt(pristine, tmp_path)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def bounded(fn, *args, **kwargs):
    """Call ``fn`` in a thread; if it is still blocked after HANG_S (on a FIFO), open the FIFOs' write ends to
    release it and fail."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(HANG_S)
    if th.is_alive():
        for fifo in FIFOS:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        th.join(HANG_S)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked (on a FIFO?)")
    if "error" in out:
        raise out["error"]
    return out["value"]


FIFOS: list[str] = []


# ------------------------------------------------------------------------------------------- file kinds
def _replace(path: str, kind: str, ck: Ckpt, limit: int) -> None:
    """Put an entry of ``kind`` at ``path`` (which holds the genuine file)."""
    with open(path, "rb") as f:
        genuine = f.read()
    os.unlink(path)
    if kind == "symlink to a genuine copy inside":
        inside = path + ".real"
        with open(inside, "wb") as f:
            f.write(genuine)
        os.symlink(os.path.basename(inside), path)
    elif kind == "symlink to a genuine copy outside":
        target = ck.outside / (os.path.basename(path) + ".copy")
        target.write_bytes(genuine)
        os.symlink(target, path)
    elif kind == "symlink to a secret outside":
        os.symlink(ck.secret, path)
    elif kind == "symlink to a directory":
        os.symlink(ck.outside, path)
    elif kind == "dangling symlink":
        os.symlink(ck.outside / "nothing", path)
    elif kind == "FIFO":
        os.mkfifo(path)
        FIFOS.append(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(os.path.dirname(path))  # bind by a short relative name: socket paths are limited to ~100 bytes
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(os.path.basename(path))
        finally:
            os.chdir(cwd)
    elif kind == "empty file":
        open(path, "wb").close()
    elif kind == "file over the size limit":
        with open(path, "wb") as f:
            f.write(SECRET)
            f.truncate(limit + 1)  # sparse
    else:
        raise AssertionError(kind)


KINDS = ["symlink to a genuine copy inside", "symlink to a genuine copy outside", "symlink to a secret outside",
         "symlink to a directory", "dangling symlink", "FIFO", "directory", "socket", "empty file",
         "file over the size limit"]
NOT_REGULAR = KINDS[:8]


def _no_secret(text: str) -> None:
    assert "hunter2" not in text and "TOPSECRET" not in text, text


# ---------------------------------------------------------------------------------------------- latest
@pytest.mark.parametrize("kind", KINDS)
def test_latest_of_every_kind_is_refused(ck, kind):
    latest = os.path.join(ck.save_dir, fmt.LATEST)
    _replace(latest, kind, ck, fmt.MAX_LATEST_BYTES)
    for call in (lambda: asyncckpt.load(ck.save_dir), lambda: asyncckpt.CheckpointReader(ck.save_dir),
                 lambda: read_latest(ck.save_dir)):
        with pytest.raises(CorruptCheckpointError) as info:
            bounded(call)
        assert latest in str(info.value), info.value
        _no_secret(str(info.value))
    r = bounded(cli, "verify", ck.save_dir)
    assert r.exit_code == 1 and latest in r.output, r.output
    _no_secret(r.output)
    r = bounded(cli, "inspect", ck.save_dir)  # the tags are still listed; latest is reported unreadable
    assert r.exit_code == 1 and "latest is unreadable" in r.output and GOOD in r.output, r.output
    _no_secret(r.output)
    # the checkpoint itself is fine when asked for by name
    assert torch.equal(bounded(asyncckpt.load, ck.save_dir, GOOD)["w"], state()["w"])


@pytest.mark.parametrize("content", [b"good\n\n", b"good", b"good\r\n", b" good\n", b"good \n", b"\n", b"",
                                     b"good\nother\n", b"go\xffod\n", b"g\x00ood\n", b"\xef\xbb\xbfgood\n",
                                     b"latest\n", b"../good\n", b".good.partial\n"])
def test_latest_must_hold_exactly_a_tag_and_a_newline(ck, content):
    latest = os.path.join(ck.save_dir, fmt.LATEST)
    with open(latest, "wb") as f:
        f.write(content)
    with pytest.raises(CorruptCheckpointError, match="does not hold a valid tag") as info:
        asyncckpt.load(ck.save_dir)
    assert not isinstance(info.value, CheckpointNotFoundError)
    assert latest in str(info.value) and f"({len(content)} bytes)" in str(info.value)
    r = cli("verify", ck.save_dir)
    assert r.exit_code == 1 and "does not hold a valid tag" in r.output, r.output


def test_genuine_latest_loads(ck):
    assert read_latest(ck.save_dir) == GOOD
    assert torch.equal(asyncckpt.load(ck.save_dir)["w"], state()["w"])


# ------------------------------------------------------------------------- files inside a tag directory
CONTROL = {fmt.MANIFEST: fmt.MAX_JSON_BYTES, INDEX: fmt.MAX_JSON_BYTES, DATA: 1 << 31}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CONTROL))
def test_checkpoint_file_of_every_kind_is_refused(ck, name, kind):
    path = ck.path(name)
    _replace(path, kind, ck, CONTROL[name])
    expected = UnsafeCheckpointError if kind in NOT_REGULAR else CorruptCheckpointError
    for call in (lambda: asyncckpt.load(ck.save_dir, GOOD), lambda: asyncckpt.CheckpointReader(ck.save_dir).verify()):
        with pytest.raises(expected) as info:
            bounded(call)
        assert path in str(info.value) or (name == DATA and "rank00000-0.bin" in str(info.value)), info.value
        _no_secret(str(info.value))
    for args in (("verify", ck.save_dir), ("verify", ck.save_dir, "--all"), ("inspect", ck.tag_dir),
                 ("inspect", ck.save_dir)):
        r = bounded(cli, *args)
        _no_secret(r.output)
        assert r.exit_code == 1, (args, r.output)
        assert GOOD in r.output, r.output
    published = asyncckpt.list_tags(ck.save_dir)
    if name == fmt.MANIFEST and kind in NOT_REGULAR:
        assert published == [] and GOOD in refused_tags(ck.save_dir)
        assert "refused" in cli("inspect", ck.save_dir).output
    else:
        assert published == [GOOD]


# ----------------------------------------------------------------------------------------- tag directories
def _move_tag_out(ck: Ckpt) -> str:
    elsewhere = str(ck.outside / "moved")
    shutil.move(ck.tag_dir, elsewhere)
    return elsewhere


TAG_KINDS = ["symlink to a checkpoint outside", "symlink to a tag inside", "symlink to a file", "dangling symlink",
             "regular file", "FIFO"]


@pytest.mark.parametrize("kind", TAG_KINDS)
def test_tag_directory_that_is_not_a_real_directory(ck, kind):
    name = GOOD
    if kind == "symlink to a checkpoint outside":
        os.symlink(_move_tag_out(ck), ck.tag_dir)
    elif kind == "symlink to a tag inside":
        name = "alias"
        os.symlink(GOOD, os.path.join(ck.save_dir, name))
    else:
        shutil.rmtree(ck.tag_dir)
        if kind == "symlink to a file":
            os.symlink(ck.secret, ck.tag_dir)
        elif kind == "dangling symlink":
            os.symlink(ck.outside / "nothing", ck.tag_dir)
        elif kind == "regular file":
            with open(ck.tag_dir, "wb") as f:
                f.write(SECRET)
        else:
            os.mkfifo(ck.tag_dir)
            FIFOS.append(ck.tag_dir)
    path = os.path.join(ck.save_dir, name)
    looks_like_a_tag = kind in ("symlink to a checkpoint outside", "symlink to a tag inside")
    symlink = "symlink" in kind
    expected = UnsafeCheckpointError if symlink else CheckpointNotFoundError
    for call in (lambda: asyncckpt.load(ck.save_dir, name), lambda: asyncckpt.CheckpointReader(ck.save_dir, name).verify()):
        with pytest.raises(expected) as info:
            bounded(call)
        assert path in str(info.value) or repr(name) in str(info.value), info.value
        _no_secret(str(info.value))
    if name == GOOD:  # latest names it
        with pytest.raises(expected):
            bounded(asyncckpt.load, ck.save_dir)
    assert name not in asyncckpt.list_tags(ck.save_dir)
    assert (name in refused_tags(ck.save_dir)) == looks_like_a_tag
    r = bounded(cli, "verify", path)  # 2: not a checkpoint (click itself refuses a path to a file)
    assert r.exit_code == (2 if kind in ("regular file", "FIFO", "symlink to a file") else 1), r.output
    _no_secret(r.output)
    if looks_like_a_tag:
        r = bounded(cli, "inspect", ck.save_dir)
        assert r.exit_code == 1 and "refused" in r.output and name in r.output, r.output
        r = bounded(cli, "verify", ck.save_dir, "--all")
        assert r.exit_code == 1 and "REFUSED" in r.output and name in r.output, r.output
        r = bounded(cli, "inspect", path)
        assert r.exit_code == 1 and path in r.output, r.output


# ------------------------------------------------------------------------------------------------ tags
@pytest.mark.parametrize("tag", ["step1\n", "step1\n\n", "", ".hidden", "-x", "a/b", "..", "a..b", "latest",
                                 "manifest.json", "x" * 201, " step1", "step1 ", "st\x00ep", "ｓｔｅｐ", True, False,
                                 -1, 1.0, None, b"step1", 10 ** 300])
def test_invalid_tags_raise_invalid_tag_error(tag):
    with pytest.raises(InvalidTagError) as info:
        fmt.validate_tag(tag)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointError)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("tag, expected", [("step1", "step1"), (100, "100"), (0, "0"), ("a.b-c+d=e@f_g", "a.b-c+d=e@f_g"),
                                           ("x" * 200, "x" * 200)])
def test_valid_tags_are_returned_normalised(tag, expected):
    assert fmt.validate_tag(tag) == expected


def test_an_int_tag_loads(ck, tmp_path):
    asyncckpt.save({"x": torch.arange(3)}, ck.save_dir, "100").result(60)
    assert torch.equal(asyncckpt.load(ck.save_dir, 100)["x"], torch.arange(3))
    with pytest.raises(InvalidTagError):
        asyncckpt.load(ck.save_dir, "100\n")
    model = torch.nn.Linear(2, 2)
    with asyncckpt.AsyncCheckpointer(model) as saver:
        saver.save_checkpoint(str(tmp_path / "ds"), tag=7).result(60)
        path, _ = saver.load_checkpoint(str(tmp_path / "ds"), tag=7)
    assert path == str(tmp_path / "ds" / "7")
    r = cli("verify", os.path.join(ck.save_dir, "bad tag!"))
    assert r.exit_code == 2 and "invalid checkpoint tag" in r.output, r.output


# ------------------------------------------------------------------------------- verify checks what load checks
def _forge(ck: Ckpt, mutate) -> None:
    doc = ck.doc(INDEX)
    mutate(doc)
    ck.write_index(doc)


def _dangling_view_base(doc):
    doc["tensors"]["va"]["base"] = "#storage/nothing"


def _skeleton_ref_to_missing_key(doc):
    doc["skeleton"]["w"] = {"__t": "tensor", "key": "never saved"}


def _as_dtensor(doc, global_shape, offset, placements=(("S", 0),), node_shape=None):
    doc["tensors"]["w"].update(global_shape=list(global_shape), global_offset=list(offset))
    doc["skeleton"]["w"] = {"__t": "dtensor", "key": "w", "global_shape": list(node_shape or global_shape),
                            "placements": [list(p) for p in placements]}


STRUCTURE = {
    "view whose storage no index holds": (_dangling_view_base, "no rank index holds"),
    "skeleton reference to a missing key": (_skeleton_ref_to_missing_key, "never saved"),
    "DTensor claiming another global shape": (lambda d: _as_dtensor(d, (64, 64), (0, 0), node_shape=(64, 65)),
                                              "global shape"),
    "DTensor shards not covering it": (lambda d: _as_dtensor(d, (128, 64), (0, 0)), "cover"),
    "DTensor sharded on a dimension it lacks": (lambda d: _as_dtensor(d, (64, 64), (0, 0), (("S", 2),)), "malformed"),
    "DTensor with a bad placement": (lambda d: _as_dtensor(d, (64, 64), (0, 0), (("X", 0),)), "malformed"),
    "skeleton node with a bad device string": (lambda d: d["skeleton"].update(dev={"__t": "device", "value": "gpu!7"}),
                                                "malformed skeleton node"),
    "skeleton node of an unknown type": (lambda d: d["skeleton"].update(x={"__t": "lambda", "value": 1}),
                                         "unknown skeleton node type"),
    "skeleton bytes node that is not base64": (lambda d: d["skeleton"].update(b={"__t": "bytes", "value": "%%%"}),
                                               "malformed skeleton node"),
    "skeleton pickle node that is not base64": (lambda d: d["skeleton"].update(p={"__t": "pickle", "value": "%%%"}),
                                                "malformed skeleton node|pickle"),
    "skeleton float node that is not a float": (lambda d: d["skeleton"].update(f={"__t": "float", "value": "1e999"}),
                                                "malformed skeleton node"),
    "skeleton ndarray node with a bad shape": (lambda d: d["skeleton"].update(a={"__t": "ndarray", "key": "small",
                                                                                  "shape": ["x"]}),
                                               "malformed skeleton node"),
    "DTensor with a view record": (lambda d: (d["tensors"]["va"].update(global_shape=[512], global_offset=[0]),
                                              d["skeleton"].update(va={"__t": "dtensor", "key": "va",
                                                                       "global_shape": [512], "placements": [["R"]]})),
                                   "own bytes"),
}


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_verify_refuses_what_load_refuses(ck, name):
    mutate, match = STRUCTURE[name]
    _forge(ck, mutate)
    reader = asyncckpt.CheckpointReader(ck.save_dir, GOOD)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        reader.verify()
    assert ck.tag_dir in str(info.value)
    with pytest.raises(CorruptCheckpointError, match=match):
        reader.check_structure()
    with pytest.raises(CorruptCheckpointError, match=match):
        asyncckpt.load(ck.save_dir, GOOD)
    r = cli("verify", ck.tag_dir)
    assert r.exit_code == 1 and "CORRUPT" in r.output, r.output


def test_verify_accepts_a_well_formed_pickle_node_without_running_it(ck, tmp_path):
    """A pickled entry is well-formed data: verify passes it (it loads with allow_pickle) and never unpickles."""
    marker = tmp_path / "ran"
    payload = base64.b64encode(pickle.dumps(_Touch(str(marker)))).decode()
    _forge(ck, lambda d: d["skeleton"].update(p={"__t": "pickle", "value": payload}))
    asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle"):
        asyncckpt.load(ck.save_dir, GOOD)
    assert not marker.exists()


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_unreferenced_view_with_no_storage_fails_verify(ck):
    def mutate(doc):
        _dangling_view_base(doc)
        del doc["skeleton"]["va"]

    _forge(ck, mutate)
    with pytest.raises(CorruptCheckpointError, match="no rank index holds"):
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()


def test_a_forged_but_consistent_dtensor_loads(ck):
    _forge(ck, lambda d: _as_dtensor(d, (64, 64), (0, 0)))
    reader = asyncckpt.CheckpointReader(ck.save_dir, GOOD)
    reader.verify()
    assert torch.equal(reader.load_state()["w"], state()["w"])


def _second_rank(ck: Ckpt, mutate1) -> None:
    """Make the checkpoint a 2-rank one: rank 1 is a copy of rank 0 (own data file), then ``mutate1`` of it."""
    shutil.copy(ck.path(DATA), ck.path("rank00001-0.bin"))
    doc = ck.doc(INDEX)
    doc["rank"] = 1
    doc["files"] = {"rank00001-0.bin": doc["files"][DATA]}
    for t in doc["tensors"].values():
        if "file" in t:
            t["file"] = "rank00001-0.bin"
    mutate1(doc)
    data = fmt.seal(doc)
    with open(ck.path("rank00001.json"), "wb") as f:
        f.write(data)
    manifest = ck.doc(fmt.MANIFEST)
    manifest["world_size"] = 2
    ck.write_manifest(manifest)
    restamp(ck.tag_dir)


def test_overlapping_shards_leaving_a_hole_are_refused(ck):
    """Two shards of 64 rows claim rows 0..63 and 32..95 of a 128-row tensor: as many elements as the tensor
    has, so counting copied elements let the load return rows 96..127 uninitialised."""
    _forge(ck, lambda d: _as_dtensor(d, (128, 64), (0, 0)))
    _second_rank(ck, lambda d: _as_dtensor(d, (128, 64), (32, 0)))
    with pytest.raises(UnsafeCheckpointError, match="exactly once"):
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()
    for rank in (0, 1):
        with pytest.raises(UnsafeCheckpointError, match="exactly once"):
            asyncckpt.load(ck.save_dir, GOOD, rank=rank)


def test_two_shards_that_tile_load(ck):
    _forge(ck, lambda d: _as_dtensor(d, (128, 64), (0, 0)))
    _second_rank(ck, lambda d: _as_dtensor(d, (128, 64), (64, 0)))
    asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()
    w = asyncckpt.load(ck.save_dir, GOOD)["w"]
    assert torch.equal(w, torch.cat([state()["w"]] * 2))


def test_every_ranks_skeleton_is_checked(ck):
    _second_rank(ck, _skeleton_ref_to_missing_key)
    assert torch.equal(asyncckpt.load(ck.save_dir, GOOD, rank=0)["w"], state()["w"])  # rank 0 is fine
    with pytest.raises(CorruptCheckpointError, match="never saved"):
        asyncckpt.load(ck.save_dir, GOOD, rank=1)
    with pytest.raises(CorruptCheckpointError, match="never saved"):
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()


# ---------------------------------------------------------------------------------- metadata amplification
N = 50_000


def test_many_empty_chunks_for_a_small_tensor_are_refused(ck):
    pack = ck.doc(INDEX)["tensors"]["small"]["base"]  # "small" is packed: forge the record holding its bytes

    def mutate(doc):
        t = doc["tensors"][pack]
        assert [c["raw"] for c in t["chunks"]] == [16]
        empty = {"off": t["chunks"][0]["off"], "len": 0, "raw": 0, "codec": "raw", "xxh3": fmt.checksum(b"")}
        t["chunks"] += [dict(empty) for _ in range(N)]

    _forge(ck, mutate)
    with pytest.raises(UnsafeCheckpointError, match=f"{N + 1} chunks for 16 bytes: at most 1") as info:
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).load_state()
    assert ck.path(INDEX) in str(info.value) and repr(pack) in str(info.value)
    assert cli("verify", ck.tag_dir).exit_code == 1


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_one_empty_chunk_is_refused(ck, codec):
    def mutate(doc):
        t = doc["tensors"]["w"]  # 16 KiB in one chunk: room for more chunks, but not for an empty one
        assert len(t["chunks"]) < fmt.max_chunks(64 * 64 * 4)
        t["chunks"].insert(0, {"off": 0, "len": 0, "raw": 0, "codec": codec, "xxh3": fmt.checksum(b"")})

    _forge(ck, mutate)
    with pytest.raises(UnsafeCheckpointError, match="chunk 0: len must be an integer in 1"):
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).load_state()


def test_an_empty_tensor_has_no_chunks(ck):
    assert ck.doc(INDEX)["tensors"]["empty"]["chunks"] == []  # what the writer emits: and it loads
    assert asyncckpt.load(ck.save_dir, GOOD)["empty"].shape == (0,)

    def mutate(doc):
        doc["tensors"]["empty"]["chunks"] = [{"off": 0, "len": 0, "raw": 0, "codec": "raw", "xxh3": fmt.checksum(b"")}]

    _forge(ck, mutate)
    with pytest.raises(UnsafeCheckpointError, match="1 chunks for 0 bytes: at most 0"):
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).load_state()


def test_many_tiny_chunks_are_refused(tmp_path):
    save_dir = str(tmp_path / "tiny")
    payload = bytes(i * 7 % 251 for i in range(N))
    asyncckpt.save({"b": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, save_dir, "t",
                   config={"codec": {"chunk_mib": 1 / 64}}).result(60)  # 50 KB: too big to pack
    tag = os.path.join(save_dir, "t")
    with open(os.path.join(tag, DATA), "wb") as f:
        f.write(payload)
    with open(os.path.join(tag, INDEX), "rb") as f:
        doc = fmt.unseal(f.read(), INDEX)
    doc["files"] = {DATA: N}
    doc["tensors"]["b"]["chunks"] = [{"off": i, "len": 1, "raw": 1, "codec": "raw",
                                      "xxh3": fmt.checksum(payload[i: i + 1])} for i in range(N)]
    data = fmt.seal(doc)
    with open(os.path.join(tag, INDEX), "wb") as f:
        f.write(data)
    restamp(tag)
    limit = -(-N // fmt.MIN_CHUNK_BYTES)
    with pytest.raises(UnsafeCheckpointError, match=f"{N} chunks for {N} bytes: at most {limit}"):
        asyncckpt.CheckpointReader(save_dir, "t").verify()
    r = cli("verify", tag)
    assert r.exit_code == 1 and f"at most {limit}" in r.output, r.output


def test_the_writer_stays_within_the_chunk_bound(tmp_path):
    """Tensors of awkward sizes at the smallest chunk size: every record is within max_chunks."""
    sizes = [1, 4095, 4096, 4097, 16383, 16384, 16385, 3 * 16384 + 1, 100_000]
    cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1 / 64}})
    st = {f"t{n}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
          for n in sizes}
    asyncckpt.save(st, str(tmp_path), "c", config=cfg).result(60)
    reader = asyncckpt.CheckpointReader(str(tmp_path), "c")
    for key, recs in reader.records.items():
        rec = recs[0][1]
        if rec.is_view:  # a packed tensor: its bytes are in its pack's chunks
            continue
        assert 1 <= len(rec.chunks) <= fmt.max_chunks(rec.nbytes), key
    reader.verify()


def test_an_index_over_the_size_limit_is_refused_before_it_is_read(ck):
    os.truncate(ck.path(INDEX), fmt.MAX_JSON_BYTES + 1)
    with pytest.raises(UnsafeCheckpointError, match="limit") as info:
        asyncckpt.CheckpointReader(ck.save_dir, GOOD).load_state()
    assert ck.path(INDEX) in str(info.value)


# ------------------------------------------------------------------------------------------ raw errors
@pytest.mark.parametrize("call", ["lstat", "scandir", "open"])
def test_an_unreadable_tag_directory_is_a_checkpoint_error(ck, monkeypatch, call):
    """EACCES inside the tag directory (simulated: the tests may run as root) is a CheckpointError naming the
    path, with the OSError as its cause; inspect DIR still lists the other tags."""
    other = os.path.join(ck.save_dir, "other")
    shutil.copytree(ck.tag_dir, other)
    real = getattr(os, call)

    def where(path, kwargs) -> str:  # what a path, a directory descriptor or an openat names
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        if kwargs.get("dir_fd") is not None:
            return os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), path)
        return path if isinstance(path, str) else ""

    def denied(path, *args, **kwargs):
        target = where(path, kwargs)
        if target == ck.tag_dir and call != "lstat" or target.startswith(ck.tag_dir + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, denied)
    with pytest.raises(CheckpointError) as info:  # a load does not list the tag directory; verify does
        asyncckpt.load(ck.save_dir, GOOD) if call != "scandir" else asyncckpt.CheckpointReader(ck.save_dir, GOOD).verify()
    assert ck.tag_dir in str(info.value) and "Permission denied" in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EACCES
    r = cli("inspect", ck.save_dir)
    assert r.exit_code == 1 and GOOD in r.output and "other" in r.output, r.output
    r = cli("verify", ck.save_dir, "--all")
    assert r.exit_code == 1 and "OK " in r.output and "Permission denied" in r.output, r.output


def test_inspect_json_lists_refused_entries(ck):
    os.symlink(GOOD, os.path.join(ck.save_dir, "alias"))
    r = cli("inspect", ck.save_dir, "--json")
    assert r.exit_code == 1
    d = json.loads(r.output[: r.output.rindex("}") + 1])
    by_tag = {t["tag"]: t for t in d["tags"]}
    assert by_tag["alias"]["refused"] is True and "symbolic link" in by_tag["alias"]["error"]
    assert "error" not in by_tag[GOOD] and by_tag[GOOD]["latest"] is True
