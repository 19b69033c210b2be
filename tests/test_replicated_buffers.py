"""Replicated state that ranks change locally (module buffers: BatchNorm running statistics) is saved as one
rank holds it, never as a patchwork of layers from different ranks."""
from __future__ import annotations

import pytest
import torch

import buffer_workers as bw
from asyncckpt.placement import assign_replicated
from dist_helpers import assert_all_ok, forkserver_context, run_ranks

pytestmark = pytest.mark.multirank


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_rank_loads_the_buffers_of_rank_0(tmp_path):
    out = assert_all_ok(run_ranks(bw.save_then_load, 2, str(tmp_path), str(tmp_path / "ckpt"),
                                  ctx=forkserver_context()))
    assert not _equal(out[0]["saved"], out[1]["saved"])  # the ranks really disagree
    for r in out:
        assert _equal(r["loaded"], out[0]["saved"]), r


def test_with_node_local_storage_each_node_saves_its_first_ranks_buffers(tmp_path):
    out = assert_all_ok(run_ranks(bw.save_then_load, 4, str(tmp_path), str(tmp_path / "ckpt"), 2,
                                  ctx=forkserver_context()))
    for rank, r in enumerate(out):
        first = out[rank - rank % 2]["saved"]
        assert _equal(r["loaded"], first), rank


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_pinned_tensors_go_to_rank_0_and_the_rest_stays_balanced(world):
    sizes = [100, 40, 40, 30, 8, 8, 8, 1]
    pinned = {1, 4, 7}
    owners = assign_replicated(sizes, world, pinned)
    assert all(owners[i] == 0 for i in pinned)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]
    free = [i for i in range(len(sizes)) if i not in pinned]
    assert max(load) - min(load) <= max(sizes[i] for i in free) + sum(sizes[i] for i in pinned)
    assert owners == assign_replicated(sizes, world, pinned)  # the same answer on every rank
