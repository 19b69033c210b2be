"""The physical floors, measured on the same state in the same run:

* **memcpy**: copy every state tensor into an already allocated, already faulted-in host buffer
  (``dst.copy_(src)``): what a save that only copies must cost at least (the stall floor);
* **disk**: write the same bytes sequentially (``write_mib`` per write) and fsync: what making the raw state
  durable costs at least on this disk (the time-to-durable floor without compression);
* **codec**: asyncckpt's :class:`~asyncckpt.codec.ChunkCodec` encoding the state bytes alone, in chunks of the
  configured size, on one thread and on the writer's thread count (plus checksum-only, compression off):
  if its throughput is below the disk's, the compressed writer is CPU-bound here.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics
import time
from typing import Any, Mapping

import torch

from .workload import Workload

ALIGN = 64


def stage_buffer(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, int, int]]]:
    """One buffer holding every tensor (64-byte aligned) and (dst view, src, offset, nbytes) per tensor."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos = (pos + n + ALIGN - 1) // ALIGN * ALIGN
    buf = torch.empty(max(pos, ALIGN), dtype=torch.uint8)
    buf.fill_(0)  # fault the pages in: the floor is the copy, not the allocation
    pairs = []
    for t, off, n in zip(tensors, offsets, sizes):
        dst = buf[off: off + n].view(t.dtype).view(t.shape)
        pairs.append((dst, t, off, n))
    return buf, pairs


def memcpy_floor(pairs, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for dst, src, _, _ in pairs:
            dst.copy_(src)
        out.append(time.perf_counter() - t0)
    return out


def disk_floor(buf: torch.Tensor, nbytes: int, path: str, reps: int, write_mib: int) -> list[dict]:
    view = memoryview(buf.numpy())[:nbytes]
    step = max(1, write_mib) << 20
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            while pos < nbytes:
                pos += os.write(fd, view[pos: pos + step])
            t_written = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        t_end = time.perf_counter()
        out.append({"total_s": t_end - t0, "write_s": t_written - t0, "fsync_s": t_end - t_written})
        os.remove(path)
    return out


def codec_floor(buf: torch.Tensor, pairs, codec_config: Mapping[str, Any], reps: int) -> dict:
    from asyncckpt import Config
    from asyncckpt.codec import ChunkCodec

    cfg = Config.from_dict(dict(codec_config))
    arr = buf.numpy()
    chunk = cfg.codec.chunk_bytes
    jobs = []
    for dst, src, off, n in pairs:
        for start in range(0, n, chunk):
            jobs.append((off + start, min(chunk, n - start), src.element_size()))
    raw = sum(n for _, n, _ in jobs)
    threads = cfg.writer.threads_per_node or max(1, min(8, os.cpu_count() or 1))
    out: dict[str, Any] = {"chunk_bytes": chunk, "threads": threads, "raw_bytes": raw,
                           "codec": ChunkCodec.from_config(cfg.codec).to_dict()}

    def run(codec, pool) -> tuple[float, int]:
        t0 = time.perf_counter()
        fn = lambda j: codec.encode(arr[j[0]: j[0] + j[1]], j[2]).length  # noqa: E731
        lengths = list(pool.map(fn, jobs)) if pool is not None else [fn(j) for j in jobs]
        return time.perf_counter() - t0, sum(lengths)

    variants = {"compress_1thread": (ChunkCodec.from_config(cfg.codec), 1),
                "compress_threads": (ChunkCodec.from_config(cfg.codec), threads),
                "raw_checksum_1thread": (ChunkCodec.from_config(dataclasses.replace(cfg.codec, compression=False)), 1)}
    for label, (codec, n_threads) in variants.items():
        times, stored = [], 0
        pool = concurrent.futures.ThreadPoolExecutor(n_threads) if n_threads > 1 else None
        try:
            for _ in range(max(1, reps)):
                t, stored = run(codec, pool)
                times.append(t)
        finally:
            if pool is not None:
                pool.shutdown()
        med = statistics.median(times)
        out[label] = {"seconds": times, "threads": n_threads, "stored_bytes": stored, "ratio": stored / max(1, raw),
                      "MBps": raw / med / 1e6}
    return out


def measure_floors(wl: Workload, workdir: str, *, reps: int, write_mib: int, codec_reps: int,
                   codec_config: Mapping[str, Any]) -> dict:
    tensors = wl.state_tensors()
    t0 = time.perf_counter()
    buf, pairs = stage_buffer(tensors)
    alloc_s = time.perf_counter() - t0
    raw = sum(n for _, _, _, n in pairs)
    out: dict[str, Any] = {"raw_bytes": raw, "alloc_and_fault_s": alloc_s}
    out["memcpy_s"] = memcpy_floor(pairs, reps)
    os.makedirs(workdir, exist_ok=True)
    end = pairs[-1][2] + pairs[-1][3] if pairs else 0
    out["disk"] = disk_floor(buf, end, os.path.join(workdir, "floor.bin"), reps, write_mib)
    out["disk_bytes"] = end
    try:
        out["codec"] = codec_floor(buf, pairs, codec_config, codec_reps)
    except ImportError as exc:  # pragma: no cover - asyncckpt is this repository's package
        out["codec"] = {"error": str(exc)}
    del buf, pairs
    return out
