"""The on-disk contract, format v1: names, dtypes, sealed JSON documents, and validation of untrusted
manifests. See docs/FORMAT.md.

Everything read from disk goes through :func:`parse_rank_index` / :func:`parse_manifest`, which check names,
dtypes, shapes and offsets *before* anything is allocated or any file is opened.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .errors import CorruptCheckpointError, InvalidTagError, UnsafeCheckpointError

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
MAX_JSON_BYTES = 1 << 30  # a manifest or rank index larger than this is refused before it is read
MAX_LATEST_BYTES = 4096  # a `latest` file larger than this is refused before it is read
MIN_CHUNK_BYTES = 4096  # the writer cuts tensors into chunks of at least this many bytes (all but the last)
MAX_CHUNK_RAW = 1 << 31  # no chunk decodes to more than 2 GiB
MAX_NDIM = 64
CODECS = ("raw", "zstd", "shuffle")
# zstd cannot expand more than this: its densest block (RLE) is 4 bytes for at most 128 KiB. With the chunks of
# a file not overlapping, what a reader allocates is bounded by the bytes actually on disk.
MAX_ZSTD_RATIO = 32768

# tags and file names are checked with fullmatch: with match, "$" also matches before a final newline
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-+=@]{0,199}")
_INDEX_RE = re.compile(r"^rank(\d{5,})\.json$", re.ASCII)
_DATA_RE = re.compile(r"^rank(\d{5,})-(\d+)\.bin$", re.ASCII)


def rank_index_name(rank: int) -> str:
    return f"rank{rank:05d}.json"


def data_file_name(rank: int, index: int) -> str:
    return f"rank{rank:05d}-{index}.bin"


def partial_dir_name(tag: str) -> str:
    return f".{tag}{PARTIAL_SUFFIX}"


def validate_tag(tag: Any) -> str:
    """The tag as a string, checked: a plain directory name of 1-200 letters, digits and ``_ . - + = @``, not
    starting with ``.``, ``-``, ``+``, ``=`` or ``@``, not ``latest`` or ``manifest.json``, without ``..``. A
    non-negative int (not a bool) is accepted as its decimal string. Callers must use the returned string."""
    if isinstance(tag, int) and not isinstance(tag, bool) and 0 <= tag < 10 ** 200:
        tag = str(tag)
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag) or tag in (LATEST, MANIFEST) or ".." in tag:
        shown = repr(tag) if len(repr(tag)) <= 80 else repr(tag)[:80] + "..."
        raise InvalidTagError(
            f"invalid checkpoint tag {shown}: use 1-200 characters of letters, digits and _ . - + = @, "
            "not starting with '.' or '-', and not 'latest'"
        )
    return tag


def is_checkpoint_file_name(name: str) -> bool:
    """A name asyncckpt reads inside a tag directory: the manifest, a rank index or a data file."""
    return name == MANIFEST or bool(_INDEX_RE.fullmatch(name)) or bool(_DATA_RE.fullmatch(name))


def max_chunks(nbytes: int) -> int:
    """The most chunks a tensor of ``nbytes`` bytes may be stored in: the writer cuts at ``chunk_bytes`` >=
    MIN_CHUNK_BYTES, so a record with more chunks (or any empty chunk) was not written by asyncckpt, and would
    only make a reader do work out of proportion to the data."""
    return -(-nbytes // MIN_CHUNK_BYTES)


# ----------------------------------------------------------------------------------------------- dtypes
def _dtype_table() -> dict[str, torch.dtype]:
    names = [
        "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    ]
    return {n: getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype)}


DTYPES: dict[str, torch.dtype] = _dtype_table()
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by asyncckpt format v{FORMAT_VERSION}") from None


# ------------------------------------------------------------------------------------------- checksums
def checksum(data) -> str:
    """xxh3-64 of a buffer, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(doc: dict) -> bytes:
    """Serialise a JSON document with a checksum of its own canonical form, so that any flipped byte in a
    manifest is detected (JSON alone would happily parse ``[1024]`` flipped to ``[1025]``)."""
    body = dict(doc)
    body.pop("checksum", None)
    body["checksum"] = checksum(_canonical(body))
    # the file keeps insertion order (a skeleton's dicts come back in the order they were saved); only the
    # canonical form the checksum covers is sorted
    return json.dumps(body, indent=1, allow_nan=False).encode() + b"\n"


def unseal(data: bytes, where: str) -> dict:
    if len(data) > MAX_JSON_BYTES:
        raise UnsafeCheckpointError(f"{where}: {len(data)} bytes is over the {MAX_JSON_BYTES}-byte limit for metadata")
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicate_keys(where), parse_constant=_reject_constant(where))
        # the checksum covers the canonical form, so also require the exact bytes seal() writes: a flipped
        # byte in whitespace, or a cut-off final newline, parses to the same document
        exact = isinstance(doc, dict) and json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n" == data
        stored = doc.pop("checksum", None) if isinstance(doc, dict) else None
        canonical = checksum(_canonical(doc)) if isinstance(stored, str) else None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: the top level is not a JSON object")
    if not isinstance(stored, str):
        raise CorruptCheckpointError(f"{where}: no checksum field")
    if canonical != stored or not exact:
        raise CorruptCheckpointError(f"{where}: checksum mismatch (the file was modified or is corrupt)")
    return doc


def _no_duplicate_keys(where: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise UnsafeCheckpointError(f"{where}: duplicated key {k!r}")
            out[k] = v
        return out

    return hook


def _reject_constant(where: str):
    def hook(name):
        raise CorruptCheckpointError(f"{where}: non-standard JSON constant {name}")

    return hook


# -------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ChunkRecord:
    """One independently decodable piece of a tensor's bytes, as stored in a data file."""

    offset: int  # byte offset in the data file
    length: int  # stored bytes
    raw: int  # decoded bytes
    codec: str  # raw | zstd | shuffle
    xxh3: str  # checksum of the decoded bytes
    planes: tuple[tuple[str, int], ...] = ()  # for shuffle: (codec, stored length) of each byte plane
    sxxh3: str = ""  # compressed chunks: checksum of the stored bytes (some flips in a zstd frame decode unchanged)

    def to_json(self) -> dict:
        d = {"off": self.offset, "len": self.length, "raw": self.raw, "codec": self.codec, "xxh3": self.xxh3}
        if self.planes:
            d["planes"] = [list(p) for p in self.planes]
        if self.sxxh3:
            d["sxxh3"] = self.sxxh3
        return d


@dataclass(frozen=True)
class TensorRecord:
    """Where and how one tensor (or one shard of a sharded tensor, or one shared storage) is stored."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    file: str = ""  # data file; empty for a view
    chunks: tuple[ChunkRecord, ...] = ()
    base: str = ""  # for a view: key of the storage record it views
    byte_offset: int = 0  # for a view: offset in the storage, in bytes
    stride: tuple[int, ...] = ()  # for a view
    global_shape: tuple[int, ...] = ()  # for a shard: the full tensor's shape
    global_offset: tuple[int, ...] = ()  # for a shard: where this shard starts in the full tensor
    packed: bool = False  # a view that is an independent tensor packed into a shared storage for I/O only:
    #                       a reader gives it its own storage (a contiguous copy out of the pack)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_view(self) -> bool:
        return bool(self.base)

    @property
    def is_shard(self) -> bool:
        return bool(self.global_shape)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"dtype": dtype_name(self.dtype), "shape": list(self.shape), "device": self.device}
        if self.base:
            d.update(base=self.base, byte_offset=self.byte_offset, stride=list(self.stride))
            if self.packed:
                d["packed"] = True
        else:
            d.update(file=self.file, chunks=[c.to_json() for c in self.chunks])
        if self.global_shape:
            d.update(global_shape=list(self.global_shape), global_offset=list(self.global_offset))
        return d


# ---------------------------------------------------------------------------------- untrusted parsing
def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise UnsafeCheckpointError(f"{where}: {what}")


def _int(v: Any, where: str, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, where, f"{what} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _int_list(v: Any, where: str, what: str, lo: int = 0) -> tuple[int, ...]:
    _need(isinstance(v, list) and len(v) <= MAX_NDIM, where, f"{what} must be a list of at most {MAX_NDIM} integers")
    return tuple(_int(x, where, what, lo=lo) for x in v)


def check_file_name(name: Any, where: str, pattern: re.Pattern = _DATA_RE) -> str:
    """A file named by a manifest must be a plain name of the expected form inside the tag directory."""
    _need(isinstance(name, str) and bool(pattern.fullmatch(name)) and "/" not in name and "\\" not in name,
          where, f"file name {name!r} is not a plain {pattern.pattern} name inside the tag directory")
    return name


def parse_manifest(data: bytes, where: str) -> dict:
    doc = unseal(data, where)
    _need(doc.get("format") == FORMAT_NAME, where, f"not an asyncckpt manifest (format={doc.get('format')!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsafeCheckpointError(
            f"{where}: format_version {version!r} is not supported (this asyncckpt reads version {FORMAT_VERSION}); "
            "upgrade asyncckpt to load it"
        )
    world = _int(doc.get("world_size"), where, "world_size", lo=1, hi=1 << 24)
    ranks = doc.get("ranks")
    if doc.get("node_local"):  # each node's copy lists the ranks of that node
        _need(isinstance(ranks, list) and 1 <= len(ranks) <= world, where, "ranks must list this node's ranks")
    else:
        _need(isinstance(ranks, list) and len(ranks) == world, where, "ranks must list one entry per rank")
    seen = set()
    for i, r in enumerate(ranks):
        _need(isinstance(r, dict), where, f"ranks[{i}] is not an object")
        rank = _int(r.get("rank"), where, f"ranks[{i}].rank", hi=world - 1)
        _need(rank not in seen, where, f"rank {rank} is listed twice")
        seen.add(rank)
        check_file_name(r.get("index"), where, _INDEX_RE)
        _need(isinstance(r.get("xxh3"), str), where, f"ranks[{i}].xxh3 missing")
    _need(isinstance(doc.get("tag"), str), where, "tag missing")
    return doc


def parse_rank_index(data: bytes, where: str, file_sizes: dict[str, int] | None = None) -> tuple[dict, dict[str, TensorRecord]]:
    """Validate one rank's index. ``file_sizes`` maps the data files that exist to their sizes; chunk
    offsets are checked against them. Returns the document and its tensor records by key."""
    doc = unseal(data, where)
    _need(doc.get("format_version") == FORMAT_VERSION, where, f"format_version {doc.get('format_version')!r} unsupported")
    files = doc.get("files")
    _need(isinstance(files, dict), where, "files must map data file names to sizes")
    declared = {check_file_name(n, where): _int(s, where, f"size of {n}") for n, s in files.items()}
    if file_sizes is not None:
        for name, size in declared.items():
            actual = file_sizes.get(name)
            if actual is None:
                raise CorruptCheckpointError(f"{where}: data file {name} is missing")
            if actual != size:
                raise CorruptCheckpointError(f"{where}: data file {name} has {actual} bytes, expected {size} (truncated or extended)")
    tensors = doc.get("tensors")
    _need(isinstance(tensors, dict), where, "tensors must be an object")
    records: dict[str, TensorRecord] = {}
    for key, t in tensors.items():
        records[key] = _parse_tensor(key, t, f"{where}: tensor {key!r}", declared)
    for key, rec in records.items():  # a view's storage may live in another rank's index (replicated state)
        if rec.is_view and rec.base in records:
            check_view(rec, records[rec.base], f"{where}: tensor {key!r}")
    spans = sorted((rec.file, c.offset, c.offset + c.length, key) for key, rec in records.items() for c in rec.chunks)
    for (file, _, end, key), (file2, start, _, key2) in zip(spans, spans[1:]):  # every stored byte is read once...
        _need(file != file2 or end <= start, where, f"chunks of {key!r} and {key2!r} overlap in {file}")
    covered = dict.fromkeys(declared, 0)
    for file, start, end, _ in spans:
        covered[file] += end - start
    for name, size in declared.items():  # ...and every byte of a data file is in a chunk, so verify() checks it
        _need(covered[name] == size, where, f"{size - covered[name]} bytes of {name} are not covered by any chunk")
    return doc, records


def check_view(rec: TensorRecord, base: TensorRecord | None, where: str) -> None:
    """A view must point at a storage record (uint8, not itself a view) that covers it."""
    _need(base is not None and not base.is_view and base.dtype == torch.uint8 and not base.is_shard, where,
          f"view base {rec.base!r} is not a storage record")
    _check_view_bounds(rec, base.nbytes, where)


def _parse_tensor(key: str, t: Any, where: str, files: dict[str, int]) -> TensorRecord:
    _need(isinstance(t, dict), where, "entry is not an object")
    name = t.get("dtype")
    _need(isinstance(name, str) and name in DTYPES, where, f"unknown dtype {name!r}")
    dtype = DTYPES[name]
    shape = _int_list(t.get("shape"), where, "shape")
    device = t.get("device")
    _need(isinstance(device, str) and len(device) < 64, where, "device must be a short string")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        _need(False, where, f"device {device!r} is not a device")
    nbytes = math.prod(shape) * dtype.itemsize
    _need(nbytes <= 1 << 50, where, f"shape {list(shape)} is absurdly large")
    gshape, goff = (), ()
    if "global_shape" in t:
        gshape = _int_list(t.get("global_shape"), where, "global_shape")
        goff = _int_list(t.get("global_offset"), where, "global_offset")
        _need(len(gshape) == len(shape) == len(goff), where, "shard rank mismatch")
        _need(all(o + s <= g for o, s, g in zip(goff, shape, gshape)), where, "shard lies outside the global shape")
    if "base" in t:
        _need(isinstance(t["base"], str), where, "base must be a key")
        stride = _int_list(t.get("stride"), where, "stride")
        _need(len(stride) == len(shape), where, "stride and shape differ in length")
        packed = t.get("packed", False)
        _need(packed is True or packed is False, where, "packed must be true or false")
        _need(not packed or (stride == contiguous_stride(shape) and not gshape), where,
              "a packed tensor must be contiguous and not a shard")
        return TensorRecord(key, dtype, shape, device, base=t["base"], stride=stride,
                            byte_offset=_int(t.get("byte_offset"), where, "byte_offset"),
                            global_shape=gshape, global_offset=goff, packed=packed)
    fname = check_file_name(t.get("file"), where)
    _need(fname in files, where, f"file {fname} is not declared in the rank's file list")
    fsize = files[fname]
    raw_chunks = t.get("chunks")
    _need(isinstance(raw_chunks, list), where, "chunks must be a list")
    _need(len(raw_chunks) <= max_chunks(nbytes), where, f"{len(raw_chunks)} chunks for {nbytes} bytes: at most "
          f"{max_chunks(nbytes)} (chunks hold at least {MIN_CHUNK_BYTES} bytes, except a tensor's last)")
    chunks, total = [], 0
    for i, c in enumerate(raw_chunks):
        cw = f"{where} chunk {i}"
        _need(isinstance(c, dict), cw, "not an object")
        off = _int(c.get("off"), cw, "off")
        length = _int(c.get("len"), cw, "len", lo=1)  # no empty chunks: a tensor of 0 bytes has none
        raw = _int(c.get("raw"), cw, "raw", lo=1, hi=MAX_CHUNK_RAW)
        _need(off + length <= fsize, cw, f"bytes {off}..{off + length} lie outside {fname} ({fsize} bytes)")
        codec = c.get("codec")
        _need(codec in CODECS, cw, f"unknown codec {codec!r}")
        _need(isinstance(c.get("xxh3"), str) and len(c["xxh3"]) == 16, cw, "bad checksum field")
        planes: tuple = ()
        if codec == "raw":
            _need(length == raw, cw, "a raw chunk's stored and decoded lengths differ")
        elif codec == "zstd":
            _need(raw <= MAX_ZSTD_RATIO * length, cw, f"{length} stored bytes cannot decode to {raw} (zstd's limit)")
        elif codec == "shuffle":
            p = c.get("planes")
            _need(isinstance(p, list) and 2 <= len(p) <= 16 and raw % len(p) == 0, cw, "bad byte planes")
            planes = tuple((_plane_codec(x, cw), _int(x[1], cw, "plane length")) for x in p)
            _need(sum(n for _, n in planes) == length, cw, "plane lengths do not add up to the chunk length")
            _need(all(n == raw // len(p) for c_, n in planes if c_ == "raw"), cw, "raw plane of the wrong length")
            _need(all(raw // len(p) <= MAX_ZSTD_RATIO * n for c_, n in planes if c_ == "zstd"), cw,
                  "a zstd plane cannot decode to that many bytes (zstd's limit)")
        sxxh3 = c.get("sxxh3", "")
        _need(isinstance(sxxh3, str) and len(sxxh3) in (0, 16), cw, "bad stored-bytes checksum field")
        chunks.append(ChunkRecord(off, length, raw, codec, c["xxh3"], planes, sxxh3))
        total += raw
    _need(total == nbytes, where, f"chunks decode to {total} bytes but dtype {name} x shape {list(shape)} needs {nbytes}")
    return TensorRecord(key, dtype, shape, device, file=fname, chunks=tuple(chunks), global_shape=gshape, global_offset=goff)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) of a contiguous tensor of ``shape``."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _plane_codec(x: Any, where: str) -> str:
    _need(isinstance(x, list) and len(x) == 2 and x[0] in ("raw", "zstd"), where, f"bad plane {x!r}")
    return x[0]


def _check_view_bounds(rec: TensorRecord, base_nbytes: int, where: str) -> None:
    item = rec.dtype.itemsize
    _need(rec.byte_offset % item == 0, where, "view offset is not aligned to its dtype")
    if math.prod(rec.shape) == 0:
        return
    last = sum((s - 1) * st for s, st in zip(rec.shape, rec.stride))
    _need(rec.byte_offset + (last + 1) * item <= base_nbytes, where, "view reaches outside its storage")
