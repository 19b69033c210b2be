"""Packing of small tensors into shared chunks.

Ten thousand tensors of 64 bytes each written one by one cost ten thousand chunk encodes, checksums, writes
and chunk records. Instead, the writer groups tensors smaller than :func:`pack_limit` into *packs* of up to
one chunk each: a pack is stored as one uint8 storage record (one chunk: one checksum, one compression call),
and each member is recorded as a contiguous view of it flagged ``packed`` (format: docs/FORMAT.md), so that a
reader gives every member its own storage again.

Members of one pack have the same element size, so a pack still byte-shuffles (4-byte floats with 4-byte
floats). Staging is unchanged: members are staged like any tensor, each at its own place in the slot; the
writer gathers a pack's members out of the slot in an encoder thread, off the training thread. The plan of
which item goes where depends only on the slot's layout (sizes and dtypes, cached by the slot while they
repeat) and on which items cannot be packed, so it is computed once and reused by every later save.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .io_types import FlatState, StageItem

PACK_MAX_BYTES = 64 << 10  # tensors smaller than this (and than a quarter of a chunk) are packed
PACK_PREFIX = "~pack/"  # escape() never writes '~' followed by anything but 0 or 1: no state key looks like this
_CACHE_SIZE = 8  # plans kept (a few slots, each with its current layout)


def pack_limit(chunk_bytes: int) -> int:
    """Items of fewer bytes than this are packed: at least four fit in a chunk (a tensor nearly as large as a
    chunk is one chunk either way; packing it would only fill packs unevenly)."""
    return min(PACK_MAX_BYTES, chunk_bytes // 4)


def pack_key(rank: int, index: int) -> str:
    """The record key of pack ``index`` of ``rank``: unique across ranks, so that a view of another rank's
    index (replicated state loaded on another rank) can never resolve to this rank's pack."""
    return f"{PACK_PREFIX}{rank}/{index}"


@dataclass(frozen=True)
class Pack:
    """Small items stored together: ``members`` (indices into the save's items) at ``offsets`` bytes into
    the pack, gathered from the slot stretches ``runs`` ((slot offset, bytes), in pack order)."""

    index: int
    itemsize: int
    members: tuple[int, ...]
    offsets: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    nbytes: int

    def gather(self, slot_bytes: np.ndarray, base: int = 0) -> np.ndarray:
        """The pack's bytes as one contiguous array (a view of the slot when the members are adjacent there).
        ``base``: the slot offset of ``slot_bytes[0]`` (a ring segment holds a window of the layout)."""
        if len(self.runs) == 1:
            off, n = self.runs[0]
            return slot_bytes[off - base: off - base + n]
        if not self.runs:
            return slot_bytes[:0]
        return np.concatenate([slot_bytes[off - base: off - base + n] for off, n in self.runs])


@dataclass(frozen=True)
class PackPlan:
    """What the writer writes, in order: an ``int`` is the index of an item written on its own, a
    :class:`Pack` a group of small items."""

    entries: tuple[int | Pack, ...]

    @property
    def packs(self) -> list[Pack]:
        return [e for e in self.entries if isinstance(e, Pack)]


def alone_items(flat: FlatState) -> frozenset[int]:
    """Indices of the items never packed: shards of a sharded tensor and storages that views refer to."""
    bases = {v.base for v in flat.views}
    return frozenset(i for i, item in enumerate(flat.items) if item.global_shape or item.key in bases)


def plan(sizes: Sequence[int], itemsizes: Sequence[int], offsets: Sequence[int], alone: frozenset[int],
         chunk_bytes: int) -> PackPlan:
    """Group the items of 1 to :func:`pack_limit` - 1 bytes, except those in ``alone``, by element size into
    packs of at most ``chunk_bytes``. A pack takes the place of its first member in the write order. Empty
    tensors stay alone: they have no chunks, and a pack of nothing but empty tensors would be a chunk of 0
    bytes, which readers refuse."""
    limit = pack_limit(chunk_bytes)
    entries: list = []  # item indices, and for each pack the list of its members
    open_packs: dict[int, tuple[list[int], list[int]]] = {}  # itemsize -> (members, [bytes so far])
    for i, n in enumerate(sizes):
        if n >= limit or n == 0 or i in alone:
            entries.append(i)
            continue
        current = open_packs.get(itemsizes[i])
        if current is None or current[1][0] + n > chunk_bytes:
            current = open_packs[itemsizes[i]] = ([], [0])
            entries.append(current[0])  # the pack takes the place of its first member
        current[0].append(i)
        current[1][0] += n
    out, k = [], 0
    for e in entries:
        if isinstance(e, list):
            e = _make_pack(k, itemsizes[e[0]], e, sizes, offsets)
            k += 1
        out.append(e)
    return PackPlan(tuple(out))


def _make_pack(index: int, itemsize: int, members: list[int], sizes: Sequence[int],
               offsets: Sequence[int]) -> Pack:
    pos, in_pack, runs = 0, [], []
    for m in members:
        in_pack.append(pos)
        n = sizes[m]
        if n:
            if runs and runs[-1][0] + runs[-1][1] == offsets[m]:
                runs[-1][1] += n  # adjacent in the slot: one stretch
            else:
                runs.append([offsets[m], n])
        pos += n
    return Pack(index, itemsize, tuple(members), tuple(in_pack), tuple((o, n) for o, n in runs), pos)


class Packer:
    """Plans packs and remembers the plans of the last few slot layouts: a steady state of saves with the
    same layout plans once."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def plan(self, items: Sequence[StageItem], layout, alone: frozenset[int]) -> PackPlan:
        """``layout`` is the slot's layout of ``items`` (offsets and sizes); the slot keeps the same layout
        object while the items' sizes, dtypes and shapes repeat, so its identity keys the cache (the cache
        holds the layout, so its id cannot be reused by another object while cached)."""
        key = (id(layout), alone)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is layout:
            self._cache.move_to_end(key)
            return hit[1]
        result = plan(layout.sizes, [i.dtype.itemsize for i in items], layout.offsets, alone, self.chunk_bytes)
        self._cache[key] = (layout, result)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result
