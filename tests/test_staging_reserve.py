"""Staging buffers allocated in the background (issue 10.3): from construction (or from the first optimizer
step, when the optimizer has no state before it), every slot is allocated for an estimate of the state, so the
first save only copies; the pool reports allocation throughput."""
from __future__ import annotations

import threading

import pytest
import torch

from asyncckpt.staging import StagingPool
from asyncckpt.state import flatten

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_first_save_after_background_allocation_allocates_nothing(max_inflight, save_dir, make_trainer, make_saver):
    t = make_trainer()
    saver = make_saver(t, max_inflight=max_inflight)
    pool = saver.engine.pool
    pool.wait_reserved(30)
    assert pool.allocations == 0  # the optimizer has no state yet: nothing reserved before the first step
    t.train(1)  # the first step: its state exists now
    pool.wait_reserved(30)
    assert pool.allocations == max_inflight and all(s.capacity > 0 for s in pool.slots)
    res = saver.save_checkpoint(save_dir, tag="first").result(timeout=30)
    assert pool.allocations == max_inflight  # the first save used the buffers allocated in the background
    assert pool.slots[0].capacity >= res.raw_bytes
    stats = pool.stats()
    assert stats["allocations"] == max_inflight and stats["allocated_bytes"] == pool.staging_bytes
    assert stats["allocation_bytes_per_s"] > 0 and stats["pinning_bytes_per_s"] is None  # no CUDA: not pinned


def test_optimizer_with_state_reserves_from_construction(save_dir, make_trainer, make_saver):
    t = make_trainer()
    t.train(1)
    saver = make_saver(t)
    saver.engine.pool.wait_reserved(30)
    assert saver.engine.pool.allocations == 1
    saver.save_checkpoint(save_dir).result(timeout=30)
    assert saver.engine.pool.allocations == 1


def test_a_save_waits_for_the_allocation_under_way_and_uses_it():
    """The first save finds its slot's allocation under way: it waits for it instead of allocating one of
    its own (a stand-in estimate holds the allocation back until the save has started)."""
    items = flatten({"w": torch.randn(1000), "b": torch.randn(10)}).items
    pool = StagingPool(1, pin=False)
    started, go = threading.Event(), threading.Event()

    def estimate() -> int:
        started.set()
        assert go.wait(30)
        return 1 << 20

    try:
        pool.reserve(estimate)
        assert started.wait(30)
        slot = pool.acquire("wait")
        staged = threading.Thread(target=slot.stage, args=(items,))
        staged.start()
        go.set()
        staged.join(30)
        assert not staged.is_alive()
        assert pool.allocations == 1 and slot.capacity == 1 << 20
        assert torch.equal(slot.buffer[:4000].view(torch.float32),
                           items[0].src)
    finally:
        go.set()
        pool.close()


def test_a_budget_smaller_than_the_estimate_reserves_nothing():
    pool = StagingPool(2, pin=False, budget_bytes=1 << 20)
    try:
        pool.reserve(lambda: 1 << 20)  # x 2 slots > budget
        pool.wait_reserved(30)
        assert pool.allocations == 0
    finally:
        pool.close()
