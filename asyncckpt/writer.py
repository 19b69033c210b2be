"""The writer pool: one asyncio event loop in an I/O thread, chunk encoding in a thread pool, file writes
with aiofiles, and fsync before anything is reported durable.

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
from typing import Any, Coroutine

import aiofiles

from .codec import ChunkCodec
from .durable import fsync_dir, start_writeback, write_durable
from .format import FORMAT_VERSION, TensorRecord, checksum, data_file_name, rank_index_name, seal
from .io_types import FlatState

log = logging.getLogger(__name__)

_WRITEBACK_BYTES = 16 << 20  # start device writeback every this many bytes (the final fsync then has little left)
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}.get(platform.machine())


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
                 name: str = "asyncckpt"):
        self.codec = codec
        self.threads = max(1, threads)
        self.chunk_bytes = chunk_bytes
        self.files_per_rank = files_per_rank
        self.window = inflight_chunks or 2 * self.threads + 1
        self.fsync = fsync
        init = (lambda: lower_thread_priority(nice, ionice_idle))
        self._encoders = concurrent.futures.ThreadPoolExecutor(self.threads, f"{name}-encode", initializer=init)
        self._files = concurrent.futures.ThreadPoolExecutor(max(2, files_per_rank), f"{name}-file", initializer=init)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._files)  # aiofiles runs its blocking calls here
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-io", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run a coroutine on the I/O loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
        self._encoders.shutdown(wait=True, cancel_futures=True)
        self._files.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------------- writing
    async def write_rank(self, *, directory: str, rank: int, flat: FlatState, slot: Any, skeleton: Any,
                         extra: dict | None = None) -> RankFiles:
        """Encode and write this rank's staged tensors into ``directory``, then its index; fsync all."""
        layout = slot.layout
        items = flat.items
        n_files = max(1, min(self.files_per_rank, len(items)))
        assignment = _split_by_bytes([i.nbytes for i in items], n_files)
        names = [data_file_name(rank, f) for f in range(n_files)]
        results = await asyncio.gather(*[
            self._write_file(os.path.join(directory, names[f]), slot, [(i, items[i], layout.offsets[i]) for i in idxs])
            for f, idxs in enumerate(assignment)
        ])
        records: dict[str, dict] = {}
        files: dict[str, int] = {}
        for name, (size, recs) in zip(names, results):
            files[name] = size
            for item, chunks in recs:
                records[item.key] = TensorRecord(
                    item.key, item.dtype, item.shape, item.device, file=name, chunks=tuple(chunks),
                    global_shape=item.global_shape, global_offset=item.global_offset).to_json()
        for v in flat.views:
            records[v.key] = TensorRecord(v.key, v.dtype, v.shape, v.device, base=v.base,
                                          byte_offset=v.byte_offset, stride=v.stride).to_json()
        doc = {"format_version": FORMAT_VERSION, "rank": rank, "files": files, "tensors": records,
               "skeleton": skeleton, **(extra or {})}
        data = seal(doc)
        index_name = rank_index_name(rank)
        await self._loop.run_in_executor(self._files, write_durable, os.path.join(directory, index_name), data, self.fsync)
        if self.fsync:
            await self._loop.run_in_executor(self._files, fsync_dir, directory)
        return RankFiles(index_name, checksum(data), sum(files.values()) + len(data), sum(i.nbytes for i in items))

    async def _write_file(self, path: str, slot: Any, entries: list) -> tuple[int, list]:
        loop = self._loop
        chunk = self.chunk_bytes
        window: collections.deque = collections.deque()
        out: list[tuple[Any, list]] = []
        pos = 0

        def jobs():
            for _, item, off in entries:
                n = item.nbytes
                out.append((item, []))
                itemsize = item.dtype.itemsize
                for start in range(0, n, chunk):
                    length = min(chunk, n - start)
                    yield out[-1][1], slot.array(off + start, length), itemsize

        flushed = 0

        async def drain() -> None:
            nonlocal pos, flushed
            pos = await _drain_one(f, window, pos)
            if self.fsync and pos - flushed >= _WRITEBACK_BYTES:
                await f.flush()
                await loop.run_in_executor(self._files, start_writeback, f.fileno(), flushed, pos - flushed)
                flushed = pos

        async with aiofiles.open(path, "wb") as f:
            try:
                pending = jobs()
                for job in pending:
                    window.append((job[0], loop.run_in_executor(self._encoders, self.codec.encode, job[1], job[2])))
                    if len(window) >= self.window:
                        await drain()
                while window:
                    await drain()
                await f.flush()
                if self.fsync:
                    await loop.run_in_executor(self._files, os.fsync, f.fileno())
            except BaseException:
                for _, fut in window:
                    fut.cancel()
                await asyncio.gather(*(fut for _, fut in window), return_exceptions=True)
                raise
        return pos, out


async def _drain_one(f, window: collections.deque, pos: int) -> int:
    chunks, fut = window.popleft()
    enc = await fut
    for piece in enc.pieces:
        await f.write(memoryview(piece).cast("B"))
    chunks.append(enc.record(pos))
    return pos + enc.length


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
