"""Load metadata whose cost per loading rank does not grow with the world size (format v3, docs/FORMAT.md
section 15): the *rank table*, one fixed-width row per saved rank (its index's checksum and size), and the
*owner table*, which says, for every tensor key, which ranks hold a record of it and, for shards, which box
of the global tensor each holds.

The publisher builds both from the rank indices of the save (:func:`write_tables`); a reader looks rows up by
byte range (:class:`RankTable`, :class:`OwnerTable`), so a rank reads the manifest, one row of the rank table,
its own index and, only when it needs tensors saved by other ranks, the owner rows of those tensors (a binary
search) and the indices of the ranks that hold them.

Everything a reader takes from these tables is a hint it checks against sealed documents: a rank table row
carries its own checksum and the checksum of the index it names; an owner row only says which index to open,
and the records found there must cover what is read exactly once (the loader checks), so damage can only make
a load fail, never load other bytes. ``asyncckpt verify`` checks both tables against every index.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable

from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .format import (MANIFEST, MAX_JSON_BYTES, OWNER_KEYS, OWNER_ROWS, RANK_TABLE, checksum, parse_owner_keys, rank_index_name, seal,
                     unseal)
from .storage import Storage, open_storage

ROW = 66  # rank table: "%010d %16s %020d %16s\n": rank, index xxh3, bytes, xxh3 of the row's first 49 bytes
_ROW_BODY = 49
_INT = struct.Struct("<q")


def rank_row(rank: int, index_xxh3: str, nbytes: int) -> bytes:
    body = f"{rank:010d} {index_xxh3} {nbytes:020d} ".encode()
    return body + checksum(body).encode() + b"\n"


def parse_rank_row(row: bytes, where: str) -> tuple[int, str, int]:
    """(rank, index xxh3, bytes) of one rank table row, after checking its own checksum."""
    if len(row) != ROW or row[-1:] != b"\n" or checksum(row[:_ROW_BODY]).encode() != row[_ROW_BODY:-1]:
        raise CorruptCheckpointError(f"{where}: checksum mismatch (the row was modified or is corrupt)")
    try:
        text = row[:_ROW_BODY].decode("ascii")
        rank, xxh, nbytes = text[:10], text[11:27], text[28:48]
        if not (rank.isdigit() and nbytes.isdigit() and text[10] == text[27] == text[48] == " "
                and all(c in "0123456789abcdef" for c in xxh)):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise UnsafeCheckpointError(f"{where}: not a rank table row") from None
    return int(rank), xxh, int(nbytes)


# ------------------------------------------------------------------------------------------- publisher
def write_tables(tag_dir: str, entries: Iterable[tuple[int, str, str, int]], fsync: bool, tolerant: bool = False,
                 storage: Storage | None = None) -> dict:
    """Write the rank table and the owner table of a save into ``tag_dir`` (the partial directory, before the
    manifest) through ``storage`` (default: the one of ``tag_dir``), from the rank entries ``(rank, index name, index xxh3, bytes)`` of the
    ranks whose files are there, and return the manifest's fields that describe them. Each index is read
    once, here, by the publisher; its bytes must have the checksum its rank reported. ``tolerant``: records
    that cannot be read are left out (:func:`restamp` of a forged index)."""
    st = storage if storage is not None else open_storage(tag_dir)
    entries = sorted(entries)
    rows = b"".join(rank_row(rank, xxh, nbytes) for rank, _, xxh, nbytes in entries)
    holders: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]] | None]] = {}
    shards: dict[str, bool] = {}
    for rank, name, xxh, _ in entries:
        path = st.join(tag_dir, name)
        data = st.read_bytes(path, MAX_JSON_BYTES)
        if data is None or checksum(data) != xxh:
            raise CorruptCheckpointError(f"{path}: changed after rank {rank} reported it")
        for key, shard, box in _holdings(data, path, tolerant):
            shards[key] = shards.get(key, shard) and shard
            holders.setdefault(key, []).append((rank, *box))
    keys: dict[str, dict] = {}
    table = bytearray()
    for key, found in holders.items():
        ndims = {len(off) for _, off, _ in found}
        if shards[key] and len(ndims) == 1:
            (ndim,) = ndims
            found.sort(key=lambda h: (h[1], h[0]))
            keys[key] = {"at": len(table), "rows": len(found), "ndim": ndim}
            for rank, off, shape in found:
                table += b"".join(_INT.pack(v) for v in (rank, *off, *shape))
        else:
            keys[key] = {"at": len(table), "rows": len(found)}
            table += b"".join(_INT.pack(rank) for rank in sorted({h[0] for h in found}))
    sealed = seal({"keys": keys})
    for name, data in ((RANK_TABLE, rows), (OWNER_ROWS, bytes(table)), (OWNER_KEYS, sealed)):
        st.write_durable(st.join(tag_dir, name), data, fsync)
    return {"rank_table": {"rows": len(entries), "xxh3": checksum(rows)},
            "owners": {"xxh3": checksum(sealed), "rows_bytes": len(table), "rows_xxh3": checksum(bytes(table))}}


def _holdings(data: bytes, where: str, tolerant: bool) -> list[tuple[str, bool, tuple[tuple, tuple]]]:
    """(key, is a shard, (global offset, shape)) of every record of an index but pack storages (read only
    through the packed views of the same index)."""
    try:
        tensors = json.loads(data)["tensors"]
        packs = {t["base"] for t in tensors.values() if t.get("packed")}
        out = []
        for key, t in tensors.items():
            try:
                if key not in packs:
                    out.append((key, "global_shape" in t, (tuple(t.get("global_offset", ())), tuple(t["shape"]))))
            except (AttributeError, KeyError, TypeError):
                if not tolerant:
                    raise
        return out
    except (ValueError, AttributeError, KeyError, TypeError):
        if tolerant:
            return []
        raise CorruptCheckpointError(f"{where}: not a rank index") from None


# ---------------------------------------------------------------------------------------------- reader
ReadRange = Callable[[str, int, int], bytes]  # (file name, offset, length) -> exactly those bytes


class RankTable:
    """Rows of ``ranks.tbl`` by rank, each read by its byte range: row ``r`` when every rank is listed, else a
    binary search (a node-local copy lists its node's ranks)."""

    def __init__(self, manifest: dict, read: ReadRange, size: int, where: str):
        self.rows = manifest["rank_table"]["rows"]
        self.world = manifest["world_size"]
        self._read, self._where = read, where
        if size != self.rows * ROW:
            raise CorruptCheckpointError(f"{where}: {size} bytes, expected {self.rows} rows of {ROW}")
        self._cache: dict[int, tuple[int, str, int]] = {}

    def row(self, i: int) -> tuple[int, str, int]:
        if i not in self._cache:
            got = parse_rank_row(self._read(RANK_TABLE, i * ROW, ROW), f"{self._where} row {i}")
            if got[0] >= self.world:
                raise UnsafeCheckpointError(f"{self._where} row {i}: rank {got[0]} of a world of {self.world}")
            self._cache[i] = got
        return self._cache[i]

    def find(self, rank: int) -> tuple[str, int] | None:
        """(index xxh3, bytes) of ``rank``, or None when this copy does not hold it."""
        if not 0 <= rank < self.world:
            return None
        if self.rows == self.world:  # every rank listed, in order
            got = self.row(rank)
            if got[0] != rank:
                raise UnsafeCheckpointError(f"{self._where} row {rank}: holds rank {got[0]} (rows must be in rank order)")
            return got[1], got[2]
        lo, hi = 0, self.rows
        while lo < hi:
            mid = (lo + hi) // 2
            if self.row(mid)[0] < rank:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.rows and self.row(lo)[0] == rank:
            return self.row(lo)[1], self.row(lo)[2]
        return None

    def first(self) -> int:
        return self.row(0)[0]

    def all(self) -> list[tuple[int, str, int]]:
        """Every row, checked to be in strictly ascending rank order (inspect and verify)."""
        rows = [self.row(i) for i in range(self.rows)]
        for a, b in zip(rows, rows[1:]):
            if a[0] >= b[0]:
                raise UnsafeCheckpointError(f"{self._where}: rank {b[0]} listed after rank {a[0]}")
        return rows


Box = tuple[tuple[int, ...], tuple[int, ...]]


class OwnerTable:
    """Which ranks hold a record of a key (``owners.json``, read whole: one entry per key, whatever the world
    size) and, for sharded keys, the box each holds (``owners.tbl``, rows sorted by global offset, read by
    binary search)."""

    def __init__(self, data: bytes, read: ReadRange, rows_bytes: int, world: int, where: str):
        self.keys = parse_owner_keys(data, where, rows_bytes)
        self._read, self._world, self._where = read, world, os.path.join(os.path.dirname(where), OWNER_ROWS)
        self._rows: dict[tuple[str, int], tuple[int, tuple[int, ...], tuple[int, ...]]] = {}

    def row(self, key: str, i: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        if (key, i) not in self._rows:
            entry = self.keys[key]
            ndim = entry.get("ndim", 0)
            width = 8 * (1 + 2 * ndim) if "ndim" in entry else 8
            raw = self._read(OWNER_ROWS, entry["at"] + i * width, width)
            values = [_INT.unpack_from(raw, 8 * j)[0] for j in range(width // 8)]
            if not 0 <= values[0] < self._world or any(v < 0 for v in values):
                raise UnsafeCheckpointError(f"{self._where}: row {i} of {key!r} names rank {values[0]} or a negative box")
            self._rows[(key, i)] = (values[0], tuple(values[1:1 + ndim]), tuple(values[1 + ndim:]))
        return self._rows[(key, i)]

    def holders(self, key: str) -> list[int]:
        """Ranks holding ``key``, lowest first, for an unsharded key; only the first for a key of many rows is
        ever needed by a load (:meth:`first`)."""
        return [self.row(key, i)[0] for i in range(self.keys[key]["rows"])] if key in self.keys else []

    def first(self, key: str) -> int | None:
        return self.row(key, 0)[0] if key in self.keys and self.keys[key]["rows"] else None

    def overlapping(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> list[int]:
        """Ranks holding a shard of ``key`` that overlaps the box ``shape`` at ``offset``. Rows are sorted by
        offset, and a DTensor's shards form a grid, so the search narrows one dimension at a time; a table
        that is not sorted or not a grid makes the loader find too few shards and fail, never read others."""
        entry = self.keys.get(key)
        if entry is None or "ndim" not in entry or entry["ndim"] != len(offset):
            return []
        found: list[int] = []
        self._search(key, 0, 0, entry["rows"], offset, shape, found)
        return found

    def _search(self, key: str, dim: int, lo: int, hi: int, offset, shape, found: list[int]) -> None:
        if dim == len(offset) or lo >= hi:
            for i in range(lo, hi):  # one box (a shard saved by several ranks: each holds it)
                rank, off, shp = self.row(key, i)
                if all(o < a + n and a < o + s or n == 0 for o, s, a, n in zip(off, shp, offset, shape)):
                    found.append(rank)
                    return
            return
        at = lambda i: self.row(key, i)[1][dim]  # noqa: E731
        start = self._bisect(at, lo, hi, offset[dim] + 1) - 1  # the last group starting at or before the box
        start = lo if start < lo else self._bisect(at, lo, hi, at(start))
        end = self._bisect(at, lo, hi, offset[dim] + max(shape[dim], 1))  # groups starting before its end
        while start < end:
            group_end = self._bisect(at, start, end, at(start) + 1)
            self._search(key, dim + 1, start, group_end, offset, shape, found)
            start = group_end

    @staticmethod
    def _bisect(at: Callable[[int], int], lo: int, hi: int, value: int) -> int:
        """The first row in [lo, hi) whose value is >= ``value`` (hi when none)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) < value:
                lo = mid + 1
            else:
                hi = mid
        return lo


def check_tables(owners: OwnerTable, records: dict[str, list[tuple[int, Any]]], packs: set[str], where: str) -> None:
    """``verify``: the owner table lists exactly the records of every index (pack storages excepted), with the
    box of every shard, in the order a search needs."""
    for key, recs in records.items():
        if key in packs:
            continue
        entry = owners.keys.get(key)
        if entry is None:
            raise UnsafeCheckpointError(f"{where}: the owner table does not list {key!r}")
        rows = [owners.row(key, i) for i in range(entry["rows"])]
        if "ndim" in entry:
            want = sorted((tuple(rec.global_offset), tuple(rec.shape), r) for r, rec in recs)
            got = [(off, shp, rank) for rank, off, shp in rows]
        else:
            want = sorted({r for r, _ in recs})
            got = [rank for rank, _, _ in rows]
        if got != want:
            raise UnsafeCheckpointError(f"{where}: the owner table's rows of {key!r} are not the records the "
                                        "rank indices hold (in order)")
    extra = set(owners.keys) - set(records)
    if extra:
        raise UnsafeCheckpointError(f"{where}: the owner table lists {sorted(extra)[0]!r}, which no index holds")


def restamp(tag_dir: str) -> None:
    """Make a tag directory's manifest and tables describe the rank indices on disk: each index's checksum and
    (format v3) the rank table (one row per ``rankNNNNN.json`` present; the bytes a rank wrote are kept, or
    counted anew for a rank not listed before) and the owner table, then re-seal the manifest, keeping its
    other fields. For tools that rewrite an index after publication (the conformance generator, tests that
    forge checkpoints)."""
    path = os.path.join(tag_dir, MANIFEST)
    with open(path, "rb") as f:
        manifest = unseal(f.read(), path)

    def index_xxh3(rank: int) -> str:
        with open(os.path.join(tag_dir, rank_index_name(rank)), "rb") as f:
            return checksum(f.read())

    if manifest["format_version"] < 3:
        for entry in manifest["ranks"]:
            entry["xxh3"] = index_xxh3(entry["rank"])
    else:
        old: dict[int, int] = {}
        if os.path.exists(os.path.join(tag_dir, RANK_TABLE)):
            with open(os.path.join(tag_dir, RANK_TABLE), "rb") as f:
                rows = f.read()
            old = {r: n for r, _, n in (parse_rank_row(rows[i: i + ROW], RANK_TABLE) for i in range(0, len(rows), ROW))}
        names = os.listdir(tag_dir)
        found = (re.fullmatch(r"rank(\d{5,})\.json", n) for n in names)
        ranks = sorted(int(m.group(1)) for m in found if m and m.group(0) == rank_index_name(int(m.group(1))))
        entries = []
        for rank in ranks:
            written = old.get(rank)
            if written is None:
                prefix = f"rank{rank:05d}"
                written = sum(os.path.getsize(os.path.join(tag_dir, n)) for n in names if n.startswith(prefix))
            entries.append((rank, rank_index_name(rank), index_xxh3(rank), written))
        manifest.update(write_tables(tag_dir, entries, fsync=False, tolerant=True))
    with open(path, "wb") as f:
        f.write(seal(manifest))
