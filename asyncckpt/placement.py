"""Where each tensor's bytes live across ranks.

* **rank-local** (the default): every rank saves its own copy (RNG states, per-rank client state).
* **replicated** (DDP): every rank holds the same tensor; it is written once in total. The replicated tensors
  are assigned to ranks so each writes about 1/N of the bytes (:func:`assign_replicated`), except the state
  a rank changes locally (module buffers), which the first rank of the copy scope writes for all.
* **sharded** (FSDP2 ``DTensor``): each rank saves its local shard with the shard's global offset and the
  global shape; loading reassembles whatever region the loading rank needs, on any world size
  (:func:`copy_overlap`).
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import AbstractSet as Set, Any, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = Replicate = Shard = None  # type: ignore[assignment]
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]


def is_dtensor(obj: Any) -> bool:
    return DTensor is not None and isinstance(obj, DTensor)


@dataclass(frozen=True)
class DTensorInfo:
    """How a DTensor was laid out when saved: enough to rebuild it on another mesh of another size."""

    global_shape: tuple[int, ...]
    placements: tuple[tuple, ...]  # ("S", dim) or ("R",)

    @property
    def sharded(self) -> bool:
        return any(p[0] == "S" for p in self.placements)

    def to_json(self) -> dict:
        return {"global_shape": list(self.global_shape), "placements": [list(p) for p in self.placements]}


def describe_dtensor(t: Any, path: str) -> tuple[torch.Tensor, DTensorInfo, tuple[int, ...]]:
    """(local tensor, layout, global offset of the local shard) of a DTensor."""
    placements = []
    for p in t.placements:
        if isinstance(p, Shard) and type(p) is Shard:
            placements.append(("S", p.dim))
        elif isinstance(p, Replicate):
            placements.append(("R",))
        else:
            raise TypeError(f"{path}: DTensor placement {p} is not supported (only Shard and Replicate); "
                            "call .redistribute() or .full_tensor() before saving")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):  # padded local shards: keep the logical part
        local = local[tuple(slice(0, s) for s in shape)]
    return local, DTensorInfo(tuple(t.shape), tuple(placements)), tuple(offset)


def local_region(info: DTensorInfo, mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, global offset) of this rank's shard of a tensor laid out as ``info`` on ``mesh``."""
    placements = [Shard(p[1]) if p[0] == "S" else Replicate() for p in info.placements]
    if mesh.ndim != len(placements):
        raise ValueError(f"saved for a {len(placements)}-D device mesh, loading on a {mesh.ndim}-D mesh")
    shape, offset = compute_local_shape_and_global_offset(torch.Size(info.global_shape), mesh, placements)
    return tuple(shape), tuple(offset)


def to_dtensor(local: torch.Tensor, info: DTensorInfo, mesh: Any) -> Any:
    placements = [Shard(p[1]) if p[0] == "S" else Replicate() for p in info.placements]
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(info.global_shape),
                              stride=_contiguous_stride(info.global_shape))


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def copy_overlap(dst: torch.Tensor, dst_offset: Sequence[int], src: torch.Tensor, src_offset: Sequence[int]) -> int:
    """Copy the part of ``src`` (a box at ``src_offset`` of the global tensor) that overlaps ``dst`` (a box at
    ``dst_offset``). Returns the number of elements copied."""
    dst_sl, src_sl = [], []
    for d_off, d_len, s_off, s_len in zip(dst_offset, dst.shape, src_offset, src.shape):
        lo, hi = max(d_off, s_off), min(d_off + d_len, s_off + s_len)
        if hi <= lo:
            return 0
        dst_sl.append(slice(lo - d_off, hi - d_off))
        src_sl.append(slice(lo - s_off, hi - s_off))
    dst[tuple(dst_sl)].copy_(src[tuple(src_sl)])
    n = 1
    for s in dst_sl:
        n *= s.stop - s.start
    return n


def assign_replicated(sizes: Sequence[int], world: int, pinned: Set[int] = frozenset()) -> list[int]:
    """Deterministic balanced assignment of replicated tensors to ranks: the ``pinned`` indices (state a rank
    can change locally, such as module buffers) to rank 0; the others largest first, each to the rank with
    the fewest bytes so far (the lowest such rank). Every rank computes the same answer from the same sizes.
    O(tensors x log ranks)."""
    owner = [0] * len(sizes)
    loads = [(sum(sizes[i] for i in pinned), 0)] + [(0, r) for r in range(1, world)]
    heapq.heapify(loads)
    for i in sorted((i for i in range(len(sizes)) if i not in pinned), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + sizes[i], r))
    return owner


class ReplicatedSplit:
    """Which replicated tensors one rank writes, computed once per layout and reused by every save with that
    layout (the assignment is O(tensors x log ranks): not something to redo on the training thread at every
    save). A layout is named by its :func:`fingerprint` (keys, sizes, pinned flags); a few are kept."""

    KEPT = 4

    def __init__(self) -> None:
        self._layouts: dict[tuple[str, int, int], frozenset[int]] = {}

    def owned(self, layout: str, sizes: Sequence[int], world: int, pinned: Set[int], position: int) -> frozenset[int]:
        """The indices of the tensors (of ``sizes``, laid out as ``layout``) that the rank at ``position`` of
        ``world`` ranks writes."""
        key = (layout, world, position)
        mine = self._layouts.get(key)
        if mine is None:
            mine = frozenset(i for i, r in enumerate(assign_replicated(sizes, world, pinned)) if r == position)
            if len(self._layouts) >= self.KEPT:
                del self._layouts[next(iter(self._layouts))]
            self._layouts[key] = mine
        return mine


def fingerprint(keys_and_sizes: Sequence[tuple[str, int]]) -> str:
    """A short digest of the replicated tensors' keys and sizes, compared across ranks at commit."""
    h = hashlib.sha1()
    for k, n in keys_and_sizes:
        h.update(f"{k}\0{n}\n".encode())
    return h.hexdigest()[:16]
