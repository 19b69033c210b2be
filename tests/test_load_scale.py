"""Load metadata per rank does not grow with the world size (#13.10, #13.12 load half).

Checkpoints of 1,024 and 4,096 simulated FSDP ranks (tests/simulated_ranks.py: real sealed indices, the
publisher's tables, a real manifest; no processes) are loaded by a sample of ranks through the real reader:
same layout (each rank its own shards), and resharded to half the world size (each rank reads two old shards
per tensor). The reader counts the metadata bytes it reads and the files it opens; both must grow by at most
1.5x from 1,024 to 4,096 ranks. A format v2 reader read every rank's index on every rank (the 4x growth this
test would see).
"""
from __future__ import annotations

import os

import pytest
import torch

import simulated_ranks as sim
from asyncckpt import CheckpointReader
from asyncckpt.placement import DTensorInfo

SIZES = (1024, 4096)
SAMPLE = 6  # ranks loaded per world size, spread over the world (first, last, in between)


class SimulatedRank(CheckpointReader):
    """A reader loading as rank ``rank`` of ``world`` loading ranks would: each DTensor's rows split evenly
    over the loading world on dimension 0 (what FSDP2 does), without a device mesh."""

    def __init__(self, save_dir: str, rank: int, world: int):
        super().__init__(save_dir, sim.TAG)
        self.load_rank, self.load_world = rank, world

    def region_of(self, key: str, info: DTensorInfo, mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows = info.global_shape[0] // self.load_world
        return (rows, *info.global_shape[1:]), (self.load_rank * rows, 0)


def load_as(save_dir: str, rank: int, world: int) -> tuple[dict, int, int]:
    with SimulatedRank(save_dir, rank, world) as reader:
        state = reader.load_state(rank=rank)
        return state, reader.metadata_bytes_read, reader.files_opened


def sample(world: int) -> list[int]:
    return sorted({0, 1, world // 3, world // 2 + 1, world - 2, world - 1})[:SAMPLE]


def check(state: dict, rank: int, world: int, saved_world: int) -> None:
    rows = saved_world * sim.ROWS // world
    for key in sim.KEYS:
        part, name = key.split("/", 1)
        assert torch.equal(state[part][name], sim.full(key, saved_world)[rank * rows: (rank + 1) * rows]), key
    assert torch.equal(state["rng"], sim.rank_local(rank)) and torch.equal(state["table"], sim.TABLE)
    assert state["step"] == 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for world in SIZES:
        out[world] = str(root / f"w{world}")
        sim.write_checkpoint(out[world], world)
    return out


@pytest.mark.parametrize("layout", ["same", "resharded"])
def test_load_metadata_per_rank_does_not_grow_with_the_world_size(checkpoints, layout, capsys):
    figures = {}
    for saved in SIZES:
        world = saved if layout == "same" else saved // 2
        costs = []
        for rank in sample(world):
            state, meta, opened = load_as(checkpoints[saved], rank, world)
            check(state, rank, world, saved)
            costs.append((meta, opened))
        figures[saved] = (max(c[0] for c in costs), max(c[1] for c in costs))
    with capsys.disabled():
        print(f"\nload metadata per rank ({layout} layout): " + "; ".join(
            f"{w} ranks: {m} bytes read, {f} files opened" for w, (m, f) in figures.items()))
    (m1, f1), (m4, f4) = figures[SIZES[0]], figures[SIZES[1]]
    assert m4 <= 1.5 * m1, f"metadata bytes per rank grew {m4 / m1:.2f}x from {SIZES[0]} to {SIZES[1]} ranks"
    assert f4 <= 1.5 * f1, f"files opened per rank grew {f4 / f1:.2f}x"
    assert m4 < 64 * 1024  # a few indices, not thousands


def test_verify_still_checks_every_rank_and_the_tables(tmp_path):
    """verify reads everything: every index, every chunk, and the owner table against the indices (here on a
    smaller world: what it checks does not depend on the size)."""
    world = 256
    sim.write_checkpoint(str(tmp_path), world)
    with CheckpointReader(str(tmp_path), sim.TAG) as reader:
        counts = reader.verify()
        assert len(reader.indices) == world
    assert counts["tensors"] == world * (len(sim.KEYS) + 1) + 1


def test_a_forged_owner_row_makes_a_load_fail_never_read_other_bytes(tmp_path):
    """The owner table is a hint: a row naming the wrong rank for a shard (sealed documents all intact) makes
    a resharding load find shards that do not cover its region exactly once, and fail naming the tensor."""
    import struct

    from asyncckpt import UnsafeCheckpointError
    from asyncckpt.format import OWNER_KEYS, OWNER_ROWS, unseal

    tag_dir = sim.write_checkpoint(str(tmp_path), 8)
    with open(os.path.join(tag_dir, OWNER_KEYS), "rb") as f:
        entry = unseal(f.read(), OWNER_KEYS)["keys"][sim.KEYS[0]]
    with open(os.path.join(tag_dir, OWNER_ROWS), "r+b") as f:  # the first shard's row names rank 5
        f.seek(entry["at"])
        f.write(struct.pack("<q", 5))
    with pytest.raises(UnsafeCheckpointError, match="exactly once") as info:
        load_as(str(tmp_path), 0, 4)
    assert repr(sim.KEYS[0]) in str(info.value)
