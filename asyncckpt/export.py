"""Export a published checkpoint as one ``torch.save`` file or as Hugging Face-style safetensors files, and
import such files as a published asyncckpt checkpoint.

Export consolidates: a DTensor (FSDP2) comes out as the full tensor, stitched from the shards of every rank
that overlap it (:meth:`CheckpointReader.read_region`); replicated (DDP) state from whichever rank wrote it;
rank-local state (anything else) as rank ``rank`` (default 0) saved it. It streams: tensors are read, cast
and written one at a time, in the order the state holds them (tensors stored in one shared storage are read
together, the storage once), so the memory it needs is about two tensors (or a shared storage), never the
checkpoint:

- safetensors: written straight into the output files, whose headers are known before any data is read;
- torch: ``torch.save`` needs the whole tree at once, so each tensor is first written to a scratch file next
  to the output (unlinked at once), and the tree handed to ``torch.save`` holds tensors mapped from it: their
  pages are file cache the kernel can drop, not process memory.

Conventions (documented in the README):

- safetensors keys are key paths (``module/fc.weight``; without the ``module/`` prefix with ``model_only``);
  only tensors are written (numpy arrays count as tensors), every other value is counted and left out.
- A tensor referenced at several places (tied weights) is written once, under its first key path; the other
  key paths are recorded in the ``__metadata__`` of the file that holds it, ``{"<other path>": "<written
  key>"}``, as ``safetensors.torch.save_model`` does. Views of one storage that are not identical become
  separate contiguous tensors. In a torch export tied tensors stay one tensor; views become separate tensors.
- ``dtype`` casts floating-point tensors only (never integers, booleans or complex numbers).
- torch: the file loads with ``torch.load(weights_only=True)``: numpy arrays and numpy scalars become
  tensors of the same dtype and shape (bit-exact), and pickled objects (saved with ``allow_pickle``) are
  replaced by None and listed in :attr:`ExportResult.dropped`.

Import reads a ``torch.save`` file (``torch.load(weights_only=True)``), a safetensors file, or a sharded HF
directory / ``model.safetensors.index.json``, and saves it with :func:`asyncckpt.save`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .api import save
from .config import Config
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError,
                     StateMismatchError, UnsafeCheckpointError, UnsupportedStateError)
from .format import partial_dir_name
from .loader import CheckpointReader, split_path
from .state import METADATA_PART, TAG, escape, join, key_part, skeleton_tensor_refs, unflatten

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_ALIGN = 64  # byte alignment of each tensor in the torch export's scratch file

# dtypes safetensors can hold (and safetensors.torch loads), by their names in a safetensors header
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    dtype: name for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8),
        ("U64", getattr(torch, "uint64", None)), ("U32", getattr(torch, "uint32", None)),
        ("U16", getattr(torch, "uint16", None)), ("U8", torch.uint8), ("BOOL", torch.bool),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("F8_E4M3FNUZ", getattr(torch, "float8_e4m3fnuz", None)),
        ("F8_E5M2FNUZ", getattr(torch, "float8_e5m2fnuz", None)), ("C64", torch.complex64),
    ) if isinstance(dtype, torch.dtype)
}

CAST_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(value: int | str, what: str = "max_shard_size") -> int:
    """A byte count: an int, or text such as ``"5GB"`` (10**9, as Hugging Face counts), ``"500MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value), re.IGNORECASE)
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"{what}: {value!r} is not a size (an integer, or a number with B, KB, MB, GB, TB, "
                              "KiB, MiB, GiB or TiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 1:
        raise ConfigError(f"{what}: {value!r} must be at least 1 byte")
    return n


def cast_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The floating dtype ``name`` names (``bf16``, ``fp16``, ``fp32``, ``fp64`` and their torch names)."""
    if name is None or isinstance(name, torch.dtype) and name.is_floating_point and name in CAST_DTYPES.values():
        return name
    dtype = CAST_DTYPES.get(str(name).lower().removeprefix("torch."))
    if dtype is None:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(CAST_DTYPES)}")
    return dtype


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    source: str  # the tag directory exported
    files: list[str]  # every file written (for sharded safetensors the shards, then the index)
    tensors: int  # tensors written
    nbytes: int  # bytes of tensor data written
    rank: int  # rank-local state (not sharded, not replicated) is the state this rank saved
    world_size: int
    aliases: dict[str, str] = field(default_factory=dict)  # key path -> key written (tied: written once)
    dropped: list[str] = field(default_factory=list)  # torch: key paths of pickled objects, now None
    non_tensors: int = 0  # safetensors: values that are not tensors (pickled objects too), left out


@dataclass
class _Tensor:
    """One tensor of the export, before its data is read."""

    name: str  # the key path of its first reference: the safetensors key
    key: str  # the key its data is read under (a record key, or a synthetic one for numpy scalars)
    kind: str  # "tensor" | "ndarray" | "dtensor" | "scalar"
    dtype: torch.dtype  # as saved
    shape: tuple[int, ...]  # in the exported tree
    base: str | None = None  # a view: the storage record it views
    value: torch.Tensor | None = None  # a numpy scalar, as a 0-d tensor

    def out_dtype(self, cast: torch.dtype | None) -> torch.dtype:
        return cast if cast is not None and self.dtype.is_floating_point else self.dtype

    def out_nbytes(self, cast: torch.dtype | None) -> int:
        return math.prod(self.shape) * self.out_dtype(cast).itemsize


class _Tree:
    """The exported part of a skeleton: its tensors in the order they are met, the key paths that reference a tensor
    already met (tied), what cannot be exported, and (for torch) a skeleton whose every tensor-like node is a
    plain tensor node. Key paths are built as :mod:`asyncckpt.state` builds them."""

    def __init__(self, reader: CheckpointReader, rank: int, model_only: bool):
        self.reader, self.rank = reader, rank
        skeleton = reader.skeleton(rank)
        if model_only:
            if not (isinstance(skeleton, dict) and TAG not in skeleton and "module" in skeleton):
                raise StateMismatchError(f"{reader.path}: model_only exports the 'module' entry of an "
                                         "AsyncCheckpointer checkpoint, and this checkpoint has none")
            skeleton = skeleton["module"]
        self.tensors: dict[str, _Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.dropped: list[str] = []
        self.non_tensors = 0
        self.skeleton = self._visit(skeleton, "")

    def _visit(self, node: Any, path: str) -> Any:
        if isinstance(node, list):
            return [self._visit(v, join(path, str(i))) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            self.non_tensors += 1
            return node
        kind = node.get(TAG)
        if kind is None:
            return {k: self._visit(v, join(path, escape(k))) for k, v in node.items()}
        if kind in ("tensor", "ndarray", "dtensor"):
            return {TAG: "tensor", "key": self._tensor(node, kind, path)}
        if kind in ("dict", "odict"):
            items = []
            for i, (k, v) in enumerate(node["items"]):
                before = len(self.dropped)
                kobj = self._visit(k, join(path, f"~K{i}")) if isinstance(k, (dict, list)) else k
                if len(self.dropped) > before:  # a key holding a pickled object: the whole entry goes
                    self.dropped[before:] = [join(path, f"~K{i}")]
                    continue
                items.append([kobj, self._visit(v, join(path, _key_part(k, i)))])
            out = {TAG: kind, "items": items}
            if "metadata" in node:  # an OrderedDict's _metadata (module versions): bookkeeping, not counted
                counted = self.non_tensors
                out["metadata"] = self._visit(node["metadata"], join(path, METADATA_PART))
                self.non_tensors = counted
            return out
        if kind == "tuple":
            return {TAG: "tuple", "items": [self._visit(v, join(path, str(i))) for i, v in enumerate(node["items"])]}
        if kind == "pickle":
            self.non_tensors += 1
            self.dropped.append(path or "<root>")
            return None
        if kind == "npscalar":
            self.non_tensors += 1
            value = torch.from_numpy(np.array(unflatten(node, {}, where=self.reader.path)))
            key = f"~x/{path}"
            while key in self.reader.records or key in self.tensors:
                key = "~" + key
            self.tensors[key] = _Tensor(path, key, "scalar", value.dtype, (), value=value)
            return {TAG: "tensor", "key": key}
        self.non_tensors += 1
        return node  # float, dtype, device, size, bytes: values torch.load(weights_only=True) accepts

    def _tensor(self, node: dict, kind: str, path: str) -> str:
        key = node["key"]
        seen = self.tensors.get(key)
        if seen is not None:
            self.aliases[path] = seen.name
            return key
        if kind == "dtensor":
            shape = tuple(node["global_shape"])
            entry = _Tensor(path, key, kind, self.reader.records[key][0][1].dtype, shape)
        else:
            rec = self.reader.record_for(key, self.rank)
            shape = tuple(node["shape"]) if kind == "ndarray" else rec.shape
            if math.prod(shape) != math.prod(rec.shape):
                raise UnsafeCheckpointError(f"{self.reader.path}: array {path!r} has shape {list(shape)}, but its "
                                            f"record {key!r} holds {list(rec.shape)}")
            entry = _Tensor(path, key, kind, rec.dtype, shape, base=rec.base if rec.is_view else None)
        self.tensors[key] = entry
        return key

    def stream(self, entries: list[_Tensor], cast: torch.dtype | None) -> Iterator[tuple[_Tensor, torch.Tensor]]:
        """Each entry with its data (cast), in order, read when its turn comes. Tensors stored in one storage
        (views, small tensors packed together) are read together when the first of them is due, the storage
        once, and each is released when handed out."""
        groups: dict[str, list[str]] = {}
        for e in entries:
            if e.base is not None:
                groups.setdefault(e.base, []).append(e.key)
        pending: dict[str, torch.Tensor] = {}
        for e in entries:
            if e.kind == "scalar":
                t = e.value
            elif e.kind == "dtensor":
                t = self.reader.read_region(e.key, e.shape, (0,) * len(e.shape))
            elif e.base is not None:
                if e.key not in pending:  # the first of its storage: every entry of the storage is still due
                    pending.update(self.reader.read_tensors(groups[e.base], rank=self.rank, map_location="cpu"))
                t = pending.pop(e.key)
            else:
                t = self.reader.read_tensors([e.key], rank=self.rank, map_location="cpu")[e.key]
            if tuple(t.shape) != e.shape:
                t = t.reshape(e.shape)
            yield e, t.to(e.out_dtype(cast))


def _key_part(k: Any, index: int) -> str:
    """The key-path part of a dict entry whose key is the skeleton node ``k`` (as unflatten names it)."""
    if isinstance(k, dict) and k.get(TAG) == "float" and k.get("value") in ("inf", "-inf"):
        return key_part(float(k["value"]), index)
    if isinstance(k, (dict, list)):
        return f"~k{index}"
    return key_part(k, index)


# ------------------------------------------------------------------------------------------------- export
def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, to: str = "safetensors", tag: str | None = None,
           model_only: bool = False, dtype: str | torch.dtype | None = None,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, rank: int = 0, overwrite: bool = False,
           progress: bool = False) -> ExportResult:
    """Write the checkpoint ``checkpoint`` (``DIR``: the tag ``latest`` names, or ``tag``; or ``DIR/TAG``) as
    consolidated full tensors, one tensor at a time.

    ``to="torch"``: ``out`` is one ``torch.save`` file of the whole state (``model_only``: the ``module``
    entry of an AsyncCheckpointer checkpoint, the model's state dict), loadable with
    ``torch.load(weights_only=True)``. ``to="safetensors"``: ``out`` is a directory that receives
    ``model.safetensors``, or, when the tensors exceed ``max_shard_size`` (default 5GB), shards
    ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``; tensors only.

    ``dtype`` (``bf16``, ``fp16``, ``fp32``, ``fp64``) casts floating tensors. ``rank``: whose rank-local
    state is exported. An existing output is refused unless ``overwrite``. ``progress``: a tqdm bar on stderr."""
    if to not in ("safetensors", "torch"):
        raise ConfigError(f"to: {to!r} is not 'safetensors' or 'torch'")
    cast = cast_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    save_dir, named = split_path(os.fspath(checkpoint))
    if tag is not None and named is not None and str(tag) != named:
        raise ConfigError(f"tag: {tag!r} given, but {os.fspath(checkpoint)} is the checkpoint {named!r}")
    with CheckpointReader(save_dir, tag if tag is not None else named) as reader:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < reader.world_size:
            raise ConfigError(f"rank: {rank!r} is not a rank of {reader.path} (world size {reader.world_size})")
        reader.check_structure()
        tree = _Tree(reader, rank, model_only)
        out = os.path.abspath(os.fspath(out))
        result = ExportResult(reader.path, [], 0, 0, rank, reader.world_size, dict(tree.aliases))
        if to == "torch":
            _export_torch(tree, out, cast, overwrite, progress, result)
        else:
            _export_safetensors(tree, out, cast, shard_bytes, overwrite, progress, result)
    return result


def _export_safetensors(tree: _Tree, out_dir: str, cast: torch.dtype | None, shard_bytes: int, overwrite: bool,
                        progress: bool, result: ExportResult) -> None:
    entries = [e for e in tree.tensors.values() if e.kind != "scalar"]
    for e in entries:
        if e.out_dtype(cast) not in SAFETENSORS_DTYPES:
            raise UnsupportedStateError(f"{tree.reader.path}: tensor {e.name!r} has dtype {e.out_dtype(cast)}, "
                                        "which safetensors cannot hold; export it with to='torch'")
        if e.name == "__metadata__":
            raise UnsupportedStateError(f"{tree.reader.path}: tensor {e.name!r}: a safetensors file reserves this "
                                        "key for its metadata; export with to='torch'")
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for e in entries:  # as Hugging Face shards: a new file when the next tensor would not fit (a big one alone)
        n = e.out_nbytes(cast)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: a safetensors export goes into a directory, and this is a file")
    os.makedirs(out_dir, exist_ok=True)
    stale = _safetensors_outputs(out_dir)
    if stale and not overwrite:
        raise ConfigError(f"{out_dir} already holds an export ({', '.join(stale)}); pass overwrite=True "
                          "(--overwrite) to replace it")
    kept_in = {e.name: names[i] for i, shard in enumerate(shards) for e in shard}
    result.non_tensors = tree.non_tensors
    written: list[tuple[str, str]] = []
    with _bar(progress, sum(e.out_nbytes(cast) for e in entries), "export") as bar, _cleanup(written):
        stream = tree.stream(entries, cast)
        for name, shard in zip(names, shards):
            aliases = {a: k for a, k in result.aliases.items() if kept_in.get(k) == name}
            tmp = _temp_path(out_dir, name)
            written.append((tmp, name))
            _write_safetensors(tmp, shard, cast, {**aliases, "format": "pt"}, stream, bar, result)
        if len(shards) > 1:
            index = {"metadata": {"total_size": result.nbytes}, "weight_map": {e.name: kept_in[e.name] for e in entries}}
            tmp = _temp_path(out_dir, INDEX_FILE)
            written.append((tmp, INDEX_FILE))
            _write_bytes(tmp, json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
        for name in stale:
            os.unlink(os.path.join(out_dir, name))
        for tmp, name in written:
            os.replace(tmp, os.path.join(out_dir, name))
        written.clear()
        _fsync_dir(out_dir)
    result.files = [os.path.join(out_dir, n) for n in names + ([INDEX_FILE] if len(shards) > 1 else [])]


def _safetensors_outputs(out_dir: str) -> list[str]:
    """The files of an earlier export in ``out_dir``."""
    return sorted(n for n in os.listdir(out_dir) if n in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(n))


def _write_safetensors(path: str, shard: list[_Tensor], cast: torch.dtype | None, metadata: dict[str, str],
                       stream: Iterator[tuple[_Tensor, torch.Tensor]], bar: Any, result: ExportResult) -> None:
    """One safetensors file: an 8-byte little-endian header length, the JSON header (padded with spaces to
    a multiple of 8), then the tensors' bytes back to back in the header's order."""
    header: dict[str, Any] = {}
    offset = 0
    for e in shard:
        n = e.out_nbytes(cast)
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[e.out_dtype(cast)], "shape": list(e.shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for expected in shard:
            e, t = next(stream)
            assert e is expected  # the stream yields the entries in the order the shards hold them
            f.write(_bytes_of(t))
            result.tensors += 1
            result.nbytes += t.numel() * t.element_size()
            bar.update(t.numel() * t.element_size())
        f.flush()
        os.fsync(f.fileno())


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order, little-endian as stored in memory (a copy only for a view)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _export_torch(tree: _Tree, out: str, cast: torch.dtype | None, overwrite: bool, progress: bool,
                  result: ExportResult) -> None:
    if os.path.isdir(out):
        raise ConfigError(f"{out}: a torch export is one file, and this is a directory")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir = os.path.dirname(out)
    os.makedirs(out_dir, exist_ok=True)
    entries = list(tree.tensors.values())
    with tempfile.TemporaryFile(dir=out_dir, prefix=".asyncckpt-export-") as scratch, \
            _bar(progress, sum(e.out_nbytes(cast) for e in entries), "export") as bar:
        places: dict[str, tuple[int, int, torch.dtype]] = {}
        pos = 0
        for e, t in tree.stream(entries, cast):
            pos += -pos % _ALIGN
            data = _bytes_of(t)
            _pwrite_all(scratch.fileno(), data, pos)
            places[e.key] = (pos, len(data), t.dtype)
            pos += len(data)
            result.nbytes += len(data)
            bar.update(len(data))
        mapped = np.memmap(scratch, dtype=np.uint8, mode="c", shape=(pos,)) if pos else None
        tensors = {}
        for e in entries:
            start, n, dt = places[e.key]
            tensors[e.key] = (torch.from_numpy(mapped[start:start + n]).view(dt).reshape(e.shape) if n
                              else torch.empty(e.shape, dtype=dt))
        state = unflatten(tree.skeleton, tensors, where=tree.reader.path)
        del tensors, mapped
        bar.set_description(f"writing {os.path.basename(out)}")
        tmp = _temp_path(out_dir, os.path.basename(out))
        with _cleanup([(tmp, out)]):
            torch.save(state, tmp)
            del state
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        _fsync_dir(out_dir)
    result.files = [out]
    result.tensors = len(entries)
    result.dropped = list(tree.dropped)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _temp_path(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _cleanup(temps: list[tuple[str, str]]):
    """Remove the temporary files listed in ``temps`` (pairs: temporary path, final name) if the block fails."""
    try:
        yield
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


@contextlib.contextmanager
def _bar(enabled: bool, total: int | None, desc: str):
    """A tqdm byte counter on stderr when ``enabled`` and tqdm is installed, else a bar that shows nothing."""
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _NoBar()
        return
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------- import
@dataclass
class ImportResult:
    """What :func:`import_checkpoint` read and published."""

    path: str  # the published tag directory
    tag: str
    sources: list[str]  # the files read
    kind: str  # "torch" | "safetensors"
    tensors: int  # tensors in the published state (a tied tensor once)
    nbytes: int  # their bytes


def import_checkpoint(source: str | os.PathLike, save_dir: str | os.PathLike, tag: str, *, as_module: bool = False,
                      save_latest: bool = True, config: Config | Mapping | str | os.PathLike | None = None,
                      progress: bool = False) -> ImportResult:
    """Publish the state held by ``source`` as checkpoint ``tag`` of ``save_dir`` with :func:`asyncckpt.save`,
    and return once it is published. ``source``: a ``torch.save`` file (read with ``weights_only=True``), a
    safetensors file, a Hugging Face ``model.safetensors.index.json`` with its shards, or a directory holding
    ``model.safetensors.index.json`` or ``model.safetensors``. Names a safetensors ``__metadata__`` maps to a
    tensor of the file (``{"lm_head.weight": "embed.weight"}``: tied weights written once, by :func:`export`
    or ``safetensors.torch.save_model``) are tied back. ``as_module``: save ``{"module": state}``, which
    ``AsyncCheckpointer.load_checkpoint(..., load_module_only=True)`` loads into a model. The whole source is
    in memory once (torch.save zip files are memory-mapped), and :func:`asyncckpt.save` keeps its host
    buffers for the next save with the same config."""
    kind, files, weight_map = _source_files(os.fspath(source))
    state = _load_torch(files[0]) if kind == "torch" else _load_safetensors(files, weight_map, progress)
    if as_module:
        if not isinstance(state, Mapping):
            raise StateMismatchError(f"{files[0]}: as_module needs a state dict, and this file holds a "
                                     f"{type(state).__name__}")
        state = {"module": state}
    future = save(state, save_dir, tag, save_latest=save_latest, config=config)
    del state
    _wait_writing(future, os.path.join(os.fspath(save_dir), partial_dir_name(tag)), progress, tag)
    with CheckpointReader(os.fspath(save_dir), tag) as reader:
        tensors = [reader.record_for(key) for key in skeleton_tensor_refs(reader.skeleton())]
        return ImportResult(reader.path, reader.tag, files, kind, len(tensors), sum(rec.nbytes for rec in tensors))


def _wait_writing(future: Any, partial: str, progress: bool, tag: str) -> None:
    """Wait for the save to be published; with ``progress``, count the bytes on disk in its partial directory."""
    if not progress:
        future.result()
        return
    with _bar(progress, None, f"writing {tag}") as bar:
        while True:
            try:
                future.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                pass
            try:
                on_disk = sum(e.stat().st_size for e in os.scandir(partial) if e.is_file(follow_symlinks=False))
            except OSError:  # not created yet, or renamed into place
                continue
            bar.update(max(0, on_disk - bar.n))


def _source_files(source: str) -> tuple[str, list[str], dict[str, str] | None]:
    """(kind, files to read, the index's tensor -> file map or None) of an import source, told by content."""
    if os.path.isdir(source):
        for name in (INDEX_FILE, SINGLE_FILE):
            if os.path.isfile(os.path.join(source, name)):
                return _source_files(os.path.join(source, name))
        raise CheckpointNotFoundError(f"{source}: a directory without {INDEX_FILE} or {SINGLE_FILE}")
    try:
        with open(source, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{source}: no such file or directory") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{source}: cannot read ({exc.strerror})") from exc
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a torch.save zip archive; a legacy pickle
        return "torch", [source], None
    if len(head) > 8 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors", [source], None
    if head.lstrip()[:1] == b"{":
        weight_map = _read_index(source)
        return "safetensors", sorted(set(weight_map.values())), weight_map
    raise CorruptCheckpointError(f"{source}: not a torch.save file, a safetensors file or a {INDEX_FILE} "
                                 f"(it starts with {head[:8]!r})")


def _read_index(path: str) -> dict[str, str]:
    """The weight map of a Hugging Face index: tensor name -> shard path (a file in the index's directory)."""
    try:
        with open(path, "rb") as f:
            weight_map = json.loads(f.read())["weight_map"]
        items = list(weight_map.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: not a safetensors index with a weight_map ({type(exc).__name__}: "
                                     f"{exc})") from None
    directory = os.path.dirname(path)
    out = {}
    for name, shard in items:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path}: tensor {name!r}: shard {shard!r} is not a file name in the "
                                        "index's directory")
        out[name] = os.path.join(directory, shard)
    return out


def _load_torch(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: torch.load(weights_only=True) refuses it: "
                                    f"{(str(exc).splitlines() or [''])[0]}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for damaged files
        raise CorruptCheckpointError(f"{path}: cannot be read as a torch.save file ({type(exc).__name__}: "
                                     f"{(str(exc).splitlines() or [''])[0]})") from None


def _load_safetensors(files: list[str], weight_map: dict[str, str] | None, progress: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    where: dict[str, str] = {}
    sizes = [os.path.getsize(p) if os.path.isfile(p) else 0 for p in files]
    with _bar(progress, sum(sizes), "reading") as bar:
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    metadata.update(f.metadata() or {})
                    for name in getattr(f, "offset_keys", f.keys)():  # in file order where supported
                        if name in tensors:
                            raise CorruptCheckpointError(f"{path}: tensor {name!r} is also in {where[name]}")
                        t = tensors[name] = f.get_tensor(name)
                        where[name] = path
                        bar.update(t.numel() * t.element_size())
            except CheckpointError:
                raise
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path}: a shard the index names is missing") from None
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError for damaged files
                raise CorruptCheckpointError(f"{path}: cannot be read as a safetensors file "
                                             f"({type(exc).__name__}: {exc})") from None
    for name, path in (weight_map or {}).items():
        if where.get(name) != path:
            raise CorruptCheckpointError(f"{path}: the index places tensor {name!r} in this file, which does not "
                                         "hold it")
    for alias, name in metadata.items():  # tied weights written once
        if alias != "format" and alias not in tensors and name in tensors:
            tensors[alias] = tensors[name]
    return tensors
