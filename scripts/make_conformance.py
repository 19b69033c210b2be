"""Generate the conformance corpus of the asyncckpt format (tests/conformance/, docs/FORMAT.md section 13).

    python scripts/make_conformance.py            write tests/conformance/ afresh
    python scripts/make_conformance.py --check    regenerate into a temporary directory and compare, byte for byte

Every case is a save directory: ``case.json`` says what a reader must do with it, and the checkpoint is the tag
``t`` (or what ``latest`` names). Valid cases are written by asyncckpt's own writer (multi-rank ones are put
together from single-rank saves, as the ranks of one job would write them), with ``created_unix`` and
``library_version`` pinned so that the corpus is reproducible; ``case.json`` describes the loaded state of every
rank, in a form that does not depend on Python (see :func:`describe`). Invalid cases are forged from a valid one
and re-sealed, each breaking one rule; ``case.json`` names the error class a reader must raise. The byte-exact
``--check`` needs the libzstd version recorded in ``generator.json`` (compressed bytes depend on it).
"""
from __future__ import annotations

import argparse
import collections
import filecmp
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np
import torch
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncckpt  # noqa: E402
from asyncckpt import format as fmt  # noqa: E402
from asyncckpt.owners import ROW, rank_row, restamp, write_tables  # noqa: E402
from asyncckpt.state import MAX_DEPTH, METADATA_PART, join, key_part  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "conformance")
V1_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "v1", "raw")
TAG = "t"
CORRUPT, UNSAFE = "CorruptCheckpointError", "UnsafeCheckpointError"
SAVE_ID = "0123456789abcdef0123456789abcdef"
CREATED_UNIX = 1700000000.0
LIBRARY_VERSION = "conformance"


# ------------------------------------------------------------------------------------- what a load gives
def describe(state) -> list:
    """The loaded state as ``[key path, value]`` pairs in depth-first order, where each value is a small JSON
    object any language can compare: containers give their kind and length (their entries follow, under
    their key-path parts, docs/FORMAT.md section 7), scalars their exact value, tensors their dtype, shape,
    the xxh3-64 of their bytes (little-endian, C order) and a storage number (tensors that share memory
    after loading have the same number, numbered in order of first appearance)."""
    out: list = []
    storages: dict = {}

    def walk(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            ptr = (obj.device, obj.untyped_storage().data_ptr()) if obj.numel() else ("empty", len(storages))
            sid = storages.setdefault(ptr, len(storages))
            data = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b""
            out.append([path, {"tensor": fmt.DTYPE_NAMES[obj.dtype], "shape": list(obj.shape),
                               "xxh3": fmt.checksum(data), "storage": sid}])
        elif isinstance(obj, np.ndarray):
            out.append([path, {"ndarray": obj.dtype.str, "shape": list(obj.shape),
                               "xxh3": fmt.checksum(np.ascontiguousarray(obj).tobytes())}])
        elif isinstance(obj, np.generic):
            out.append([path, {"npscalar": obj.dtype.str, "hex": obj.tobytes().hex()}])
        elif obj is None:
            out.append([path, {"null": None}])
        elif isinstance(obj, bool):
            out.append([path, {"bool": obj}])
        elif isinstance(obj, int):
            out.append([path, {"int": str(obj)}])
        elif isinstance(obj, float):
            out.append([path, {"float": obj.hex()}])
        elif isinstance(obj, str):
            out.append([path, {"str": obj}])
        elif isinstance(obj, bytes):
            out.append([path, {"bytes": obj.hex()}])
        elif isinstance(obj, torch.dtype):
            out.append([path, {"dtype": fmt.DTYPE_NAMES[obj]}])
        elif isinstance(obj, torch.device):
            out.append([path, {"device": str(obj)}])
        elif isinstance(obj, torch.Size):
            out.append([path, {"size": list(obj)}])
        elif isinstance(obj, dict):
            kind = "odict" if type(obj) is collections.OrderedDict else "dict"
            out.append([path, {kind: len(obj)}])
            for i, (k, v) in enumerate(obj.items()):
                part = key_part(k, i)
                if part.startswith("~k"):  # a key object: described under ~K<i>
                    walk(k, join(path, f"~K{i}"))
                walk(v, join(path, part))
            if kind == "odict" and getattr(obj, "_metadata", None) is not None:
                walk(obj._metadata, join(path, METADATA_PART))
        elif isinstance(obj, (list, tuple)):
            out.append([path, {type(obj).__name__: len(obj)}])
            for i, v in enumerate(obj):
                walk(v, join(path, str(i)))
        else:
            raise TypeError(f"cannot describe {type(obj).__name__} at {path!r}")

    walk(state, "")
    return out


# ------------------------------------------------------------------------------------------ valid states
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` elements of ``dtype`` with arbitrary bit patterns (for dtypes without arithmetic)."""
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=_gen(seed)).view(dtype)


def dtype_state() -> dict:
    """One tensor of every dtype of the table (docs/FORMAT.md section 6), with values that compress."""
    g = _gen(1)
    out = {}
    for name, dtype in fmt.DTYPES.items():
        if dtype.is_floating_point and dtype.itemsize >= 2:
            t = (torch.randn(96, generator=g) * 4).round().to(dtype)  # few distinct values: planes compress
        elif dtype.is_complex and dtype != torch.complex32:
            t = torch.complex(torch.randn(40, generator=g).round(), torch.randn(40, generator=g).round()).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(70, generator=g) > 0.5
        elif dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            t = torch.randint(-3 if dtype != torch.uint8 else 0, 4, (90,), generator=g).to(dtype)
        else:  # uint16/32/64, complex32, float8 and float4 variants: bytes
            t = _bits(50, dtype, len(out))
        out[name] = t
    out["scalar_f64"] = torch.tensor(2.5, dtype=torch.float64)
    out["empty"] = torch.zeros(0, 3, dtype=torch.float32)
    out["big_f32"] = torch.arange(3000, dtype=torch.float32) / 8  # several shuffle planes, some raw
    return out


def view_state() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    buf = torch.arange(32, dtype=torch.uint8)
    col = torch.arange(5, dtype=torch.int16)
    return {
        "base": base, "row": base[1], "col": base[:, 2], "t": base.t(), "step": base[::2, 1::3],
        "tied": [base[3], base[3]],
        "bytes": buf, "as_i32": buf[4:20].view(torch.int32),  # another dtype over one storage
        "col_src": col, "expanded": col.expand(3, 5),  # stride 0
        "transposed_alone": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # no sharing: loads contiguous
    }


def skeleton_state() -> dict:
    od = collections.OrderedDict([("b", torch.ones(2)), ("a", 1)])
    od._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "opt": {"param_groups": [{"lr": 0.001, "eps": 1e-08, "betas": (0.9, 0.999), "weight_decay": 0.01,
                                  "params": [0, 1]}],
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((3,), 0.25)}, 1: {}}},
        "keys": {3: "int", "3": "str", True: "bool", None: "none", 1.5: "float", -0.0: "minus zero",
                 (1, "a"): "tuple", float("nan"): "nan key", "": "empty", "a/b~c": "escaped"},
        "module": od,
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308, 0.1],
        "ints": [0, -1, 2 ** 63, -(10 ** 40)],
        "text": "é ü ∑ 😀 \u2028 \x00 \"q\" \\ /",
        "tuple": (1, ("nested", [2])), "bytes": b"\x00\xff\x10", "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1), "size": torch.Size([2, 3]),
        "np": np.arange(6, dtype=np.int32).reshape(2, 3), "np0d": np.array(1.5, dtype=np.float64),
        "npbool": np.array([True, False]), "npscalar": np.float32(0.25), "npint": np.int64(-7),
        "dict_with_t": {"__t": "not a node", "x": 1},
    }


def chunk_state() -> dict:
    return {"a": torch.arange(10000, dtype=torch.int32), "b": torch.randn(500, generator=_gen(7)),
            "c": torch.zeros(5000, dtype=torch.float64), "d": torch.arange(100, dtype=torch.int16)}


def small_state() -> dict:
    """The base of the invalid cases: one tensor per codec, a view, a 0-d tensor, an array, a few values. The
    shuffle and zstd tensors have 4096 bytes, so that no writer packs them with others (SMALL_CONFIG)."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "w": torch.arange(1024, dtype=torch.float32) / 4,  # shuffle
        "b": (torch.arange(4096) % 7).to(torch.uint8),  # zstd
        "r": torch.randn(16, generator=_gen(3)),  # raw
        "base": base, "row": base[1],
        "step": torch.tensor(7, dtype=torch.int64),
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "hp": {"eps": 1e-08, 3: "three"},
    }


# ------------------------------------------------------------------------------------------ writing cases
CODEC_OFF = {"codec": {"compression": False}}
SMALL_CONFIG = {"codec": {"chunk_mib": 1 / 64}}  # 16 KiB chunks
ONE_THREAD = {"writer": {"threads_per_node": 1, "fsync": False}}


def _config(extra: dict | None = None) -> dict:
    cfg = {"writer": dict(ONE_THREAD["writer"]), "codec": {}}
    for section, values in (extra or {}).items():
        cfg[section].update(values)
    return cfg


def save(state, save_dir: str, config: dict | None = None, tag: str = TAG) -> None:
    asyncckpt.save(state, save_dir, tag, config=_config(config)).result(120)
    pin_manifest(os.path.join(save_dir, tag))


def read_doc(path: str) -> dict:
    with open(path, "rb") as f:
        return fmt.unseal(f.read(), path)


def write_doc(path: str, doc: dict) -> bytes:
    data = fmt.seal(doc)
    with open(path, "wb") as f:
        f.write(data)
    return data


def pin_manifest(tag_dir: str) -> None:
    path = os.path.join(tag_dir, fmt.MANIFEST)
    doc = read_doc(path)
    doc.update(created_unix=CREATED_UNIX, library_version=LIBRARY_VERSION)
    if "save_id" in doc:  # a random nonce per save (section 11.6): pinned so the corpus reproduces
        doc["save_id"] = SAVE_ID
    write_doc(path, doc)


def write_index(tag_dir: str, rank: int, doc: dict, data: bytes | None = None) -> None:
    """Write rank ``rank``'s index (sealed from ``doc``, or the raw ``data``) and update the manifest (format v2)
    or the rank and owner tables (format v3) to match."""
    name = fmt.rank_index_name(rank)
    if data is None:
        data = fmt.seal(doc)
    with open(os.path.join(tag_dir, name), "wb") as f:
        f.write(data)
    restamp(tag_dir)


def compose(save_dir: str, states: dict[int, object], world_size: int, config: dict | None = None,
            node_local: bool = False, edit=None) -> None:
    """A checkpoint of ``world_size`` ranks from single-rank saves of each rank's state: rank r's files are
    renamed rankNNNNN..., its index says rank r; ``edit(rank, doc)`` may change an index before it is sealed."""
    tag_dir = os.path.join(save_dir, TAG)
    os.makedirs(tag_dir)
    entries = []
    for rank, state in states.items():
        with tempfile.TemporaryDirectory() as tmp:
            save(state, tmp, config)
            src = os.path.join(tmp, TAG)
            doc = read_doc(os.path.join(src, fmt.rank_index_name(0)))
            renames = {name: name.replace("rank00000-", f"rank{rank:05d}-", 1) for name in doc["files"]}
            for old, new in renames.items():
                shutil.copyfile(os.path.join(src, old), os.path.join(tag_dir, new))
            doc["rank"] = rank
            doc["files"] = {renames[n]: s for n, s in doc["files"].items()}
            for rec in doc["tensors"].values():
                if "file" in rec:
                    rec["file"] = renames[rec["file"]]
            # packs are named after the rank that wrote them (~pack/<rank>/<n>): keep that true for rank r
            pack = lambda key: key.replace("~pack/0/", f"~pack/{rank}/", 1) if key.startswith("~pack/0/") else key
            doc["tensors"] = {pack(k): rec for k, rec in doc["tensors"].items()}
            for rec in doc["tensors"].values():
                if "base" in rec:
                    rec["base"] = pack(rec["base"])
            if edit is not None:
                edit(rank, doc)
            data = write_doc(os.path.join(tag_dir, fmt.rank_index_name(rank)), doc)
            entries.append((rank, fmt.rank_index_name(rank), fmt.checksum(data), sum(doc["files"].values()) + len(data)))
    manifest = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "library_version": LIBRARY_VERSION,
                "tag": TAG, "world_size": world_size, "created_unix": CREATED_UNIX, "node_local": node_local,
                **write_tables(tag_dir, entries, fsync=False)}
    write_doc(os.path.join(tag_dir, fmt.MANIFEST), manifest)
    with open(os.path.join(save_dir, fmt.LATEST), "w") as f:
        f.write(TAG + "\n")


def write_case(case_dir: str, case: dict) -> None:
    with open(os.path.join(case_dir, "case.json"), "w", encoding="utf-8") as f:
        json.dump(case, f, indent=1, ensure_ascii=False)
        f.write("\n")


def loaded(save_dir: str, tag: str | None) -> dict:
    """What each rank of the checkpoint loads (verify first), described."""
    reader = asyncckpt.CheckpointReader(save_dir, tag)
    reader.verify()
    return {str(rank): describe(reader.load_state(rank=rank)) for rank in sorted(reader.indices)}


def valid_cases(root: str) -> None:
    def case(name: str, description: str, make, tag: str | None = TAG) -> None:
        save_dir = os.path.join(root, "valid", name)
        os.makedirs(save_dir)
        make(save_dir)
        write_case(save_dir, {"description": description, "tag": tag, "ranks": loaded(save_dir, tag)})

    case("dtypes", "every dtype of the table, compressed (raw, zstd and shuffle chunks), a 0-d and an empty tensor",
         lambda d: save(dtype_state(), d))
    case("dtypes_raw", "every dtype of the table, compression off (raw chunks only)",
         lambda d: save(dtype_state(), d, CODEC_OFF))
    case("views", "views of shared storages (slices, a transpose, a stride-0 expand, another dtype), a tied "
         "tensor, and a transposed tensor without shared storage (it loads contiguous)",
         lambda d: save(view_state(), d))
    case("skeleton", "every skeleton node but pickle: keys of every kind, OrderedDict metadata, non-finite "
         "floats, huge ints, Unicode, numpy arrays (0-d too) and scalars, dtype, device, size, bytes",
         lambda d: save(skeleton_state(), d))
    case("chunks", "several chunks per tensor (16 KiB chunks) in two data files",
         lambda d: save(chunk_state(), d, {"codec": {"chunk_mib": 1 / 64}, "writer": {"files_per_rank": 2}}))
    case("latest", "the tag named by `latest` (load with no tag)", lambda d: save(small_state(), d, SMALL_CONFIG),
         tag=None)
    case("foreign_json", "index and manifest rewritten the way another JSON library would write them "
         "(no indentation, members reordered, 1e-8, upper-case \\u escapes), sealed over those bytes",
         lambda d: (save(skeleton_state(), d), _foreign_json(os.path.join(d, TAG))))
    case("two_ranks", "two ranks: rank-local tensors under the same key, a tensor written once by rank 0 that "
         "rank 1's skeleton references too (replicated state)",
         lambda d: compose(d, {0: {"x": torch.zeros(3), "rep": torch.arange(4.0)}, 1: {"x": torch.ones(3)}}, 2,
                           edit=_rep_on_rank0_only))
    case("sharded", "a DTensor sharded over two ranks on dimension 0 (records with global_shape and "
         "global_offset), loaded whole",
         lambda d: compose(d, {0: {"w": torch.arange(1200.0).reshape(2, 600)},
                               1: {"w": torch.arange(1200.0, 2400.0).reshape(2, 600)}},
                           2, config={"codec": {"chunk_mib": 1 / 64}}, edit=_shard_rows))  # shards too big to pack
    case("node_local", "a node-local copy of a two-rank job holding rank 1 only (node_local: the rank table has "
         "one row)",
         lambda d: compose(d, {1: {"x": torch.full((2,), 5.0)}}, 2, node_local=True))
    case("replaced_partial", "an overwrite cut short between its two renames: `t` is missing, and the complete "
         "old copy under `.t.replaced.partial` is what `t` loads",
         lambda d: (save(small_state(), d, SMALL_CONFIG),
                    os.rename(os.path.join(d, TAG), os.path.join(d, ".t.replaced.partial"))))
    case("v2", "a format v2 checkpoint: the manifest lists every rank's entry inline, no rank or owner table",
         lambda d: (save(small_state(), d, SMALL_CONFIG), as_v2(os.path.join(d, TAG))))
    case("v1", "a format v1 checkpoint written by asyncckpt 0.1.0 (tests/fixtures/v1/raw): the v1 seal",
         lambda d: shutil.copytree(V1_FIXTURE, os.path.join(d, TAG)))


def as_v2(tag_dir: str) -> None:
    """Rewrite a single-save checkpoint the way format v2 writers wrote it: the rank entries inline in the
    manifest, every document of format_version 2, no tables."""
    mpath = os.path.join(tag_dir, fmt.MANIFEST)
    manifest = read_doc(mpath)
    entries = []
    with open(os.path.join(tag_dir, fmt.RANK_TABLE), "rb") as f:
        rows = f.read()
    for i in range(0, len(rows), ROW):
        rank, nbytes = int(rows[i: i + 10]), int(rows[i + 28: i + 48])
        path = os.path.join(tag_dir, fmt.rank_index_name(rank))
        data = write_doc(path, dict(read_doc(path), format_version=2))
        entries.append({"rank": rank, "index": fmt.rank_index_name(rank), "xxh3": fmt.checksum(data), "bytes": nbytes})
    for name in (fmt.RANK_TABLE, fmt.OWNER_KEYS, fmt.OWNER_ROWS):
        os.unlink(os.path.join(tag_dir, name))
    for field in ("rank_table", "owners"):
        del manifest[field]
    write_doc(mpath, dict(manifest, format_version=2, ranks=entries))


def _rep_on_rank0_only(rank: int, doc: dict) -> None:
    if rank == 1:  # rank 1 references the copy rank 0 wrote
        doc["skeleton"]["rep"] = {"__t": "tensor", "key": "rep"}


def _shard_rows(rank: int, doc: dict) -> None:
    doc["tensors"]["w"].update(global_shape=[4, 600], global_offset=[2 * rank, 0])
    doc["skeleton"]["w"] = {"__t": "dtensor", "key": "w", "global_shape": [4, 600], "placements": [["S", 0]]}


def _foreign_json(tag_dir: str) -> None:
    def foreign(doc: dict) -> bytes:
        items = list(doc.items())[::-1]
        text = json.dumps(dict(items), separators=(",", ":"))  # ASCII with \u escapes
        text = text.replace("1e-08", "1e-8")
        text = _upper_escapes(text)
        rest = (text[1:]).encode()
        return b'{"checksum":"' + fmt.checksum(rest).encode() + b'",' + rest

    index = read_doc(os.path.join(tag_dir, fmt.rank_index_name(0)))
    data = foreign(index)
    assert b"1e-8" in data and b"\\u00E9" in data
    with open(os.path.join(tag_dir, fmt.rank_index_name(0)), "wb") as f:
        f.write(data)
    restamp(tag_dir)
    manifest = read_doc(os.path.join(tag_dir, fmt.MANIFEST))
    with open(os.path.join(tag_dir, fmt.MANIFEST), "wb") as f:
        f.write(foreign(manifest))


def _upper_escapes(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            if text[i + 1] == "u":
                out.append("\\u" + text[i + 2: i + 6].upper())
                i += 6
                continue
            out.append(text[i: i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------- invalid cases
INDEX = fmt.rank_index_name(0)
DATA = fmt.data_file_name(0, 0)


class Forge:
    """A copy of the small checkpoint to break: its manifest and rank 0's index as documents, and helpers that
    write them back re-sealed (keeping the manifest's checksum of the index right)."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.tag_dir = os.path.join(save_dir, TAG)
        self.index = read_doc(self.path(INDEX))
        self.manifest = read_doc(self.path(fmt.MANIFEST))

    def path(self, name: str) -> str:
        return os.path.join(self.tag_dir, name)

    def write_index(self, raw: bytes | None = None) -> None:
        write_index(self.tag_dir, 0, self.index, raw)
        self.manifest = read_doc(self.path(fmt.MANIFEST))

    def write_manifest(self, raw: bytes | None = None) -> None:
        with open(self.path(fmt.MANIFEST), "wb") as f:
            f.write(raw if raw is not None else fmt.seal(self.manifest))

    def record(self, codec: str) -> tuple[str, dict]:
        """The first record with a chunk of ``codec``."""
        return next((k, r) for k, r in self.index["tensors"].items()
                    if any(c["codec"] == codec for c in r.get("chunks", [])))

    def view(self) -> dict:
        return next(r for r in self.index["tensors"].values() if "base" in r)

    def data(self) -> bytes:
        with open(self.path(DATA), "rb") as f:
            return f.read()

    def write_data(self, data: bytes) -> None:
        with open(self.path(DATA), "wb") as f:
            f.write(data)

    def replace_stored(self, new: bytes) -> None:
        """Give chunk 0 of the zstd record the stored bytes ``new`` (the data file is rebuilt, chunks move)."""
        key = self.record("zstd")[0]
        old = self.data()
        chunks = sorted((c["off"], k, c) for k, r in self.index["tensors"].items() for c in r.get("chunks", []))
        out = bytearray()
        for off, k, c in chunks:
            piece = new if c is self.index["tensors"][key]["chunks"][0] else old[off: off + c["len"]]
            c.update(off=len(out), len=len(piece))
            if c is self.index["tensors"][key]["chunks"][0]:
                c["sxxh3"] = fmt.checksum(piece)
            out += piece
        self.write_data(bytes(out))
        self.index["files"][DATA] = len(out)
        self.write_index()


def _zstd(data: bytes, content_size: bool = True) -> bytes:
    if content_size:
        return zstandard.ZstdCompressor(level=3).compress(data)
    c = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    return c.compress(data) + c.flush()


def _decoded(ck: Forge) -> bytes:
    """What the zstd record's chunk 0 decodes to."""
    c = ck.record("zstd")[1]["chunks"][0]
    return zstandard.ZstdDecompressor().decompress(ck.data()[c["off"]: c["off"] + c["len"]])


def _skippable(n: int) -> bytes:
    return struct.pack("<II", 0x184D2A50, n) + b"\0" * n


def _set_tensor(field: str, value):
    def forge(ck: Forge) -> None:
        key = next(iter(ck.index["tensors"]))
        ck.index["tensors"][key][field] = value
        ck.write_index()
    return forge


def _edit_index(fn):
    def forge(ck: Forge) -> None:
        fn(ck, ck.index)
        ck.write_index()
    return forge


def _edit_manifest(fn):
    def forge(ck: Forge) -> None:
        fn(ck, ck.manifest)
        ck.write_manifest()
    return forge


def _edit_view(fn):
    return _edit_index(lambda ck, d: fn(ck.view()))


def _raw_index(transform):
    """Rank 0's index written as ``transform(its sealed bytes)`` (the manifest's checksum of it kept right)."""
    def forge(ck: Forge) -> None:
        ck.write_index(raw=transform(fmt.seal(ck.index)))
    return forge


def _reseal(data: bytes) -> bytes:
    """A v2 document with its prefix recomputed over whatever follows it."""
    return data[:13] + fmt.checksum(data[31:]).encode() + data[29:]


def _flip(name: str, pos: float):
    def forge(ck: Forge) -> None:
        with open(ck.path(name), "r+b") as f:
            data = bytearray(f.read())
            data[int(len(data) * pos)] ^= 0x04
            f.seek(0)
            f.write(data)
    return forge


def _flip_chunk(codec: str):
    def forge(ck: Forge) -> None:
        key, rec = ck.record(codec)
        c = next(c for c in rec["chunks"] if c["codec"] == codec)
        data = bytearray(ck.data())
        data[c["off"] + c["len"] // 2] ^= 0x10
        ck.write_data(bytes(data))
    return forge


def _v1_seal(doc: dict) -> bytes:
    body = dict(doc)
    body["checksum"] = fmt.checksum(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return json.dumps(body, indent=1).encode() + b"\n"


def _rename_index(ck: Forge) -> None:
    os.rename(ck.path(INDEX), ck.path(fmt.rank_index_name(1)))
    ck.manifest["ranks"][0]["index"] = fmt.rank_index_name(1)
    ck.write_manifest()


def _rank_table(fn):
    """The rank table rewritten as ``fn(ck, its bytes)``, the manifest's checksum of it kept right."""
    def forge(ck: Forge) -> None:
        with open(ck.path(fmt.RANK_TABLE), "rb") as f:
            rows = fn(ck, f.read())
        with open(ck.path(fmt.RANK_TABLE), "wb") as f:
            f.write(rows)
        ck.manifest["rank_table"]["xxh3"] = fmt.checksum(rows)
        ck.write_manifest()
    return forge


def _owner_keys(ck: Forge, fn, restamp: bool) -> None:
    """owners.json re-sealed with ``fn(its keys)``; with ``restamp``, the manifest's checksum of it updated."""
    data = write_doc(ck.path(fmt.OWNER_KEYS), {"keys": fn(read_doc(ck.path(fmt.OWNER_KEYS))["keys"])})
    if restamp:
        ck.manifest["owners"]["xxh3"] = fmt.checksum(data)
        ck.write_manifest()


def _rename_data(ck: Forge) -> None:
    other = fmt.data_file_name(1, 0)
    os.rename(ck.path(DATA), ck.path(other))
    ck.index["files"] = {other: ck.index["files"][DATA]}
    for rec in ck.index["tensors"].values():
        if "file" in rec:
            rec["file"] = other
    ck.write_index()


def _deep_skeleton(ck: Forge, doc: dict) -> None:
    node: object = {"__t": "tensor", "key": "w"}
    for _ in range(MAX_DEPTH):
        node = [node]
    doc["skeleton"]["deep"] = node  # the root dict, then MAX_DEPTH lists: one container too many


def _dtensor_with_a_hole(ck: Forge, doc: dict) -> None:
    rec = doc["tensors"]["w"]
    whole = [2 * rec["shape"][0]]
    rec.update(global_shape=whole, global_offset=[0])
    doc["skeleton"]["w"] = {"__t": "dtensor", "key": "w", "global_shape": whole, "placements": [["S", 0]]}


def _add_chunk(ck: Forge, doc: dict) -> None:
    key, rec = ck.record("raw")
    c = rec["chunks"][0]
    half = c["raw"] // 2
    rec["chunks"] = [dict(c, len=half, raw=half, xxh3=fmt.checksum(ck.data()[c["off"]: c["off"] + half])),
                     dict(c, off=c["off"] + half, len=c["len"] - half, raw=c["raw"] - half,
                          xxh3=fmt.checksum(ck.data()[c["off"] + half: c["off"] + c["len"]]))]


def _zstd_ratio(ck: Forge, doc: dict) -> None:
    key, rec = ck.record("zstd")
    c = rec["chunks"][0]
    c["raw"] = 32768 * c["len"] + 1
    rec["shape"] = [c["raw"]]  # uint8


INVALID = {  # name: (error class, description, forge)
    # the seal and JSON (section 2)
    "seal_flipped_index_byte": (CORRUPT, "one bit of the rank index flipped", _flip(INDEX, 0.5)),
    "seal_flipped_manifest_byte": (CORRUPT, "one bit of the manifest flipped", _flip(fmt.MANIFEST, 0.6)),
    "seal_whitespace": (CORRUPT, "a space added to the index after sealing (the manifest's checksum of the "
                        "index updated)", _raw_index(lambda d: d.replace(b",\n", b", \n", 1))),
    "seal_no_final_newline": (CORRUPT, "the index's final newline cut off (manifest checksum updated)",
                              _raw_index(lambda d: d[:-1])),
    "seal_uppercase_hex": (CORRUPT, "the manifest's seal written in upper-case hex digits",
                           lambda ck: ck.write_manifest(raw=(lambda d: d[:13] + d[13:29].upper() + d[29:])(fmt.seal(ck.manifest)))),
    "seal_v1_on_v2": (UNSAFE, "a format_version 2 index sealed the v1 way",
                      lambda ck: ck.write_index(raw=_v1_seal(ck.index))),
    "seal_v2_on_v1": (UNSAFE, "the format v1 fixture's manifest re-sealed the v2 way", None),
    "json_duplicate_key": (UNSAFE, "the index has a key twice (sealed over it)",
                           _raw_index(lambda d: _reseal(d.replace(b'\n "rank": 0,', b'\n "rank": 0,\n "rank": 0,', 1)))),
    "json_nan": (CORRUPT, "the manifest holds NaN (not JSON), sealed over it",
                 lambda ck: ck.write_manifest(raw=_reseal(fmt.seal(ck.manifest).replace(
                     b'"created_unix": 1700000000.0', b'"created_unix": NaN')))),
    "json_number_overflow": (CORRUPT, "the manifest holds 1e400 (no double), sealed over it",
                             lambda ck: ck.write_manifest(raw=_reseal(fmt.seal(ck.manifest).replace(
                                 b'"created_unix": 1700000000.0', b'"created_unix": 1e400')))),
    "json_lone_surrogate": (CORRUPT, "an index string escapes an unpaired surrogate (\\ud800), sealed over it",
                            _raw_index(lambda d: _reseal(d.replace(b'"three"', b'"\\ud800"', 1)))),
    "json_invalid_utf8": (CORRUPT, "an index string holds a byte that is not UTF-8, sealed over it",
                          _raw_index(lambda d: _reseal(d.replace(b'"three"', b'"thr\xffe"', 1)))),
    # manifest (section 3)
    "manifest_future_version": (UNSAFE, "the manifest says format_version 99",
                                _edit_manifest(lambda ck, m: m.update(format_version=99))),
    "manifest_world_size_zero": (UNSAFE, "world_size 0", _edit_manifest(lambda ck, m: m.update(world_size=0))),
    "manifest_rank_out_of_range": (UNSAFE, "format v2: a rank entry for rank 1 of a world of 1",
                                   _edit_manifest(lambda ck, m: m["ranks"][0].update(rank=1, index="rank00001.json"))),
    "manifest_index_of_another_rank": (UNSAFE, "format v2: rank 0's entry names rank00001.json (the file renamed so)",
                                       _rename_index),
    "manifest_index_name_not_canonical": (UNSAFE, "format v2: rank 0's index named rank000000.json",
                                          _edit_manifest(lambda ck, m: m["ranks"][0].update(index="rank000000.json"))),
    "manifest_ranks_present": (UNSAFE, "format v2: ranks_present lists a rank that `ranks` does not",
                               _edit_manifest(lambda ck, m: m.update(ranks_present=[0, 1]))),
    "manifest_bad_tag": (UNSAFE, "the manifest's tag is not a valid tag", _edit_manifest(lambda ck, m: m.update(tag="../t"))),
    "manifest_index_checksum": (CORRUPT, "format v2: the manifest's checksum of the index differs from the index's bytes",
                                _edit_manifest(lambda ck, m: m["ranks"][0].update(xxh3="0123456789abcdef"))),
    "manifest_index_missing": (CORRUPT, "the rank index the rank table lists is missing", lambda ck: os.unlink(ck.path(INDEX))),
    "manifest_ranks_inline": (UNSAFE, "a format v3 manifest that also lists its ranks inline",
                              _edit_manifest(lambda ck, m: m.update(ranks=[]))),
    # rank table and owner table (section 15)
    "rank_table_rank_out_of_range": (UNSAFE, "the rank table's row names rank 1 of a world of 1 (row re-checksummed)",
                                     _rank_table(lambda ck, rows: rank_row(1, rows[11:27].decode(), int(rows[28:48])))),
    "rank_table_row_flipped": (CORRUPT, "one bit of the rank table's row flipped (its own checksum not updated)",
                               _rank_table(lambda ck, rows: rows[:5] + bytes([rows[5] ^ 1]) + rows[6:])),
    "rank_table_index_checksum": (CORRUPT, "the rank table's checksum of the index differs from the index's bytes",
                                  _rank_table(lambda ck, rows: rank_row(0, "0123456789abcdef", int(rows[28:48])))),
    "rank_table_truncated": (CORRUPT, "the rank table is one byte shorter than its rows", _rank_table(lambda ck, rows: rows[:-1])),
    "owners_checksum": (CORRUPT, "owners.json is not the one the manifest's checksum names (keys reordered, re-sealed)",
                        lambda ck: _owner_keys(ck, lambda keys: dict(reversed(list(keys.items()))), restamp=False)),
    "owners_key_missing": (UNSAFE, "the owner table leaves out a key rank 0's index holds (manifest updated)",
                           lambda ck: _owner_keys(ck, lambda keys: dict(list(keys.items())[1:]), restamp=True)),
    "owners_rows_flipped": (CORRUPT, "one bit of owners.tbl flipped (the manifest's checksum of it not updated)",
                            _flip(fmt.OWNER_ROWS, 0.5)),
    # rank index (section 4)
    "index_rank_field": (UNSAFE, "rank 0's index says rank 1", _edit_index(lambda ck, d: d.update(rank=1))),
    "index_version_differs": (UNSAFE, f"a format_version 1 index (v1 seal) under a format_version "
                              f"{fmt.FORMAT_VERSION} manifest",
                              lambda ck: ck.write_index(raw=_v1_seal(dict(ck.index, format_version=1)))),
    "index_data_file_of_another_rank": (UNSAFE, "rank 0's data file named rank00001-0.bin", _rename_data),
    "data_truncated": (CORRUPT, "the data file is one byte shorter than the index says",
                       lambda ck: ck.write_data(ck.data()[:-1])),
    "data_extended": (CORRUPT, "the data file is one byte longer than the index says",
                      lambda ck: ck.write_data(ck.data() + b"\0")),
    "data_flipped_raw": (CORRUPT, "one bit flipped in a raw chunk", _flip_chunk("raw")),
    "data_flipped_zstd": (CORRUPT, "one bit flipped in a zstd chunk", _flip_chunk("zstd")),
    "data_flipped_shuffle": (CORRUPT, "one bit flipped in a shuffle chunk", _flip_chunk("shuffle")),
    # tensor records and chunks (sections 5, 6)
    "record_unknown_dtype": (UNSAFE, "dtype float128", _set_tensor("dtype", "float128")),
    "record_device_leading_zero": (UNSAFE, "device cuda:01", _set_tensor("device", "cuda:01")),
    "record_device_meta": (UNSAFE, "device meta", _set_tensor("device", "meta")),
    "record_device_upper_case": (UNSAFE, "device CPU", _set_tensor("device", "CPU")),
    "record_device_trailing_newline": (UNSAFE, "device \"cpu\\n\"", _set_tensor("device", "cpu\n")),
    "record_65_dims": (UNSAFE, "a shape of 65 dimensions", _set_tensor("shape", [1] * 65)),
    "record_negative_dim": (UNSAFE, "a negative dimension", _set_tensor("shape", [-1])),
    "chunk_unknown_codec": (UNSAFE, "codec lz4", _edit_index(lambda ck, d: ck.record("raw")[1]["chunks"][0].update(codec="lz4"))),
    "chunk_raw_sum": (UNSAFE, "a record whose chunks decode to fewer bytes than its shape needs",
                      _edit_index(lambda ck, d: ck.record("raw")[1].update(shape=[15]))),
    "chunk_too_many": (UNSAFE, "a 64-byte tensor stored in two chunks (at most ceil(64 / 4096) = 1)",
                       _edit_index(_add_chunk)),
    "chunk_overlap": (UNSAFE, "two chunks overlap in the data file",
                      _edit_index(lambda ck, d: ck.record("zstd")[1]["chunks"][0].update(off=ck.record("raw")[1]["chunks"][0]["off"]))),
    "chunk_zstd_ratio": (UNSAFE, "a zstd chunk claiming more than 32768 decoded bytes per stored byte",
                         _edit_index(_zstd_ratio)),
    "zstd_no_content_size": (CORRUPT, "a zstd frame that does not declare its content size",
                             lambda ck: ck.replace_stored(_zstd(_decoded(ck), content_size=False))),
    "zstd_wrong_content_size": (CORRUPT, "a zstd frame declaring more bytes than the chunk's raw",
                                lambda ck: ck.replace_stored(_zstd(_decoded(ck) + b"\0"))),
    "zstd_trailing_bytes": (CORRUPT, "a zstd frame followed by a zero byte",
                            lambda ck: ck.replace_stored(_zstd(_decoded(ck)) + b"\0")),
    "zstd_two_frames": (CORRUPT, "a zstd frame followed by a second (empty) frame",
                        lambda ck: ck.replace_stored(_zstd(_decoded(ck)) + _zstd(b""))),
    "zstd_skippable_after": (CORRUPT, "a zstd frame followed by a skippable frame",
                             lambda ck: ck.replace_stored(_zstd(_decoded(ck)) + _skippable(4))),
    "zstd_skippable_before": (CORRUPT, "a skippable frame before the zstd frame",
                              lambda ck: ck.replace_stored(_skippable(4) + _zstd(_decoded(ck)))),
    # views (section 6)
    "view_negative_stride": (UNSAFE, "a view with a negative stride", _edit_view(lambda v: v.update(stride=[4, -1]))),
    "view_past_storage": (UNSAFE, "a view whose furthest element ends one element past its storage",
                          _edit_view(lambda v: v.update(byte_offset=v["byte_offset"] + 4))),
    "view_misaligned": (UNSAFE, "a float32 view at byte offset 2", _edit_view(lambda v: v.update(byte_offset=2))),
    "view_empty_past_storage": (UNSAFE, "a view of no elements starting past the end of its storage",
                                _edit_view(lambda v: v.update(shape=[0], stride=[1], byte_offset=1 << 20))),
    "view_of_a_view": (UNSAFE, "a view whose base is a view", _edit_index(
        lambda ck, d: d["tensors"].update(extra=dict(ck.view(), base=next(k for k, r in d["tensors"].items() if "base" in r))))),
    # skeleton (section 7)
    "skeleton_unknown_node": (UNSAFE, "a node of type \"mystery\"",
                              _edit_index(lambda ck, d: d["skeleton"].update(x={"__t": "mystery"}))),
    "skeleton_missing_tensor": (UNSAFE, "a reference to a key no rank index holds",
                                _edit_index(lambda ck, d: d["skeleton"].update(x={"__t": "tensor", "key": "nowhere"}))),
    "skeleton_pickle": (UNSAFE, "a pickle node (loading without allow_pickle must refuse it)",
                        _edit_index(lambda ck, d: d["skeleton"].update(x={"__t": "pickle", "value": "gARLAS4="}))),
    "skeleton_too_deep": (UNSAFE, "a skeleton nested one container deeper than MAX_DEPTH", _edit_index(_deep_skeleton)),
    "skeleton_ndarray_shape": (UNSAFE, "an ndarray node whose shape does not hold its record's elements",
                               _edit_index(lambda ck, d: d["skeleton"]["np"].update(shape=[4, 2]))),
    "skeleton_dtensor_hole": (UNSAFE, "a DTensor whose only shard covers half of its global shape",
                              _edit_index(_dtensor_with_a_hole)),
    "latest_crlf": (CORRUPT, "`latest` ends in \\r\\n (load with no tag)", None),
}


def invalid_cases(root: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        save(small_state(), base, SMALL_CONFIG)
        ck = Forge(base)
        codecs = {c["codec"] for r in ck.index["tensors"].values() for c in r.get("chunks", [])}
        assert codecs == {"raw", "zstd", "shuffle"}, codecs
        base_v2 = os.path.join(tmp, "base_v2")
        shutil.copytree(base, base_v2)
        as_v2(os.path.join(base_v2, TAG))
        for name, (error, description, forge) in INVALID.items():
            save_dir = os.path.join(root, "invalid", name)
            tag = TAG
            if description.startswith("format v2: "):
                shutil.copytree(base_v2, save_dir)
                forge(Forge(save_dir))
            elif name == "seal_v2_on_v1":
                shutil.copytree(V1_FIXTURE, os.path.join(save_dir, TAG))
                path = os.path.join(save_dir, TAG, fmt.MANIFEST)
                write_doc(path, read_doc(path))
            else:
                shutil.copytree(base, save_dir)
                if name == "latest_crlf":
                    tag = None
                    with open(os.path.join(save_dir, fmt.LATEST), "wb") as f:
                        f.write(TAG.encode() + b"\r\n")
                else:
                    forge(Forge(save_dir))
            write_case(save_dir, {"description": description, "tag": tag, "error": error})


# ------------------------------------------------------------------------------------------------- main
def generate(root: str) -> None:
    torch.manual_seed(0)
    valid_cases(root)
    invalid_cases(root)
    with open(os.path.join(root, "generator.json"), "w") as f:
        json.dump({"zstd": ".".join(map(str, zstandard.ZSTD_VERSION)), "format_version": fmt.FORMAT_VERSION,
                   "dtypes": list(fmt.DTYPES)}, f)
        f.write("\n")


def tree(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def differences(a: str, b: str) -> list[str]:
    """Files that differ between the two corpora (or exist in one only); README.md is not generated."""
    fa, fb = set(tree(a)) - {"README.md"}, set(tree(b)) - {"README.md"}
    diff = sorted(fa ^ fb)
    diff += [n for n in sorted(fa & fb) if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)]
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="the corpus directory (default: tests/conformance)")
    parser.add_argument("--check", action="store_true", help="regenerate and compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = os.path.join(tmp, "corpus")
        os.makedirs(fresh)
        generate(fresh)
        if args.check:
            diff = differences(args.out, fresh)
            for name in diff:
                print(f"differs: {name}")
            return 1 if diff else 0
        for entry in ("valid", "invalid", "generator.json"):
            target = os.path.join(args.out, entry)
            if os.path.isdir(target):
                shutil.rmtree(target)
        shutil.copytree(fresh, args.out, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
