"""The on-disk contract (format v3; v1 and v2 are still read): names, dtypes, device strings, sealed JSON
documents, the manifest and rank index every writer builds (:func:`manifest_doc`, :func:`rank_index_doc`), and
validation of untrusted manifests and rank indices. See docs/FORMAT.md.

Everything read from disk goes through :func:`parse_rank_index` / :func:`parse_manifest`, which check names,
dtypes, shapes and offsets *before* anything is allocated or any file is opened.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import xxhash

from . import __version__  # defined by the package before it imports any module
from .errors import CorruptCheckpointError, InvalidTagError, UnsafeCheckpointError, UnsupportedStateError

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 3  # what writers write
READABLE_VERSIONS = (1, 2, 3)  # what readers read: every version asyncckpt ever wrote
MANIFEST = "manifest.json"
RANK_TABLE = "ranks.tbl"  # format v3: one fixed-width row per rank (owners.py)
OWNER_KEYS = "owners.json"  # format v3: which ranks hold each key
OWNER_ROWS = "owners.tbl"  # format v3: the rows owners.json points into
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
MAX_JSON_BYTES = 1 << 30  # a manifest or rank index larger than this is refused before it is read
MAX_LATEST_BYTES = 4096  # a `latest` file larger than this is refused before it is read
MIN_CHUNK_BYTES = 4096  # the writer cuts tensors into chunks of at least this many bytes (all but the last)
MAX_CHUNK_RAW = 1 << 31  # no chunk decodes to more than 2 GiB
MAX_NDIM = 64
MAX_WORLD_SIZE = 1 << 24
CODECS = ("raw", "zstd", "shuffle")
# zstd cannot expand more than this: its densest block (RLE) is 4 bytes for at most 128 KiB. With the chunks of
# a file not overlapping, what a reader allocates is bounded by the bytes actually on disk.
MAX_ZSTD_RATIO = 32768

# tags and file names are checked with fullmatch: with match, "$" also matches before a final newline
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-+=@]{0,199}")
_INDEX_RE = re.compile(r"^rank(\d{5,})\.json$", re.ASCII)
_DATA_RE = re.compile(r"^rank(\d{5,})-(\d+)\.bin$", re.ASCII)
# a device type (lower-case ASCII letters, digits, "_"), optionally ":" and an index without leading zeros
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}(?::(?:0|[1-9][0-9]{0,3}))?", re.ASCII)
_HEX16_RE = re.compile(r"[0-9a-f]{16}", re.ASCII)


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


def check_device(device: Any, where: str) -> str:
    """A saved device string: a device type of lower-case ASCII letters, digits and ``_`` (``cpu``, ``cuda``,
    ``mps``, ``xpu``, ``hpu``, ``xla``, a renamed private backend...), optionally ``:`` and an index in
    0..9999 without leading zeros. ``meta`` (no data) is never saved."""
    _need(isinstance(device, str) and bool(_DEVICE_RE.fullmatch(device)) and device.split(":")[0] != "meta", where,
          lambda: f"device {device!r:.80} is not a device string (type[:index], e.g. cpu or cuda:0)")
    return device


def is_checkpoint_file_name(name: str) -> bool:
    """A name asyncckpt reads inside a tag directory: the manifest, a rank index or a data file."""
    return name in _TABLES or name == MANIFEST or bool(_INDEX_RE.fullmatch(name)) or bool(_DATA_RE.fullmatch(name))


_TABLES = (RANK_TABLE, OWNER_KEYS, OWNER_ROWS)


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


# Format v2 seal: the file starts with the fixed 31 bytes {"checksum":"<16 lower-case hex>", and the checksum is
# the xxh3-64 of every byte after them. Any JSON parser reads the file; nothing depends on how it was formatted.
_SEAL_OPEN = b'{"checksum":"'
_SEAL_RE = re.compile(rb'\{"checksum":"([0-9a-f]{16})",')
SEAL_PREFIX_BYTES = 31
# a \u escape of a UTF-16 surrogate somewhere in the text (only then are the parsed strings checked for lone ones)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def seal(doc: dict) -> bytes:
    """The sealed bytes of a JSON document (format v2, docs/FORMAT.md section 2): ``{"checksum":"<hex>",``, then
    the document's other members, each top-level member on its own line and the entries of a top-level object
    or list one per line (so that large indices stay readable and the C JSON encoder does the work), then
    ``}`` and a newline. The checksum is the xxh3-64 of everything after the 31-byte prefix. Strings are written
    as UTF-8; a string that is not valid Unicode (an unpaired surrogate) is refused, as no JSON parser outside
    Python would read it back."""
    members = [(k, v) for k, v in doc.items() if k != "checksum"]
    if not members:
        raise ValueError("a sealed document needs a member besides its checksum")
    text = ",".join(f"\n {_key(k)}: {_layout(v)}" for k, v in members) + "\n}\n"
    try:
        rest = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = exc.object[max(0, exc.start - 60): exc.start + 20]
        raise UnsupportedStateError(
            f"cannot save a string holding an unpaired surrogate ({shown!r}): format v{FORMAT_VERSION} documents "
            "are UTF-8, and no JSON reader outside Python accepts it; store such a value as bytes") from None
    return _SEAL_OPEN + checksum(rest).encode() + b'",' + rest


def _key(k: Any) -> str:
    if type(k) is not str:
        raise TypeError(f"object keys must be strings, not {type(k).__name__}")
    return _compact(k)


def _compact(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _layout(v: Any) -> str:
    if isinstance(v, dict) and v:
        return "{" + ",".join(f"\n  {_key(k)}: {_compact(x)}" for k, x in v.items()) + "\n }"
    if isinstance(v, list) and v:
        return "[" + ",".join(f"\n  {_compact(x)}" for x in v) + "\n ]"
    return _compact(v)


def unseal(data: bytes, where: str) -> dict:
    """The document a sealed file holds, without its ``checksum``, after checking the seal: the v2 seal when
    the file starts with ``{"checksum":"``, else the v1 seal. A document's seal must be its version's."""
    if len(data) > MAX_JSON_BYTES:
        raise UnsafeCheckpointError(f"{where}: {len(data)} bytes is over the {MAX_JSON_BYTES}-byte limit for metadata")
    if data.startswith(_SEAL_OPEN):
        return _unseal_v2(data, where)
    doc = _unseal_v1(data, where)
    if doc.get("format_version") != 1:
        raise UnsafeCheckpointError(f"{where}: a format v1 seal on a document of format_version "
                                    f"{doc.get('format_version')!r:.40}")
    return doc


def _unseal_v2(data: bytes, where: str) -> dict:
    prefix = _SEAL_RE.match(data)
    try:
        text = data.decode("utf-8")  # strict: no encoded surrogates, no invalid UTF-8
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys(where), parse_constant=_reject_constant(where),
                         parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where}: not valid JSON ({str(exc)[:200]})") from None
    if prefix is None or checksum(memoryview(data)[SEAL_PREFIX_BYTES:]) != prefix.group(1).decode():
        raise CorruptCheckpointError(f"{where}: checksum mismatch (the file was modified or is corrupt)")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(doc):
        raise CorruptCheckpointError(f"{where}: not valid JSON (a string escapes an unpaired UTF-16 surrogate)")
    doc.pop("checksum")  # the first member, so the prefix's (a second one would be a duplicated key)
    if doc.get("format_version") == 1:
        raise UnsafeCheckpointError(f"{where}: a format v2 seal on a document of format_version 1")
    return doc


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of the range of a double")
    return value


def _has_lone_surrogate(doc: Any) -> bool:
    """Whether any string (key or value) of a parsed document holds an unpaired surrogate (a paired escape
    parses to one code point outside the BMP, which UTF-8 encodes)."""
    todo = [doc]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _unseal_v1(data: bytes, where: str) -> dict:
    """Format v1's seal: the checksum covers CPython's canonical serialisation of the document, and the file
    must be exactly ``json.dumps(doc, indent=1)`` and a newline."""
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
        out = dict(pairs)
        if len(out) != len(pairs):  # rare: find the name to report it
            seen = set()
            k = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise UnsafeCheckpointError(f"{where}: duplicated key {k!r:.100}")
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
def _need(cond: bool, where: str, what: str | Callable[[], str]) -> None:
    """Refuse unless ``cond``. ``what`` may be a callable building the message, so that checks on the hot path
    (one per record of an index of many thousands) do not format messages that are never shown."""
    if not cond:
        raise UnsafeCheckpointError(f"{where}: {what() if callable(what) else what}")


_INT_MAX = 1 << 62


def _int(v: Any, where: str, what: str, lo: int = 0, hi: int = _INT_MAX) -> int:
    if type(v) is int and lo <= v <= hi:  # bool is a subclass of int, not int itself
        return v
    raise UnsafeCheckpointError(f"{where}: {what} must be an integer in {lo}..{hi}, got {v!r:.100}")


def _int_list(v: Any, where: str, what: str, lo: int = 0) -> tuple[int, ...]:
    if type(v) is list and len(v) <= MAX_NDIM and all(type(x) is int and lo <= x <= _INT_MAX for x in v):
        return tuple(v)
    _need(isinstance(v, list) and len(v) <= MAX_NDIM, where, f"{what} must be a list of at most {MAX_NDIM} integers")
    return tuple(_int(x, where, what, lo=lo) for x in v)


def check_file_name(name: Any, where: str, pattern: re.Pattern = _DATA_RE) -> str:
    """A file named by a manifest must be a plain name of the expected form inside the tag directory."""
    _need(isinstance(name, str) and bool(pattern.fullmatch(name)) and "/" not in name and "\\" not in name,
          where, f"file name {name!r} is not a plain {pattern.pattern} name inside the tag directory")
    return name


def _version(doc: dict, where: str) -> int:
    version = doc.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsafeCheckpointError(
            f"{where}: format_version {version!r:.40} is not supported (this asyncckpt reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade asyncckpt to load it")
    return version


def manifest_doc(*, tag: str, world_size: int, created_unix: float, node_local: bool, save_latest: bool,
                 tables: dict, extra: dict) -> dict:
    """The manifest a publisher writes (docs/FORMAT.md section 3; :func:`parse_manifest` reads it back):
    ``tables`` are the fields describing the rank and owner tables (:func:`owners.write_tables`), ``extra``
    the optional fields (``save_id``, the caller's ``global_steps``)."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": __version__, "tag": tag,
           "world_size": world_size, "created_unix": created_unix, "node_local": node_local,
           "save_latest": bool(save_latest), **extra}
    doc.update(tables)
    return doc


def parse_manifest(data: bytes, where: str) -> dict:
    """Validate a manifest: its seal, version, world size, and every rank entry (each rank once, its index named
    after it, an index checksum and a byte count) before any rank index is opened."""
    doc = unseal(data, where)
    _need(doc.get("format") == FORMAT_NAME, where, f"not an asyncckpt manifest (format={doc.get('format')!r:.40})")
    _version(doc, where)
    world = _int(doc.get("world_size"), where, "world_size", lo=1, hi=MAX_WORLD_SIZE)
    if doc["format_version"] >= 3:
        _check_tables(doc, world, where)
    else:
        _check_rank_entries(doc, world, where)
    tag = doc.get("tag")
    try:
        _need(validate_tag(tag) == tag, where, "tag must be a valid tag")
    except InvalidTagError:
        _need(False, where, f"tag {tag!r:.80} is not a valid tag")
    return doc


def _check_rank_entries(doc: dict, world: int, where: str) -> None:
    """Format v1/v2: the manifest lists every rank's entry inline."""
    ranks = doc.get("ranks")
    node_local = doc.get("node_local", False)
    _need(node_local is True or node_local is False, where, "node_local must be true or false")
    if node_local:  # each node's copy lists the ranks of that node
        _need(isinstance(ranks, list) and 1 <= len(ranks) <= world, where, "ranks must list this node's ranks")
    else:
        _need(isinstance(ranks, list) and len(ranks) == world, where, "ranks must list one entry per rank")
    seen = set()
    for i, r in enumerate(ranks):
        _need(isinstance(r, dict), where, f"ranks[{i}] is not an object")
        rank = _int(r.get("rank"), where, f"ranks[{i}].rank", hi=world - 1)
        _need(rank not in seen, where, f"rank {rank} is listed twice")
        seen.add(rank)
        index = check_file_name(r.get("index"), where, _INDEX_RE)
        _need(index == rank_index_name(rank), where, f"ranks[{i}]: rank {rank}'s index must be named "
              f"{rank_index_name(rank)}, not {index}")
        _need(isinstance(r.get("xxh3"), str) and bool(_HEX16_RE.fullmatch(r["xxh3"])), where,
              f"ranks[{i}].xxh3 must be 16 lower-case hex digits")
        _int(r.get("bytes"), where, f"ranks[{i}].bytes")
    if "ranks_present" in doc:
        present = doc["ranks_present"]
        _need(isinstance(present, list) and all(type(r) is int for r in present) and present == sorted(seen), where,
              "ranks_present must list the ranks of `ranks`, sorted")


def _check_tables(doc: dict, world: int, where: str) -> None:
    """Format v3: the manifest describes the rank table and the owner table (docs/FORMAT.md section 15); the
    rank entries are rows of the rank table, read by byte range."""
    node_local = doc.get("node_local", False)
    _need(node_local is True or node_local is False, where, "node_local must be true or false")
    _need("ranks" not in doc and "ranks_present" not in doc, where,
          "a format v3 manifest lists its ranks in the rank table, not inline")
    table, owners = doc.get("rank_table"), doc.get("owners")
    _need(isinstance(table, dict) and isinstance(owners, dict), where, "rank_table and owners must be objects")
    rows = _int(table.get("rows"), where, "rank_table.rows", lo=1, hi=world)
    _need(node_local or rows == world, where, "rank_table.rows must be world_size (one row per rank)")
    _int(owners.get("rows_bytes"), where, "owners.rows_bytes")
    for what, value in (("rank_table.xxh3", table.get("xxh3")), ("owners.xxh3", owners.get("xxh3")),
                        ("owners.rows_xxh3", owners.get("rows_xxh3"))):
        _need(isinstance(value, str) and bool(_HEX16_RE.fullmatch(value)), where, f"{what} must be 16 lower-case hex digits")


def parse_owner_keys(data: bytes, where: str, rows_bytes: int) -> dict[str, dict]:
    """``owners.json`` (format v3): key -> ``{"at", "rows"[, "ndim"]}``, each block of rows inside the
    ``rows_bytes`` of ``owners.tbl`` and the blocks not overlapping."""
    doc = unseal(data, where)
    keys = doc.get("keys")
    _need(isinstance(keys, dict), where, "keys must be an object")
    spans = []
    for key, e in keys.items():
        _need(isinstance(e, dict) and set(e) <= {"at", "rows", "ndim"}, where, lambda: f"entry of {key!r:.80} is malformed")
        ndim = _int(e.get("ndim", 0), where, f"ndim of {key!r:.80}", hi=MAX_NDIM)
        width = 8 * (1 + 2 * ndim) if "ndim" in e else 8
        at, rows = _int(e.get("at"), where, "at"), _int(e.get("rows"), where, "rows", lo=1, hi=MAX_WORLD_SIZE)
        _need(at + rows * width <= rows_bytes, where, lambda: f"rows of {key!r:.80} lie outside the owner table")
        spans.append((at, at + rows * width))
    spans.sort()
    _need(all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), where, "blocks of rows overlap")
    return keys


def rank_index_doc(rank: int, files: dict[str, int], tensors: dict[str, dict], skeleton: Any) -> dict:
    """The index one rank writes (docs/FORMAT.md section 4; :func:`parse_rank_index` reads it back): its data
    files and their sizes, its tensor records (:meth:`TensorRecord.to_json`) and its skeleton."""
    return {"format_version": FORMAT_VERSION, "rank": rank, "files": files, "tensors": tensors, "skeleton": skeleton}


def parse_rank_index(data: bytes, where: str, file_sizes: dict[str, int] | None = None, *,
                     version: int | None = None, rank: int | None = None) -> tuple[dict, dict[str, TensorRecord]]:
    """Validate one rank's index. ``file_sizes`` maps the data files that exist to their sizes; chunk
    offsets are checked against them. ``version`` and ``rank``, when given, are the manifest's format_version
    and the rank its entry names: the index must say the same. Returns the document and its tensor records."""
    doc = unseal(data, where)
    found = _version(doc, where)
    _need(version is None or found == version, where, f"format_version {found} differs from the manifest's {version}")
    own = _int(doc.get("rank"), where, "rank", hi=MAX_WORLD_SIZE - 1)
    _need(rank is None or own == rank, where, f"the index of rank {rank} says it is rank {own}'s")
    files = doc.get("files")
    _need(isinstance(files, dict), where, "files must map data file names to sizes")
    declared = {check_file_name(n, where): _int(s, where, f"size of {n}") for n, s in files.items()}
    for name in declared:  # each rank writes only its own data files, named canonically
        _need(name == data_file_name(own, int(_DATA_RE.fullmatch(name).group(2))), where,
              f"data file {name} is not a file of rank {own} (rank{own:05d}-<k>.bin)")
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
    _need(isinstance(name, str) and name in DTYPES, where, lambda: f"unknown dtype {name!r:.80}")
    dtype = DTYPES[name]
    shape = _int_list(t.get("shape"), where, "shape")
    device = check_device(t.get("device"), where)
    nbytes = math.prod(shape) * dtype.itemsize
    _need(nbytes <= 1 << 50, where, lambda: f"shape {list(shape)} is absurdly large")
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
    _need(fname in files, where, lambda: f"file {fname} is not declared in the rank's file list")
    fsize = files[fname]
    raw_chunks = t.get("chunks")
    _need(isinstance(raw_chunks, list), where, "chunks must be a list")
    _need(len(raw_chunks) <= max_chunks(nbytes), where, lambda: f"{len(raw_chunks)} chunks for {nbytes} bytes: at most "
          f"{max_chunks(nbytes)} (chunks hold at least {MIN_CHUNK_BYTES} bytes, except a tensor's last)")
    chunks, total = [], 0
    for i, c in enumerate(raw_chunks):
        cw = where + " chunk " + str(i)
        _need(isinstance(c, dict), cw, "not an object")
        off = _int(c.get("off"), cw, "off")
        length = _int(c.get("len"), cw, "len", lo=1)  # no empty chunks: a tensor of 0 bytes has none
        raw = _int(c.get("raw"), cw, "raw", lo=1, hi=MAX_CHUNK_RAW)
        _need(off + length <= fsize, cw, lambda: f"bytes {off}..{off + length} lie outside {fname} ({fsize} bytes)")
        codec = c.get("codec")
        _need(codec in CODECS, cw, lambda: f"unknown codec {codec!r:.80}")
        _need(isinstance(c.get("xxh3"), str) and len(c["xxh3"]) == 16, cw, "bad checksum field")
        planes: tuple = ()
        if codec == "raw":
            _need(length == raw, cw, "a raw chunk's stored and decoded lengths differ")
        elif codec == "zstd":
            _need(raw <= MAX_ZSTD_RATIO * length, cw, lambda: f"{length} stored bytes cannot decode to {raw} (zstd's limit)")
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
    _need(total == nbytes, where, lambda: f"chunks decode to {total} bytes but dtype {name} x shape {list(shape)} needs {nbytes}")
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
    """The view's elements lie in the storage: ``byte_offset`` is aligned, and the furthest element,
    ``byte_offset + (1 + sum((shape[i] - 1) * stride[i])) * itemsize``, ends inside it (strides are >= 0, so the
    nearest element is the first; a view of no elements only needs ``byte_offset <= base_nbytes``)."""
    item = rec.dtype.itemsize
    _need(rec.byte_offset % item == 0, where, "view offset is not aligned to its dtype")
    if math.prod(rec.shape) == 0:
        _need(rec.byte_offset <= base_nbytes, where, "view starts outside its storage")
        return
    last = sum((s - 1) * st for s, st in zip(rec.shape, rec.stride))
    _need(rec.byte_offset + (last + 1) * item <= base_nbytes, where, "view reaches outside its storage")
