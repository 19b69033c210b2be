"""Read a published checkpoint: resolve the tag, validate the (untrusted) manifest and rank indices, read and
decode only the tensors that are needed, verify checksums, rebuild the nested state on the right devices.

Raw chunks are read straight into the destination tensor (``preadv``), compressed chunks are decoded in a
thread pool; both release the GIL, so loading uses every core.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import stat
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .codec import ChunkCodec
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from .format import (LATEST, MANIFEST, MAX_JSON_BYTES, PARTIAL_SUFFIX, TensorRecord, check_view, checksum, parse_manifest,
                     parse_rank_index, validate_tag)
from .placement import DTensorInfo, copy_overlap, local_region, to_dtensor
from .state import skeleton_tensor_refs, unflatten

MapLocation = Any  # None | str | torch.device | dict[str, str] | Callable[[str], str | torch.device]


def list_tags(save_dir: str) -> list[str]:
    """Published tags in ``save_dir`` (directories holding a manifest), oldest first."""
    try:
        entries = list(os.scandir(save_dir))
    except FileNotFoundError:
        return []
    tags = [e for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            and os.path.isfile(os.path.join(e.path, MANIFEST))]
    return [e.name for e in sorted(tags, key=lambda e: (e.stat().st_mtime, e.name))]


def read_latest(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, LATEST), "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        return None
    try:  # exactly what the publisher writes, "<tag>\n": a damaged byte anywhere is an error, never ignored
        text = data.decode()
        return validate_tag(text[:-1] if text.endswith("\n") else None)
    except (UnicodeDecodeError, ValueError):
        raise CorruptCheckpointError(
            f"{os.path.join(save_dir, LATEST)}: does not hold a valid tag and a newline: {data[:80]!r}") from None


def resolve_tag(save_dir: str, tag: str | None) -> str:
    """The tag to load: ``tag``, or the one ``latest`` names. Errors list the tags that exist."""
    save_dir = os.fspath(save_dir)
    named_by = ""
    if tag is None:
        tag = read_latest(save_dir)
        if tag is None:
            raise CheckpointNotFoundError(
                f"no '{LATEST}' file in {save_dir}; published tags: {_tags_text(save_dir)}")
        named_by = f" (named by {os.path.join(save_dir, LATEST)})"
    else:
        validate_tag(tag)
    path = tag_dir(save_dir, tag)
    if not os.path.isdir(path):
        partial = os.path.isdir(os.path.join(save_dir, f".{tag}{PARTIAL_SUFFIX}"))
        why = "it was never completed (only a partial directory exists)" if partial else "it does not exist"
        raise CheckpointNotFoundError(
            f"checkpoint tag {tag!r} in {save_dir}{named_by}: {why}; published tags: {_tags_text(save_dir)}")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise CheckpointNotFoundError(f"checkpoint {path} is incomplete (no {MANIFEST}); published tags: {_tags_text(save_dir)}")
    return tag


def tag_dir(save_dir: str, tag: str) -> str:
    """The directory holding ``tag``: ``save_dir/tag``, or, while an overwrite of it was cut short between
    its two renames (file systems without RENAME_EXCHANGE), the complete old copy that the next save puts back."""
    path = os.path.join(save_dir, tag)
    replaced = os.path.join(save_dir, f".{tag}.replaced{PARTIAL_SUFFIX}")
    if not os.path.lexists(path) and os.path.isfile(os.path.join(replaced, MANIFEST)):
        return replaced
    return path


def _tags_text(save_dir: str) -> str:
    tags = list_tags(save_dir)
    return ", ".join(tags) if tags else "none"


def split_path(path: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR/TAG`` → (save_dir, tag or None)."""
    path = os.fspath(path).rstrip("/") or "/"
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, None


def target_device(saved: str, map_location: MapLocation) -> torch.device:
    if map_location is None:
        dev = torch.device(saved)
    elif isinstance(map_location, (str, torch.device)):
        dev = torch.device(map_location)
    elif isinstance(map_location, dict):
        dev = torch.device(map_location.get(saved, saved))
    elif callable(map_location):
        dev = torch.device(map_location(saved))
    else:
        raise TypeError(f"map_location must be None, a device, a dict or a callable, not {type(map_location).__name__}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointNotFoundError(
            f"a tensor was saved on {saved} but CUDA is not available here; pass map_location='cpu'") from None
    return dev


class CheckpointReader:
    """A validated view of one published tag. Nothing large is allocated until tensors are read."""

    def __init__(self, save_dir: str, tag: str | None = None, *, threads: int = 0):
        self.save_dir = os.fspath(save_dir)
        self.tag = resolve_tag(self.save_dir, tag)
        self.path = tag_dir(self.save_dir, self.tag)
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.bytes_read = 0  # stored bytes read from data files so far (what loading this rank cost)
        self.manifest = parse_manifest(_read_metadata(self.path, MANIFEST), self._file(MANIFEST))
        self.world_size = self.manifest["world_size"]
        self._sizes = self._data_file_sizes()
        self.indices: dict[int, dict] = {}
        self.records: dict[str, list[tuple[int, TensorRecord]]] = {}
        for entry in self.manifest["ranks"]:
            name = entry["index"]
            if name not in self._sizes:
                raise CorruptCheckpointError(f"{self._file(name)}: rank index listed in the manifest is missing")
            data = _read_metadata(self.path, name)
            if checksum(data) != entry["xxh3"]:
                raise CorruptCheckpointError(f"{self._file(name)}: checksum does not match the manifest's")
            doc, records = parse_rank_index(data, self._file(name), self._sizes)
            self.indices[entry["rank"]] = doc
            for key, rec in records.items():
                self.records.setdefault(key, []).append((entry["rank"], rec))

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _data_file_sizes(self) -> dict[str, int]:
        sizes = {}
        for e in os.scandir(self.path):
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                sizes[e.name] = st.st_size
        return sizes

    def skeleton(self, rank: int = 0) -> Any:
        doc = self.indices.get(rank)
        if doc is None or doc.get("skeleton") is None:
            doc = self.indices.get(0) or next(iter(self.indices.values()))
        return doc.get("skeleton")

    @property
    def raw_bytes(self) -> int:
        return sum(rec.nbytes for recs in self.records.values() for _, rec in recs if not rec.is_view)

    @property
    def stored_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def files(self) -> dict[str, int]:
        """Every regular file in the tag directory (manifest, rank indices, data files) and its size."""
        return dict(sorted(self._sizes.items()))

    # ----------------------------------------------------------------------------------------- reading
    def record_for(self, key: str, rank: int = 0) -> TensorRecord:
        """The record of a non-sharded tensor as seen by ``rank``: its own copy when it wrote one (rank-local
        state), else the copy of rank ``rank % world_size`` (loading on another world size), else the only
        copy (replicated state, written by whichever rank it was assigned to)."""
        recs = self.records.get(key)
        if not recs:
            raise CorruptCheckpointError(f"{self.path}: the skeleton references tensor {key!r}, which no rank index holds")
        by_rank = dict(recs)
        return by_rank.get(rank) or by_rank.get(rank % self.world_size) or recs[0][1]

    def read_tensors(self, keys: Iterable[str], *, rank: int = 0, map_location: MapLocation = None,
                     verify: bool = True) -> dict[str, torch.Tensor]:
        """Read the tensors named by ``keys`` (and the storages their views need)."""
        keys = list(dict.fromkeys(keys))
        wanted: dict[str, TensorRecord] = {}
        for key in keys:
            rec = self.record_for(key, rank)
            wanted[key] = rec
            if rec.is_view and not rec.packed:
                base = self.record_for(rec.base, rank)
                check_view(rec, base, f"{self.path}: tensor {key!r}")
                wanted[rec.base] = base
        plain = {k: r for k, r in wanted.items() if not r.is_view or r.packed}
        cpu = self._read_plain(plain, verify)
        out: dict[str, torch.Tensor] = {}
        for key, t in cpu.items():
            dev = target_device(plain[key].device, map_location)
            out[key] = t if dev.type == "cpu" else t.to(dev)
        for key, rec in wanted.items():
            if rec.is_view and not rec.packed:
                base = out[rec.base]
                view = torch.empty(0, dtype=rec.dtype, device=base.device)
                view.set_(base.untyped_storage(), rec.byte_offset // rec.dtype.itemsize, rec.shape, rec.stride)
                out[key] = view
        return {k: out[k] for k in keys}

    def read_region(self, key: str, shape: tuple[int, ...], offset: tuple[int, ...], *, verify: bool = True) -> torch.Tensor:
        """The box ``shape`` at ``offset`` of a (possibly sharded) tensor, assembled from every saved shard that
        overlaps it; shards that do not overlap are not read."""
        recs = [rec for _, rec in self.records.get(key, [])]
        if not recs:
            raise CorruptCheckpointError(f"{self.path}: the skeleton references tensor {key!r}, which no rank index holds")
        out = torch.empty(shape, dtype=recs[0].dtype)
        covered = 0
        seen: set[tuple] = set()
        for rec in recs:
            if rec.dtype != out.dtype:
                raise CorruptCheckpointError(f"{self.path}: shards of {key!r} disagree on dtype")
            src_offset = rec.global_offset if rec.is_shard else (0,) * len(rec.shape)
            box = (src_offset, rec.shape)
            if box in seen or not _overlaps(offset, shape, src_offset, rec.shape):
                continue  # a replicated copy of a shard already read, or a shard this rank does not need
            seen.add(box)
            src = self._read_plain({key: rec}, verify)[key]
            covered += copy_overlap(out, offset, src, src_offset)
        if covered < out.numel():
            raise CorruptCheckpointError(
                f"{self.path}: the saved shards of {key!r} cover {covered} of the {out.numel()} elements requested "
                f"(region {list(shape)} at {list(offset)})")
        return out

    def _read_plain(self, records: dict[str, TensorRecord], verify: bool) -> dict[str, torch.Tensor]:
        """Tensors with their own storage: stored ones, and packed ones (each copied out of its pack; the
        packs are read in the same batch of chunks)."""
        packed = {k: r for k, r in records.items() if r.packed}
        stored = {k: r for k, r in records.items() if not r.packed}
        for key, rec in packed.items():
            if rec.base not in stored:
                stored[rec.base] = self.record_for(rec.base)  # pack keys name their rank: one copy
            check_view(rec, stored[rec.base], f"{self.path}: tensor {key!r}")
        tensors = {k: torch.empty(r.shape, dtype=r.dtype) for k, r in stored.items()}
        tasks = []
        for key, rec in stored.items():
            flat = _bytes_view(tensors[key])
            pos = 0
            for i, c in enumerate(rec.chunks):
                tasks.append((rec, i, c, flat[pos: pos + c.raw]))
                pos += c.raw
        fds: dict[str, int] = {}
        try:
            for rec in stored.values():
                if rec.file not in fds:
                    fds[rec.file] = _open_inside(self.path, rec.file)
            self._run_chunks(tasks, fds, verify)
        finally:
            for fd in fds.values():
                os.close(fd)
        for key, rec in packed.items():  # contiguous (parse_rank_index checks): a byte range of the pack
            start = rec.byte_offset
            tensors[key] = tensors[rec.base][start: start + rec.nbytes].clone().view(rec.dtype).view(rec.shape)
        return {k: tensors[k] for k in records}

    def _run_chunks(self, tasks: list, fds: dict[str, int], verify: bool) -> None:
        def one(task) -> None:
            rec, i, c, out = task
            where = f"{self._file(rec.file)} chunk {i} (bytes {c.offset}..{c.offset + c.length}) of tensor {rec.key!r}"
            fd = fds[rec.file]
            if c.codec == "raw":
                n = os.preadv(fd, [out], c.offset) if c.raw else 0
                if n != c.raw:
                    raise CorruptCheckpointError(f"{where}: short read ({n} of {c.raw} bytes)")
                if verify and checksum(out) != c.xxh3:
                    raise CorruptCheckpointError(f"{where}: checksum mismatch")
                return
            stored = os.pread(fd, c.length, c.offset)
            if len(stored) != c.length:
                raise CorruptCheckpointError(f"{where}: short read ({len(stored)} of {c.length} bytes)")
            ChunkCodec.decode(c, memoryview(stored), out, verify, where)
            if verify and c.sxxh3 and checksum(stored) != c.sxxh3:  # flips that decode to the same bytes
                raise CorruptCheckpointError(f"{where}: checksum mismatch in the stored (compressed) bytes")

        self.bytes_read += sum(t[2].length for t in tasks)
        if len(tasks) <= 1 or self.threads == 1:
            for t in tasks:
                one(t)
            return
        with concurrent.futures.ThreadPoolExecutor(self.threads, "asyncckpt-load") as pool:
            futures = [pool.submit(one, t) for t in tasks]
            for f in futures:
                f.result()

    def load_state(self, *, rank: int = 0, map_location: MapLocation = None, verify: bool = True,
                   allow_pickle: bool = False, mesh: Any = None) -> Any:
        """Rebuild the state as ``rank`` saved it (another world size works too). DTensors come back as
        DTensors on ``mesh`` (resharded to it) when a mesh is given, else as full plain tensors."""
        skeleton = self.skeleton(rank)
        refs = skeleton_tensor_refs(skeleton)
        plain = [k for k, node in refs.items() if node.get("__t") != "dtensor"]
        tensors = self.read_tensors(plain, rank=rank, map_location=map_location, verify=verify)
        for key, node in refs.items():
            if node.get("__t") == "dtensor":
                tensors[key] = self._load_dtensor(key, node, mesh, map_location, verify)
        return unflatten(skeleton, tensors, allow_pickle=allow_pickle, where=self.path)

    def _load_dtensor(self, key: str, node: dict, mesh: Any, map_location: MapLocation, verify: bool) -> Any:
        try:
            info = DTensorInfo(tuple(int(x) for x in node["global_shape"]),
                               tuple(tuple(p) for p in node["placements"]))
        except (KeyError, TypeError, ValueError):
            raise UnsafeCheckpointError(f"{self.path}: malformed DTensor node for {key!r}") from None
        saved = {rec.global_shape if rec.is_shard else rec.shape for _, rec in self.records.get(key, [])}
        if saved != {info.global_shape}:  # the shape read_region allocates must be what the records hold
            raise UnsafeCheckpointError(f"{self.path}: DTensor {key!r} claims global shape {list(info.global_shape)}, "
                                        f"but its saved shards have {sorted(list(s) for s in saved)}")
        if mesh is None:
            shape, offset = info.global_shape, (0,) * len(info.global_shape)
        else:
            shape, offset = local_region(info, mesh)
        local = self.read_region(key, shape, offset, verify=verify)
        dev = target_device(self.records[key][0][1].device, map_location)
        if dev.type != "cpu":
            local = local.to(dev)
        return local if mesh is None else to_dtensor(local, info, mesh)

    def verify(self) -> dict:
        """Read and check every chunk of every rank. Raises CorruptCheckpointError naming the file, chunk and
        tensor at fault; returns counts."""
        plain = {key: recs for key, recs in self.records.items()}
        n_chunks = 0
        for key, recs in plain.items():
            for rank, rec in recs:
                if rec.is_view:
                    continue
                self._read_plain({key: rec}, verify=True)
                n_chunks += len(rec.chunks)
        return {"tensors": sum(len(r) for r in plain.values()), "chunks": n_chunks,
                "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes}


def _overlaps(a_off, a_shape, b_off, b_shape) -> bool:
    return all(max(ao, bo) < min(ao + al, bo + bl) for ao, al, bo, bl in zip(a_off, a_shape, b_off, b_shape)) \
        or (len(a_shape) == 0)


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def _open_inside(directory: str, name: str) -> int:
    """Open a file of the tag directory for reading; refuse symlinks and anything that is not a regular file."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnsafeCheckpointError(f"{path}: cannot open safely ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{path}: not a regular file")
    return fd


def _read_metadata(directory: str, name: str) -> bytes:
    """A manifest or rank index: a regular file in the tag directory (never through a symlink), its size
    checked before anything is read."""
    fd = _open_inside(directory, name)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise UnsafeCheckpointError(f"{os.path.join(directory, name)}: {size} bytes is over the "
                                        f"{MAX_JSON_BYTES}-byte limit for metadata")
        chunks, left = [], size + 1
        while left > 0:  # read to the end (at most the size fstat saw, plus one byte to notice growth)
            piece = os.read(fd, min(left, 1 << 24))
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load(save_dir: str, tag: str | None = None, map_location: MapLocation = None, *, verify: bool = True,
         allow_pickle: bool = False, rank: int | None = None, mesh: Any = None) -> Any:
    """Load the nested state saved by :func:`asyncckpt.save` (``tag`` None → the tag ``latest`` names).
    ``rank`` defaults to this process's rank; DTensors are resharded onto ``mesh`` when one is given."""
    if rank is None:
        rank = _current_rank()
    return CheckpointReader(save_dir, tag).load_state(rank=rank, map_location=map_location, verify=verify,
                                                      allow_pickle=allow_pickle, mesh=mesh)


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
