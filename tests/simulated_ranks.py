"""Checkpoints of many simulated ranks, written without processes: each rank's data file and sealed index as the
writer lays them out (raw chunks), then the publisher's tables (:func:`asyncckpt.owners.write_tables`) and a
manifest as ``commit.py`` builds it. The state is FSDP-like: every parameter sharded on dimension 0 (``ROWS``
rows per rank), a rank-local tensor per rank, a replicated tensor written by rank 0 only, and a step counter."""
from __future__ import annotations

import os

import torch

import asyncckpt.format as fmt
from asyncckpt.owners import write_tables

TAG = "t"
ROWS, COLS = 2, 4
PARAMS = [f"model/layers.{i}.{p}" for i in range(2) for p in ("weight", "bias")]
KEYS = PARAMS + [f"optim/{n}/{s}" for n in PARAMS for s in ("exp_avg", "exp_avg_sq")]


def full(key: str, world: int) -> torch.Tensor:
    """The whole tensor ``key`` of a checkpoint of ``world`` ranks."""
    return (torch.arange(world * ROWS * COLS, dtype=torch.float32) + KEYS.index(key) * 0.5).reshape(-1, COLS)


def rank_local(rank: int) -> torch.Tensor:
    return torch.arange(16, dtype=torch.int64) + rank * 1000


TABLE = torch.linspace(0, 1, 32)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _record(t: torch.Tensor, raw: bytes, file: str, data: bytearray, **shard) -> dict:
    """A tensor record as the writer writes it (one raw chunk), its bytes appended to ``data``."""
    chunk = {"off": len(data), "len": len(raw), "raw": len(raw), "codec": "raw", "xxh3": fmt.checksum(raw)}
    data += raw
    return {"dtype": fmt.dtype_name(t.dtype), "shape": list(t.shape), "device": "cpu", "file": file, "chunks": [chunk],
            **shard}


def write_checkpoint(save_dir: str, world: int) -> str:
    """Write a published checkpoint of ``world`` ranks under ``save_dir/t``; returns the tag directory."""
    tag_dir = os.path.join(save_dir, TAG)
    os.makedirs(tag_dir)
    gshape = [world * ROWS, COLS]
    skeleton = {"model": {}, "optim": {}, "rng": {"__t": "tensor", "key": "rng"},
                "table": {"__t": "tensor", "key": "table"}, "step": 7}
    for key in KEYS:
        part, name = key.split("/", 1)
        skeleton[part][name] = {"__t": "dtensor", "key": key, "global_shape": gshape, "placements": [["S", 0]]}
    entries = []
    shard_bytes = ROWS * COLS * 4
    fulls = {key: _bytes(full(key, world)) for key in KEYS}
    local = full(KEYS[0], 1)  # the shape and dtype of every shard
    for rank in range(world):
        file = fmt.data_file_name(rank, 0)
        data = bytearray()
        tensors = {}
        at = rank * shard_bytes
        for key in KEYS:
            tensors[key] = _record(local, fulls[key][at: at + shard_bytes], file, data, global_shape=gshape,
                                   global_offset=[rank * ROWS, 0])
        own = rank_local(rank)
        tensors["rng"] = _record(own, _bytes(own), file, data)
        if rank == 0:
            tensors["table"] = _record(TABLE, _bytes(TABLE), file, data)
        with open(os.path.join(tag_dir, file), "wb") as f:
            f.write(data)
        doc = {"format_version": fmt.FORMAT_VERSION, "rank": rank, "files": {file: len(data)}, "tensors": tensors,
               "skeleton": skeleton}
        sealed = fmt.seal(doc)
        name = fmt.rank_index_name(rank)
        with open(os.path.join(tag_dir, name), "wb") as f:
            f.write(sealed)
        entries.append((rank, name, fmt.checksum(sealed), len(data) + len(sealed)))
    manifest = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "library_version": "0",
                "tag": TAG, "world_size": world, "created_unix": 0.0, "node_local": False, "save_latest": True,
                **write_tables(tag_dir, entries, fsync=False)}
    with open(os.path.join(tag_dir, fmt.MANIFEST), "wb") as f:
        f.write(fmt.seal(manifest))
    with open(os.path.join(save_dir, fmt.LATEST), "w") as f:
        f.write(TAG + "\n")
    return tag_dir
