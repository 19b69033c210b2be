"""Every single-byte flip and every truncation of a checkpoint file is detected, by ``verify`` and by ``load``.

A small multi-tensor checkpoint is saved with compression on (raw, zstd and byte-shuffled chunks) and off
(raw only). For seeded positions in each data file, rank index and manifest, one byte is XORed with a seeded
non-zero mask (or the file is cut at a seeded length); then ``CheckpointReader(...).verify()`` and
``asyncckpt.load`` must both raise :class:`CorruptCheckpointError` (or its subclass
:class:`UnsafeCheckpointError`) naming the file, and for data files the chunk and the tensor that chunk holds.
Detection must be 100%. Flips in ``latest`` must give a clear error as well.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from reliability import record

SEED = 1234
DATA_FLIPS = 100  # per data file
META_FLIPS = 40  # per rank index and manifest
TRUNCATIONS = 12  # per file, plus empty, one byte and all but one byte


def make_state() -> dict:
    g = torch.Generator().manual_seed(7)
    shared = torch.randn(4096, generator=g)
    return {
        "smooth": torch.linspace(0, 1, 12000),  # float planes: shuffled, exponent planes compressed
        "pattern": (torch.arange(40000) % 7).to(torch.uint8),  # bytes that compress: zstd
        "noise": torch.randint(0, 256, (20000,), dtype=torch.uint8, generator=g),  # incompressible: raw
        "weights": torch.randn(6000, generator=g),  # shuffled, mantissa planes raw
        "steps": torch.arange(3000, dtype=torch.int64),
        "mask": torch.rand(5000, generator=g) > 0.5,
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "view_a": shared[:2048],  # two views of one storage: a storage record and two view records
        "view_b": shared[1024:],
        "meta": {"step": 7, "name": "corruption"},
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two pristine checkpoints (compression on and off) and a scratch copy of each to damage."""
    root = tmp_path_factory.mktemp("corruption")
    out = {}
    for compression in (True, False):
        name = "zstd" if compression else "raw"
        pristine = str(root / f"pristine-{name}")
        cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1 / 64, "compression": compression},
                                          "writer": {"threads_per_node": 1}})
        asyncckpt.save(make_state(), pristine, "t", config=cfg).result(30)
        out[name] = pristine
    asyncckpt.wait_all(30)
    return out


def _codecs(save_dir: str) -> set[str]:
    with open(os.path.join(save_dir, "t", "rank00000.json")) as f:
        index = json.load(f)
    return {c["codec"] for t in index["tensors"].values() for c in t.get("chunks", [])}


def _chunk_at(save_dir: str, name: str, pos: int) -> tuple[str, int]:
    """The tensor key and chunk number whose stored bytes hold byte ``pos`` of data file ``name``."""
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    for key, recs in reader.records.items():
        for _, rec in recs:
            if rec.file != name:
                continue
            for i, c in enumerate(rec.chunks):
                if c.offset <= pos < c.offset + c.length:
                    return key, i
    raise AssertionError(f"byte {pos} of {name} belongs to no chunk")


def _expect_detected(save_dir: str, path: str, chunk: tuple[str, int] | None) -> None:
    """verify() and load() both raise CorruptCheckpointError naming ``path`` (and the chunk and tensor)."""
    for what in ("verify", "load"):
        with pytest.raises(CorruptCheckpointError) as info:
            if what == "verify":
                asyncckpt.CheckpointReader(save_dir, "t", threads=1).verify()
            else:
                asyncckpt.load(save_dir)
        msg = str(info.value)
        name = os.path.basename(path)
        assert re.search(rf"(^|/| ){re.escape(name)}\b", msg), f"{what}: the error does not name {name}: {msg}"
        if chunk is not None:
            key, i = chunk
            assert re.search(rf"chunk {i}\b.*tensor {re.escape(repr(key))}", msg), f"{what}: expected chunk {i} of {key!r}: {msg}"


def _positions(rng: random.Random, size: int, n: int) -> list[tuple[int, int]]:
    """(byte, xor mask): the first and last byte and ``n - 2`` more, distinct, with random non-zero masks."""
    inner = rng.sample(range(1, size - 1), min(n - 2, size - 2))
    return [(pos, rng.randrange(1, 256)) for pos in sorted({0, size - 1, *inner})]


def _zstd_frame_flips(save_dir: str, name: str) -> list[tuple[int, int]]:
    """Flips in the header of every zstd frame, where some bits change nothing the decoder looks at: the
    frame header descriptor's unused bit (0x10) decodes to the very same bytes."""
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    starts = []
    for recs in reader.records.values():
        for _, rec in recs:
            for c in rec.chunks if rec.file == name else ():
                if c.codec == "zstd":
                    starts.append(c.offset)
                elif c.codec == "shuffle":
                    pos = c.offset
                    for codec, length in c.planes:
                        if codec == "zstd":
                            starts.append(pos)
                        pos += length
    return [(start + 4, mask) for start in starts for mask in (0x10, 0x01, 0x20)]


@pytest.mark.parametrize("codec", ["zstd", "raw"])
@pytest.mark.parametrize("kind", ["data", "index", "manifest"])
def test_every_flip_and_truncation_is_detected(checkpoints, tmp_path, codec, kind):
    pristine = checkpoints[codec]
    if codec == "zstd":
        assert _codecs(pristine) == {"raw", "zstd", "shuffle"}
    else:
        assert _codecs(pristine) == {"raw"}
    work = str(tmp_path / "work")
    shutil.copytree(pristine, work)
    name = {"data": "rank00000-0.bin", "index": "rank00000.json", "manifest": "manifest.json"}[kind]
    path = os.path.join(work, "t", name)
    with open(path, "rb") as f:
        original = f.read()
    rng = random.Random(f"{SEED}-{codec}-{kind}")
    flips = truncs = detected_flips = detected_truncs = 0
    cases = _positions(rng, len(original), DATA_FLIPS if kind == "data" else META_FLIPS)
    n_random = len(cases)
    if kind == "data" and codec == "zstd":
        frames = _zstd_frame_flips(work, name)
        assert len(frames) >= 15
        cases += frames
    try:
        for pos, mask in cases:
            chunk = _chunk_at(work, name, pos) if kind == "data" else None
            with open(path, "r+b") as f:
                f.seek(pos)
                f.write(bytes([original[pos] ^ mask]))
            flips += 1
            try:
                _expect_detected(work, path, chunk)
            except BaseException as exc:
                raise AssertionError(f"flip of byte {pos} with mask {mask:#04x} in {name}: {exc}") from exc
            finally:
                with open(path, "r+b") as f:
                    f.seek(pos)
                    f.write(original[pos:pos + 1])
            detected_flips += 1
        lengths = {0, 1, len(original) - 1} | {rng.randrange(1, len(original)) for _ in range(TRUNCATIONS)}
        for length in sorted(lengths):
            with open(path, "r+b") as f:
                f.truncate(length)
            truncs += 1
            try:
                _expect_detected(work, path, None)
            except BaseException as exc:
                raise AssertionError(f"truncation of {name} to {length} bytes: {exc}") from exc
            finally:
                with open(path, "wb") as f:
                    f.write(original)
            detected_truncs += 1
        # the restored copy is intact again: the damage, not the harness, was detected
        assert asyncckpt.CheckpointReader(work, "t").verify()["chunks"] > 0
    finally:
        label = {"data": "data file", "index": "rank index", "manifest": "manifest"}[kind]
        chunks = "raw, zstd and shuffle chunks" if codec == "zstd" else "raw chunks"
        named = "the file, chunk and tensor" if kind == "data" else "the file"
        extra = f"; {len(cases) - n_random} of them in zstd frame headers" if len(cases) > n_random else ""
        record("Corruption", f"single-byte flip: {label} ({chunks})", flips, detected_flips,
               note=f"verify() and load() both raise, naming {named}{extra}")
        record("Corruption", f"truncation: {label} ({chunks})", truncs, detected_truncs,
               note="verify() and load() both raise, naming the file")


def test_flips_and_truncations_of_latest(checkpoints, tmp_path):
    """``latest`` names the tag to load: any damage gives a clear CheckpointError that names the latest file
    (a corrupt name, or a tag that does not exist) instead of loading something else silently. With one
    tag in the directory no flip can name another existing tag; that case (two tags one byte apart) is
    undetectable in a plain-text ``latest`` and is not claimed."""
    work = str(tmp_path / "work")
    shutil.copytree(checkpoints["zstd"], work)
    path = os.path.join(work, "latest")
    with open(path, "rb") as f:
        original = f.read()
    assert original == b"t\n"
    cases = detected = 0
    try:
        damaged = [bytes([original[0] ^ m]) + original[1:] for m in range(1, 256)]
        damaged += [original[:1] + bytes([original[1] ^ m]) for m in range(1, 256)]
        damaged += [b"", b"t"]  # truncations
        for data in damaged:
            with open(path, "wb") as f:
                f.write(data)
            cases += 1
            for what in ("reader", "load"):
                with pytest.raises(CheckpointError) as info:
                    if what == "reader":
                        asyncckpt.CheckpointReader(work)
                    else:
                        asyncckpt.load(work)
                assert isinstance(info.value, (CorruptCheckpointError, CheckpointNotFoundError)), repr(info.value)
                assert "latest" in str(info.value), f"{data!r}: {info.value}"
            detected += 1
    finally:
        with open(path, "wb") as f:
            f.write(original)
        record("Corruption", "single-byte flip or truncation: latest", cases, detected,
               note="every mask at every byte of a one-tag directory; a clear error naming the latest file")
    assert np.isfinite(asyncckpt.load(work)["smooth"].numpy()).all()
