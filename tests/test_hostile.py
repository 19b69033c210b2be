"""Manifests and rank indices are untrusted input.

Forged documents are re-sealed with :func:`asyncckpt.format.seal` (and the manifest's checksum of the index
updated), so the checksums pass and what is tested is the *validation*: path traversal, absolute paths,
symlinks leaving the tag directory, huge or negative shapes, offsets and lengths, unknown dtypes and codecs,
a format from the future, duplicated keys, views outside their storage, shards outside their global shape.
Each must give a clear :class:`CheckpointError` before any large allocation (``torch.empty`` is watched,
Python allocations are traced) and before any file outside the tag directory is opened (``os.open`` and
``open`` are watched). Hypothesis fuzzes the readers: they may only ever raise CheckpointError subclasses.
A pickle payload that would create a file is refused without ``allow_pickle``, and the file is not created.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import json
import os
import pathlib
import shutil
import tracemalloc

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
import asyncckpt.format as fmt
from asyncckpt.errors import CheckpointError
from asyncckpt.owners import restamp
from reliability import record

BIG = 64 << 20  # no allocation of this size may happen while refusing a hostile checkpoint
TAG = "t"
INDEX = "rank00000.json"
DATA = "rank00000-0.bin"


def make_state() -> dict:
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(2048, generator=g)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.linspace(0, 1, 5000),
            "bytes": (torch.arange(9000) % 5).to(torch.uint8), "step": torch.tensor(11),
            "va": shared[:1024], "vb": shared[512:], "meta": {"epoch": 2, "name": "hostile"},
            "zeros": torch.zeros(6000, dtype=torch.uint8)}  # last in the data file, one zstd chunk


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hostile")
    d = str(root / "pristine")
    cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 1}})
    asyncckpt.save(make_state(), d, TAG, config=cfg).result(30)
    asyncckpt.wait_all(30)
    return d


class Checkpoint:
    """A scratch copy of the pristine checkpoint, with an outside directory holding a tempting secret."""

    def __init__(self, pristine: str, root: pathlib.Path):
        self.root = root
        self.save_dir = str(root / "ckpt")
        shutil.copytree(pristine, self.save_dir)
        self.tag_dir = os.path.join(self.save_dir, TAG)
        self.outside = root / "outside"
        self.outside.mkdir(exist_ok=True)
        self.secret = self.outside / "secret.bin"
        with open(os.path.join(self.tag_dir, DATA), "rb") as f:
            self.secret.write_bytes(f.read())  # same size and bytes as the real data file
        (pathlib.Path(self.save_dir) / "x").write_bytes(b"{}")  # a file one level up, for ../x
        with open(os.path.join(self.tag_dir, INDEX), "rb") as f:
            self.index = fmt.unseal(f.read(), "index")
        with open(os.path.join(self.tag_dir, fmt.MANIFEST), "rb") as f:
            self.manifest = fmt.unseal(f.read(), "manifest")

    def path(self, name: str) -> str:
        return os.path.join(self.tag_dir, name)

    def write_index(self, doc: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else fmt.seal(doc if doc is not None else self.index)
        with open(self.path(INDEX), "wb") as f:
            f.write(data)
        self.write_manifest(self.manifest)
        restamp(self.tag_dir)

    def write_manifest(self, doc: dict | None = None, raw: bytes | None = None) -> None:
        with open(self.path(fmt.MANIFEST), "wb") as f:
            f.write(raw if raw is not None else fmt.seal(doc if doc is not None else self.manifest))

    def restore(self, pristine: str) -> None:
        shutil.rmtree(self.tag_dir)
        shutil.copytree(os.path.join(pristine, TAG), self.tag_dir)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Checkpoint:
    return Checkpoint(pristine, tmp_path)


@contextlib.contextmanager
def watched(ck: Checkpoint, monkeypatch):
    """Fail on any torch.empty of BIG bytes or more, on any file opened outside the save directory (or that is
    the outside secret, whatever path led there), and report the Python allocation peak."""
    secret = os.stat(ck.secret)
    inside = os.path.realpath(ck.save_dir) + os.sep
    opened: list[str] = []
    real_empty, real_os_open, real_open = torch.empty, os.open, builtins.open

    def check_fd(fd: int, path, dir_fd: int | None = None) -> None:
        st_ = os.fstat(fd)
        assert (st_.st_dev, st_.st_ino) != (secret.st_dev, secret.st_ino), f"opened the file outside via {path}"
        if dir_fd is not None:  # openat: relative to the directory the descriptor names
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        resolved = os.path.realpath(os.fspath(path)) if not isinstance(path, int) else inside
        assert resolved.startswith(inside) or resolved.startswith("/proc/") or "site-packages" in resolved \
            or resolved.startswith(os.path.realpath(os.sys.prefix)), f"opened {path} outside the checkpoint"
        opened.append(os.fspath(path) if not isinstance(path, int) else str(path))

    def empty(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        n = 1
        for s in shape:
            n *= int(s)
        itemsize = (kw.get("dtype") or torch.get_default_dtype()).itemsize
        assert n * itemsize < BIG, f"torch.empty of {n * itemsize} bytes (shape {tuple(shape)})"
        return real_empty(*size, **kw)

    def os_open(path, flags, *a, **kw):
        fd = real_os_open(path, flags, *a, **kw)
        check_fd(fd, path, kw.get("dir_fd"))
        return fd

    def b_open(file, *a, **kw):
        f = real_open(file, *a, **kw)
        if not isinstance(file, int):
            try:
                check_fd(f.fileno(), file)
            except AssertionError:
                f.close()
                raise
        return f

    tracemalloc.start()
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        m.setattr(os, "open", os_open)
        m.setattr(builtins, "open", b_open)
        try:
            yield opened
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < BIG, f"Python allocations peaked at {peak} bytes"


def refused(ck: Checkpoint, monkeypatch, *, match: str = "", load: bool = True) -> CheckpointError:
    """Open, verify and load ``ck``: the first step must raise a clear CheckpointError, with nothing large
    allocated and nothing outside opened."""
    with watched(ck, monkeypatch):
        with pytest.raises(CheckpointError) as info:
            reader = asyncckpt.CheckpointReader(ck.save_dir, TAG, threads=1)
            reader.verify()
            if load:
                reader.load_state()
    msg = str(info.value)
    assert match.lower() in msg.lower(), msg
    assert ck.tag_dir in msg or ck.save_dir in msg or "manifest" in msg or "index" in msg, msg
    return info.value


def _tensor(ck: Checkpoint, key: str) -> dict:
    return ck.index["tensors"][key]


def _first_chunked(ck: Checkpoint, codec: str | None = None) -> str:
    for key, t in ck.index["tensors"].items():
        if t.get("chunks") and (codec is None or any(c["codec"] == codec for c in t["chunks"])):
            return key
    raise AssertionError(f"no tensor with a {codec} chunk")


def _view(ck: Checkpoint) -> str:
    return next(k for k, t in ck.index["tensors"].items() if "base" in t)


# ---------------------------------------------------------------------------------------------- the cases
def _forge_manifest(field: str, value):
    def apply(ck: Checkpoint) -> None:
        doc = copy.deepcopy(ck.manifest)
        if field.startswith("ranks."):  # the inline rank entries of a format v2 manifest
            for table in ("rank_table", "owners"):
                del doc[table]
            with open(ck.path(INDEX), "rb") as f:
                xxh3 = fmt.checksum(f.read())
            doc.update(format_version=2, ranks=[{"rank": 0, "index": INDEX, "xxh3": xxh3, "bytes": 1}])
            doc["ranks"][0][field.split(".", 1)[1]] = value
        else:
            doc[field] = value
        ck.write_manifest(doc)

    return apply


def _forge_index(mutate):
    def apply(ck: Checkpoint) -> None:
        doc = copy.deepcopy(ck.index)
        mutate(ck, doc)
        ck.write_index(doc)

    return apply


def _set_file(name: str):
    def mutate(ck, doc):
        size = doc["files"].pop(DATA)
        doc["files"][name] = size
        for t in doc["tensors"].values():
            if "file" in t:
                t["file"] = name

    return mutate


def _set_tensor(field: str, value, codec: str | None = None):
    def mutate(ck, doc):
        doc["tensors"][_first_chunked(ck, codec)][field] = value

    return mutate


def _set_chunk(field: str, value, codec: str | None = None):
    def mutate(ck, doc):
        t = doc["tensors"][_first_chunked(ck, codec)]
        next(c for c in t["chunks"] if codec is None or c["codec"] == codec)[field] = value

    return mutate


def _huge_tensor_cheap_chunks(ck, doc):
    """8 GiB of float32 claimed by four tiny zstd chunks that each 'decode' to 2 GiB."""
    key = _first_chunked(ck, "zstd")
    t = doc["tensors"][key]
    chunk = next(c for c in t["chunks"] if c["codec"] == "zstd")
    t["dtype"], t["shape"] = "float32", [1 << 31]
    t["chunks"] = [dict(chunk, raw=1 << 31) for _ in range(4)]


def _zstd_frame_claiming_terabytes(ck, doc):
    """The data file's last chunk replaced by a zstd frame whose header declares a terabyte; the index claims
    4096 bytes (every byte of the file still in exactly one chunk, so only the decoder can object)."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 4096)
    assert frame[4] & 0xE3 == 0  # no content size, not single-segment, no dictionary: window descriptor at 5
    hostile = frame[:4] + bytes([frame[4] | 0xC0]) + frame[5:6] + (1 << 40).to_bytes(8, "little") + frame[6:]
    assert zstandard.frame_content_size(hostile) == 1 << 40
    t = doc["tensors"]["zeros"]
    assert t["file"] == DATA and [c["codec"] for c in t["chunks"]] == ["zstd"]
    start = t["chunks"][0]["off"]
    assert start + t["chunks"][0]["len"] == doc["files"][DATA]  # it is the last chunk of the file
    with open(ck.path(DATA), "r+b") as f:
        f.truncate(start)
        f.seek(start)
        f.write(hostile)
    doc["files"][DATA] = start + len(hostile)
    t["shape"] = [4096]
    t["chunks"] = [{"off": start, "len": len(hostile), "raw": 4096, "codec": "zstd", "xxh3": fmt.checksum(b"\0" * 4096)}]


def _padding(ck, doc):
    """Bytes in a data file that no chunk covers would escape verify(): refused."""
    with open(ck.path(DATA), "ab") as f:
        f.write(b"\0" * 16)
    doc["files"][DATA] += 16


def _view_outside(ck, doc):
    doc["tensors"][_view(ck)]["byte_offset"] = 1 << 40


def _view_stride_outside(ck, doc):
    t = doc["tensors"][_view(ck)]
    t["stride"] = [1 << 30]
    t["shape"] = [4]


def _view_of_a_view(ck, doc):
    views = [k for k, t in doc["tensors"].items() if "base" in t]
    doc["tensors"][views[0]]["base"] = views[1]


def _view_of_nothing(ck, doc):
    doc["tensors"][_view(ck)]["base"] = "no such storage"


def _shard_outside(ck, doc):
    t = doc["tensors"][_first_chunked(ck)]
    t["global_shape"] = [1] * len(t["shape"])
    t["global_offset"] = [5] * len(t["shape"])


def _shard_negative(ck, doc):
    t = doc["tensors"][_first_chunked(ck)]
    t["global_shape"] = list(t["shape"])
    t["global_offset"] = [-1] * len(t["shape"])


def _skeleton_dtensor_huge(ck, doc):
    """A DTensor node whose global shape (used to allocate the assembled tensor) is far larger than what
    the records hold."""
    key = "w"
    doc["skeleton"]["w"] = {"__t": "dtensor", "key": key, "global_shape": [1 << 20, 1 << 20], "placements": [["R"]]}


def _skeleton_missing_tensor(ck, doc):
    doc["skeleton"]["w"] = {"__t": "tensor", "key": "not saved"}


def _skeleton_bad_device(ck, doc):
    doc["skeleton"]["dev"] = {"__t": "device", "value": "warp-drive:9"}


def _skeleton_deep(ck, doc):
    node: object = 1
    for _ in range(600):
        node = [node]
    doc["skeleton"]["deep"] = node


def _record_bad_device(ck, doc):
    doc["tensors"][_first_chunked(ck)]["device"] = "warp-drive:9"


def _unhashable_dtype(ck, doc):
    doc["tensors"][_first_chunked(ck)]["dtype"] = ["float32"]


def _too_many_dims(ck, doc):
    doc["tensors"][_first_chunked(ck)]["shape"] = [1] * 65


def _symlink(name: str):
    def apply(ck: Checkpoint) -> None:
        target = ck.outside / f"copy-{name}"
        shutil.copy(ck.path(name), target)
        os.unlink(ck.path(name))
        os.symlink(target, ck.path(name))
        if name == DATA:
            ck.secret = target  # the same bytes, one symlink away

    return apply


def _symlinked_index_elsewhere(ck: Checkpoint) -> None:
    """The manifest names an index that is a symlink to a sealed index outside (checksum kept valid)."""
    target = ck.outside / "index.json"
    data = fmt.seal(ck.index)
    target.write_bytes(data)
    os.unlink(ck.path(INDEX))
    os.symlink(target, ck.path(INDEX))
    ck.secret = target


def _sparse_manifest(ck: Checkpoint) -> None:
    with open(ck.path(fmt.MANIFEST), "r+b") as f:
        f.truncate(fmt.MAX_JSON_BYTES + 1)


def _dup_manifest_key(ck: Checkpoint) -> None:
    data = fmt.seal(ck.manifest)
    text = data.decode().replace('\n "tag":', '\n "world_size": 1,\n "tag":', 1)
    assert text != data.decode()
    ck.write_manifest(raw=text.encode())


def _dup_index_key(ck: Checkpoint) -> None:
    data = fmt.seal(ck.index).decode()
    text = data.replace('\n "rank":', '\n "rank": 0,\n "rank":', 1)
    assert text != data
    ck.write_index(raw=text.encode())


CASES = {  # name: (kind, forge, expected text in the message)
    # manifest
    "manifest: rank index path traversal ../x": ("path traversal", _forge_manifest("ranks.index", "../x"), "not a plain"),
    "manifest: rank index absolute /etc/passwd": ("absolute path", _forge_manifest("ranks.index", "/etc/passwd"), "not a plain"),
    "manifest: rank index a/b": ("path traversal", _forge_manifest("ranks.index", "a/rank00000.json"), "not a plain"),
    "manifest: format_version from the future": ("future version", _forge_manifest("format_version", 99), "upgrade"),
    "manifest: world_size 2**40": ("huge size", _forge_manifest("world_size", 1 << 40), "world_size"),
    "manifest: world_size -1": ("negative size", _forge_manifest("world_size", -1), "world_size"),
    "manifest: rank -3": ("negative size", _forge_manifest("ranks.rank", -3), "rank"),
    "manifest: duplicated key": ("duplicated key", _dup_manifest_key, "duplicated key"),
    "manifest: 1 GiB sparse file": ("huge size", _sparse_manifest, "limit"),
    "manifest: symlink to a copy outside": ("symlink", _symlink(fmt.MANIFEST), ""),
    # rank index
    "index: data file ../secret.bin": ("path traversal", _forge_index(_set_file("../outside/secret.bin")), "not a plain"),
    "index: data file /etc/passwd": ("absolute path", _forge_index(_set_file("/etc/passwd")), "not a plain"),
    "index: data file a/b.bin": ("path traversal", _forge_index(_set_file("a/rank00000-0.bin")), "not a plain"),
    "index: rank index symlinked outside": ("symlink", _symlinked_index_elsewhere, ""),
    "index: data file symlinked outside": ("symlink", _symlink(DATA), ""),
    "index: format_version from the future": ("future version", _forge_index(lambda ck, d: d.update(format_version=fmt.FORMAT_VERSION + 1)), "format_version"),
    "index: duplicated key": ("duplicated key", _dup_index_key, "duplicated key"),
    "index: shape 2**31 from tiny zstd chunks": ("huge size", _forge_index(_huge_tensor_cheap_chunks), ""),
    "index: zstd frame declaring 1 TiB": ("huge size", _forge_index(_zstd_frame_claiming_terabytes), "declares"),
    "index: data file bytes outside every chunk": ("bytes outside every chunk", _forge_index(_padding), "not covered"),
    "index: negative shape": ("negative size", _forge_index(_set_tensor("shape", [-4, 8])), "shape"),
    "index: 65 dimensions": ("huge size", _forge_index(_too_many_dims), "shape"),
    "index: shape with 2**62 elements": ("huge size", _forge_index(_set_tensor("shape", [1 << 31, 1 << 31])), ""),
    "index: negative chunk offset": ("negative size", _forge_index(_set_chunk("off", -8)), "off"),
    "index: chunk offset past the end": ("huge offset", _forge_index(_set_chunk("off", 1 << 40)), "outside"),
    "index: negative chunk length": ("negative size", _forge_index(_set_chunk("len", -1)), "len"),
    "index: chunk length past the end": ("huge offset", _forge_index(_set_chunk("len", 1 << 40)), "outside"),
    "index: chunk raw 2**40": ("huge size", _forge_index(_set_chunk("raw", 1 << 40)), "raw"),
    "index: data file size 2**62": ("huge size", _forge_index(lambda ck, d: d["files"].update({DATA: 1 << 62})), ""),
    "index: unknown dtype": ("unknown dtype", _forge_index(_set_tensor("dtype", "float128")), "dtype"),
    "index: dtype not a string": ("unknown dtype", _forge_index(_unhashable_dtype), "dtype"),
    "index: unknown codec": ("unknown codec", _forge_index(_set_chunk("codec", "lz4")), "codec"),
    "index: unknown plane codec": ("unknown codec", _forge_index(
        lambda ck, d: next(c for t in d["tensors"].values() for c in t.get("chunks", []) if c["codec"] == "shuffle")
        ["planes"][0].__setitem__(0, "brotli")), "plane"),
    "index: view past its storage": ("view outside storage", _forge_index(_view_outside), "outside"),
    "index: view stride past its storage": ("view outside storage", _forge_index(_view_stride_outside), "outside"),
    "index: view of a view": ("view outside storage", _forge_index(_view_of_a_view), "storage"),
    "index: view of nothing": ("view outside storage", _forge_index(_view_of_nothing), ""),
    "index: shard outside its global shape": ("shard outside global shape", _forge_index(_shard_outside), "global"),
    "index: shard at a negative offset": ("shard outside global shape", _forge_index(_shard_negative), "global_offset"),
    "index: record device string": ("bad device", _forge_index(_record_bad_device), "device"),
    "skeleton: DTensor of 2**40 elements": ("huge size", _forge_index(_skeleton_dtensor_huge), ""),
    "skeleton: missing tensor": ("forged skeleton", _forge_index(_skeleton_missing_tensor), "not saved"),
    "skeleton: bad device": ("forged skeleton", _forge_index(_skeleton_bad_device), "device"),
    "skeleton: nested 600 deep": ("forged skeleton", _forge_index(_skeleton_deep), ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forged_input_is_refused_early(ckpt, monkeypatch, name):
    kind, forge, match = CASES[name]
    ok = 0
    try:
        forge(ckpt)
        err = refused(ckpt, monkeypatch, match=match)
        # the functional loader refuses it the same way
        with watched(ckpt, monkeypatch), pytest.raises(CheckpointError):
            asyncckpt.load(ckpt.save_dir, TAG)
        if kind in ("path traversal", "absolute path", "symlink", "huge size", "unknown dtype", "unknown codec",
                    "future version", "duplicated key", "view outside storage", "shard outside global shape",
                    "bytes outside every chunk"):
            assert isinstance(err, asyncckpt.CorruptCheckpointError), repr(err)
        ok = 1
    finally:
        record("Forged input", kind, 1, ok, note=name)


def test_the_unforged_copy_loads(ckpt, monkeypatch):
    """The harness itself: a re-sealed, unmodified index loads under the same watch."""
    ckpt.write_index()
    with watched(ckpt, monkeypatch):
        state = asyncckpt.CheckpointReader(ckpt.save_dir, TAG).load_state()
    assert torch.equal(state["w"], make_state()["w"])


# ---------------------------------------------------------------------------------------------------- fuzz
KEYS = ["format", "format_version", "world_size", "ranks", "rank", "index", "xxh3", "tag", "files", "tensors",
        "dtype", "shape", "device", "file", "chunks", "off", "len", "raw", "codec", "planes", "base", "stride",
        "byte_offset", "global_shape", "global_offset", "skeleton", "__t", "key", "node_local", "sxxh3"]
STRINGS = ["../x", "/etc/passwd", "a/b", "rank00000.json", "rank00000-0.bin", "float32", "uint8", "bfloat16",
           "zstd", "raw", "shuffle", "lz4", "cpu", "cuda:0", "meta", "warp:9", "asyncckpt", "", "0" * 16,
           "tensor", "dtensor", "pickle", "odict", "device", "dtype", "ndarray", "npscalar", "bytes"]
INTS = st.one_of(st.integers(-3, 70000), st.sampled_from([-(1 << 62), 1 << 31, 1 << 40, 1 << 62, 1 << 64, 10 ** 30]))
LEAVES = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from(STRINGS), st.text(max_size=12))
JSON = st.recursive(LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                   st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
                                                                   kids, max_size=4)), max_leaves=12)


def mutate(doc, data) -> object:
    """Replace, delete or add one node somewhere in ``doc`` (a deep copy), as drawn by hypothesis."""
    doc = copy.deepcopy(doc)
    node = doc
    for _ in range(data.draw(st.integers(0, 6))):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        containers = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not containers:
            break
        _, node = data.draw(st.sampled_from(containers))
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[key] = data.draw(JSON)
        elif action == "delete":
            del node[key]
        else:
            node[data.draw(st.sampled_from(KEYS))] = data.draw(JSON)
    elif isinstance(node, list) and node:
        i = data.draw(st.integers(0, len(node) - 1))
        node[i] = data.draw(JSON)
    return doc


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _only_checkpoint_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        return None


@pytest.fixture(scope="module")
def fuzz_counts():
    counts = {}
    yield counts
    for case, n in counts.items():
        record("Fuzz", case, n, n, note="hypothesis, derandomized; only CheckpointError subclasses raised")


def test_fuzz_parse_manifest(pristine, fuzz_counts):
    with open(os.path.join(pristine, TAG, fmt.MANIFEST), "rb") as f:
        base = fmt.unseal(f.read(), "manifest")
    n = [0]

    @FUZZ
    @given(st.data())
    def run(data):
        n[0] += 1
        kind = data.draw(st.sampled_from(["mutated", "arbitrary", "bytes"]))
        if kind == "bytes":
            blob = data.draw(st.binary(max_size=300))
        else:
            doc = mutate(base, data) if kind == "mutated" else data.draw(JSON)
            try:
                blob = fmt.seal(doc) if isinstance(doc, dict) else json.dumps(doc).encode()
            except (ValueError, TypeError, RecursionError):
                return  # not serialisable: nothing to parse
        _only_checkpoint_errors(fmt.parse_manifest, blob, "fuzzed manifest")

    run()
    fuzz_counts["parse_manifest (mutated, arbitrary and raw inputs)"] = n[0]


def test_fuzz_parse_rank_index(pristine, fuzz_counts):
    with open(os.path.join(pristine, TAG, INDEX), "rb") as f:
        base = fmt.unseal(f.read(), "index")
    sizes = {DATA: os.path.getsize(os.path.join(pristine, TAG, DATA))}
    n = [0]

    @FUZZ
    @given(st.data())
    def run(data):
        n[0] += 1
        doc = mutate(base, data) if data.draw(st.booleans()) else data.draw(JSON)
        try:
            blob = fmt.seal(doc) if isinstance(doc, dict) else json.dumps(doc).encode()
        except (ValueError, TypeError, RecursionError):
            return
        _only_checkpoint_errors(fmt.parse_rank_index, blob, "fuzzed index", sizes if data.draw(st.booleans()) else None)

    run()
    fuzz_counts["parse_rank_index (mutated and arbitrary inputs)"] = n[0]


def test_fuzz_reader_on_a_fuzzed_index(pristine, tmp_path, monkeypatch, fuzz_counts):
    """A full CheckpointReader (open, verify, load_state) on a directory whose index was mutated and
    re-sealed: only CheckpointErrors, and no large allocation or outside file."""
    ck = Checkpoint(pristine, tmp_path)
    base = copy.deepcopy(ck.index)
    n = [0]

    @FUZZ
    @given(st.data())
    def run(data):
        n[0] += 1
        doc = mutate(base, data)
        try:
            ck.write_index(doc)
        except (ValueError, TypeError, RecursionError):
            return
        with watched(ck, monkeypatch):
            try:
                reader = asyncckpt.CheckpointReader(ck.save_dir, TAG, threads=1)
                reader.verify()
                reader.load_state()
            except CheckpointError:
                pass

    run()
    fuzz_counts["CheckpointReader on a fuzzed rank index (open, verify, load)"] = n[0]


MALFORMED = {
    "float overflowing to inf": b'{"format": "asyncckpt", "x": 1e400, "checksum": "0000000000000000"}\n',
    "5000-digit integer": b'{"x": ' + b"9" * 5000 + b', "checksum": "0000000000000000"}\n',
    "nested 100000 deep": b"[" * 100000 + b"]" * 100000,
    "NaN constant": b'{"x": NaN, "checksum": "0000000000000000"}\n',
    "Infinity constant": b'{"x": -Infinity, "checksum": "0000000000000000"}\n',
    "UTF-8 BOM": b'\xef\xbb\xbf{"checksum": "0000000000000000"}\n',
    "UTF-16": '{"checksum": "0000000000000000"}\n'.encode("utf-16"),
    "invalid UTF-8": b'{"x": "\xff\xfe", "checksum": "0000000000000000"}\n',
    "not an object": b"[1, 2, 3]\n",
    "empty": b"",
    "checksum not a string": b'{"checksum": 12}\n',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_json_is_a_checkpoint_error(name):
    blob = MALFORMED[name]
    ok = 0
    try:
        for parse in (fmt.parse_manifest, fmt.parse_rank_index):
            with pytest.raises(CheckpointError):
                parse(blob, "malformed")
        ok = 1
    finally:
        record("Forged input", "malformed JSON", 1, ok, note=name)
