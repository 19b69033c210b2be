"""The writer pool: chunk encoding in a thread pool, file writes through the save's storage object
(:mod:`asyncckpt.storage`) in file threads, and fsync (an object store: the completed upload) before anything
is reported durable. :meth:`WriterPool.write_rank` is a coroutine: it runs on its caller's event loop (the
engine's, :class:`~asyncckpt.threads.EventLoopThread`) and only encodes and writes.

For each rank file the writer keeps a bounded window of chunks being encoded ahead of the disk, and writes
encoded chunks in order, so the disk and the encoders work at the same time and memory stays bounded.
Writer threads run at lowered CPU and I/O priority (nice / ionice) so they disturb training as little as
possible.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import logging
import os
import platform
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .codec import ChunkCodec, Throughput
from .errors import CheckpointError
from .format import (TensorRecord, checksum, contiguous_stride, data_file_name, parse_rank_index, rank_index_doc,
                     rank_index_name, seal)
from .io_types import FlatState
from .packing import Pack, Packer, alone_items, pack_key
from .state import skeleton_tensor_refs
from .storage import POSIX, Storage
from .threads import started_pool

log = logging.getLogger(__name__)

_WRITEBACK_BYTES = 16 << 20  # start device writeback every this many bytes (the final fsync then has little left)
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}.get(platform.machine())


def lower_session_priority(nice: int) -> None:
    """Best effort, for a process that runs in a session of its own (the writer service, which must outlive its
    trainer): with the kernel's autogroup scheduling (Linux, ``kernel.sched_autogroup_enabled``) CPU time is
    shared between sessions first and niceness only acts inside one, so a niced process alone in its session
    still takes as much CPU as the whole training job's session. Setting the session's autogroup niceness makes
    it yield to the trainers as the niceness says."""
    if not nice:
        return
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(min(19, nice)))
    except OSError:  # no autogroup (not Linux, or disabled): niceness alone acts
        pass


def lower_thread_priority(nice: int, ionice_idle: bool) -> None:
    """Best effort: raise this thread's niceness and lower its I/O priority (Linux threads have their own)."""
    tid = threading.get_native_id()
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except (AttributeError, OSError):
            pass
    if _IOPRIO_SET is not None and platform.system() == "Linux":
        prio = (3 << 13) if ionice_idle else ((2 << 13) | 7)  # IDLE, or BEST_EFFORT level 7
        try:
            ctypes.CDLL(None, use_errno=True).syscall(_IOPRIO_SET, 1, tid, prio)  # IOPRIO_WHO_PROCESS
        except (OSError, AttributeError):
            pass


@dataclass
class RankFiles:
    """What one rank wrote: its index (name and checksum) and byte counts."""

    index_name: str
    index_xxh3: str
    bytes_written: int
    raw_bytes: int


class WriterPool:
    def __init__(self, codec: ChunkCodec, *, threads: int, chunk_bytes: int, files_per_rank: int = 1,
                 inflight_chunks: int = 0, fsync: bool = True, nice: int = 10, ionice_idle: bool = False,
                 name: str = "asyncckpt", encoders: concurrent.futures.ThreadPoolExecutor | None = None):
        """``encoders``: encode threads shared with other pools (the writer service's, the node's budget; this
        pool does not shut them down), ``threads`` of them; else this pool starts its own ``threads``."""
        self.codec = codec
        self.threads = max(1, threads)
        codec.throughput.threads = self.threads  # compression: auto spreads encode time over these
        self.chunk_bytes = chunk_bytes
        self.files_per_rank = files_per_rank
        self.window = inflight_chunks or 2 * self.threads + 1
        self.fsync = fsync
        self._packer = Packer(chunk_bytes)
        init = (lambda: lower_thread_priority(nice, ionice_idle))
        self._own_encoders = encoders is None
        self._encoders = started_pool(self.threads, f"{name}-encode", initializer=init) if encoders is None \
            else encoders
        self._files = started_pool(max(2, files_per_rank), f"{name}-file", initializer=init)

    def close(self) -> None:
        if self._own_encoders:
            self._encoders.shutdown(wait=True, cancel_futures=True)
        self._files.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------------- writing
    async def write_rank(self, *, directory: str, rank: int, flat: FlatState, slot: Any, skeleton: Any,
                         storage: Storage = POSIX) -> RankFiles:
        """Encode and write this rank's staged tensors into ``directory``, then its index; fsync all.
        Small tensors are written in packs (:mod:`asyncckpt.packing`). The index is validated as a reader
        would see it before it is written: a save that load would refuse fails here, before publishing."""
        items = flat.items
        ring = getattr(slot, "ring", None)  # ring mode: the ring's layout planned the packs in write order
        layout = slot.layout if ring is None else ring.layout
        entries = ring.layout.plan.entries if ring is not None else \
            self._packer.plan(items, layout, alone_items(flat)).entries
        n_files = max(1, min(self.files_per_rank, len(entries)))
        assignment = _split_by_bytes([e.nbytes if isinstance(e, Pack) else items[e].nbytes for e in entries], n_files)
        names = [data_file_name(rank, f) for f in range(n_files)]
        results = await asyncio.gather(*[
            self._write_file(storage, storage.join(directory, names[f]), slot, [entries[i] for i in idxs], items,
                             layout)
            for f, idxs in enumerate(assignment)
        ])
        records: dict[str, dict] = {}
        for v in flat.views:
            records[v.key] = TensorRecord(v.key, v.dtype, v.shape, v.device, base=v.base,
                                          byte_offset=v.byte_offset, stride=v.stride).to_json()
        files: dict[str, int] = {}
        for name, (size, written) in zip(names, results):
            files[name] = size
            for entry, chunks in written:
                if isinstance(entry, Pack):
                    _pack_records(records, rank, entry, items, name, chunks)
                    continue
                item = items[entry]
                records[item.key] = TensorRecord(
                    item.key, item.dtype, item.shape, item.device, file=name, chunks=tuple(chunks),
                    global_shape=item.global_shape, global_offset=item.global_offset).to_json()
        data = seal(rank_index_doc(rank, files, records, skeleton))
        index_name = rank_index_name(rank)
        path = storage.join(directory, index_name)
        # the check and the write run at once: nothing is published before both succeeded
        loop = asyncio.get_running_loop()
        outcomes = await asyncio.gather(
            loop.run_in_executor(self._encoders, check_index, data, path, skeleton, flat.elsewhere),
            loop.run_in_executor(self._files, storage.write_durable, path, data, self.fsync),
            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if self.fsync:
            await loop.run_in_executor(self._files, storage.fsync_dir, directory)
        return RankFiles(index_name, checksum(data), sum(files.values()) + len(data), sum(i.nbytes for i in items))

    async def _write_file(self, storage: Storage, path: str, slot: Any, entries: list, items: list,
                          layout: Any) -> tuple[int, list]:
        loop = asyncio.get_running_loop()
        files = self._files
        tp = self.codec.throughput  # compression: auto follows the write rate measured here
        chunk = self.chunk_bytes
        window: collections.deque = collections.deque()
        out: list[tuple[Any, list]] = []
        pos = 0

        ring = getattr(slot, "ring", None)

        def units():
            """(chunk records to append to, entry, slot offset of the chunk, its end) for every chunk, in file
            order (an entry is a pack or an item index)."""
            for entry in entries:
                out.append((entry, []))
                if isinstance(entry, Pack):
                    yield out[-1][1], entry, entry.runs[0][0] if entry.runs else 0, 0
                    continue
                off, n = layout.offsets[entry], items[entry].nbytes
                for start in range(0, n, chunk):
                    yield out[-1][1], entry, off + start, off + min(n, start + chunk)

        slot_bytes = slot.array(0, layout.total) if entries and ring is None else None
        segment = -1  # ring mode: the segment the chunks come from

        async def source(offset: int) -> tuple[Any, int, int]:
            """The staged bytes holding ``offset``: (array, slot offset of its first byte, ring segment)."""
            nonlocal segment
            if ring is None:
                return slot_bytes, 0, -1
            s = ring.segment_of(offset)
            if s != segment:
                while window and not ring.staged(s):  # what is queued may hold the ring slot it needs
                    await drain()
                await loop.run_in_executor(None, ring.wait_staged, s)
                segment = s
            return ring.array(s), s * layout.segment, s

        flushed = 0

        async def drain() -> None:
            nonlocal pos, flushed
            chunks, s, fut = window.popleft()
            enc = await fut
            await loop.run_in_executor(files, _write_pieces, f, enc.pieces, tp)
            if s >= 0:
                ring.written(s)  # raw chunks are views of the ring slot: freed only once written
            chunks.append(enc.record(pos))
            pos += enc.length
            if self.fsync and pos - flushed >= _WRITEBACK_BYTES:
                await loop.run_in_executor(files, _timed, tp, f.writeback, flushed, pos - flushed)
                flushed = pos

        f = await loop.run_in_executor(files, storage.open_write, path)
        try:
            for chunks, entry, start, end in units():
                data, base, s = await source(start)
                if isinstance(entry, Pack):
                    fn, args = _encode_pack, (self.codec, entry, data, base)
                else:
                    fn, args = self.codec.encode, (data[start - base: end - base], items[entry].dtype.itemsize)
                window.append((chunks, s, loop.run_in_executor(self._encoders, fn, *args)))
                if len(window) >= self.window:
                    await drain()
            while window:
                await drain()
            if self.fsync:  # the disk time of what the page cache took in
                await loop.run_in_executor(files, _timed, tp, f.sync)
        except BaseException:
            for _, _, fut in window:
                fut.cancel()
            await asyncio.gather(*(fut for _, _, fut in window), return_exceptions=True)
            await loop.run_in_executor(files, f.abort)
            raise
        await loop.run_in_executor(files, f.close)
        return pos, out


def _encode_pack(codec: ChunkCodec, pack: Pack, slot_bytes, base: int = 0):
    """Gather a pack's members out of the slot and encode them as one chunk (in an encoder thread)."""
    return codec.encode(pack.gather(slot_bytes, base), pack.itemsize)


def _pack_records(records: dict, rank: int, pack: Pack, items: list, file: str, chunks: list) -> None:
    """The pack's storage record, and one packed view record per member."""
    key = pack_key(rank, pack.index)
    records[key] = TensorRecord(key, torch.uint8, (pack.nbytes,), "cpu", file=file, chunks=tuple(chunks)).to_json()
    for m, off in zip(pack.members, pack.offsets):
        item = items[m]
        records[item.key] = TensorRecord(item.key, item.dtype, item.shape, item.device, base=key, byte_offset=off,
                                         stride=contiguous_stride(item.shape), packed=True).to_json()


def check_index(data: bytes, where: str, skeleton: Any, elsewhere: frozenset[str]) -> None:
    """Refuse to write a rank index that load would refuse: it must parse as a reader parses it, and every
    tensor its skeleton references, and every storage its views name, must be in it or be a replicated
    tensor another rank writes (``elsewhere``)."""
    _, records = parse_rank_index(data, where)
    for key in skeleton_tensor_refs(skeleton):
        if key not in records and key not in elsewhere:
            raise CheckpointError(f"{where}: the saved state references tensor {key!r}, but no tensor of that key "
                                  "was staged; nothing is published")
    for key, rec in records.items():
        if rec.is_view and rec.base not in records and rec.base not in elsewhere:
            raise CheckpointError(f"{where}: tensor {key!r} is a view of storage {rec.base!r}, which was not staged; "
                                  "nothing is published")


def _write_pieces(f, pieces, throughput: Throughput) -> None:
    """Write one encoded chunk (in a file thread), reporting its I/O time to ``throughput``."""
    with throughput.writing(sum(memoryview(p).nbytes for p in pieces)):
        for piece in pieces:
            f.write(memoryview(piece).cast("B"))


def _timed(throughput: Throughput, call, *args) -> None:
    """A flush or fsync of bytes written before (in a file thread): its time is charged to them."""
    with throughput.writing(0):
        call(*args)


def _split_by_bytes(sizes: list[int], n: int) -> list[list[int]]:
    """Contiguous runs of items with about equal bytes each (keeps files sequential)."""
    if n <= 1:
        return [list(range(len(sizes)))]
    total = sum(sizes) or 1
    out: list[list[int]] = [[] for _ in range(n)]
    acc = 0
    for i, s in enumerate(sizes):
        f = min(n - 1, acc * n // total)
        out[f].append(i)
        acc += s
    return [o for o in out if o] or [[]]
