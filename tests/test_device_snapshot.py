"""Device-resident snapshot (issue 10, item 2): ``snapshot_device: auto | always | never``. The state is
copied into one flat device buffer (allocated once, reused), the training side waits only for that copy
(eager: the training stream waits on it; lazy: the optimizer-step / forward hooks settle it), and the buffer
drains to the host in the background through the slot's small ring of host segments, so host staging memory
is the ring, never the state.

Without a GPU the drain is exercised through the device-memory seam (``StagingPool.device_memory``): a CPU
tensor stands in for the device buffer. The CUDA tests at the end run only where CUDA exists."""
from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

import asyncckpt
from asyncckpt import ConfigError, StateMismatchError
from asyncckpt.staging import DeviceMemory, copy_into

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.thread_only("a device snapshot drains through the ring of the training process's own writer; "
                                      "service mode refuses snapshot_device: always and stages on the host (README)")]

BUDGET_MIB = 0.125  # host ring: 4 segments of 32 KiB (FAST's chunks are 16 KiB)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class StandIn(DeviceMemory):
    """The "device" is the CPU: every state has one; ``free`` bytes are free; allocations are counted."""

    def __init__(self, free: int = 1 << 40):
        self.free = free
        self.allocated: list[int] = []

    def device_of(self, items):
        return torch.device("cpu") if any(i.nbytes for i in items) else None

    def free_bytes(self, device):
        return self.free

    def allocate(self, nbytes, device):
        self.allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


def trained(device: str = "cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 64)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    step(model, opt)
    return model, opt


def step(model, opt) -> None:
    device = next(model.parameters()).device
    model(torch.randn(8, 64, device=device)).sum().backward()
    opt.step()
    opt.zero_grad()


def state_of(model, opt) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v
            for k, v in copy.deepcopy({**{f"m/{n}": t for n, t in model.state_dict().items()},
                                       **{f"o/{p}/{n}": t for p, s in opt.state_dict()["state"].items()
                                          for n, t in s.items()}}).items()}


def saved_state(save_dir: str, tag: str) -> dict:
    loaded = asyncckpt.load(save_dir, tag)
    return {**{f"m/{n}": t for n, t in loaded["module"].items()},
            **{f"o/{p}/{n}": t for p, s in loaded["optimizer"]["state"].items() for n, t in s.items()}}


def assert_bit_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].cpu(), b[k].cpu()  # load restores CUDA tensors on their device
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def nbytes_of(model, opt) -> int:
    return sum(t.numel() * t.element_size() for t in state_of(model, opt).values() if isinstance(t, torch.Tensor))


def standin_saver(make_saver, model, opt, free: int = 1 << 40, **over):
    saver = make_saver(model, opt, writer={"memory_budget_mib": BUDGET_MIB}, **over)
    saver.engine.pool.device_memory = memory = StandIn(free)
    return saver, memory


# ----------------------------------------------------------------------------- the drain, on a stand-in device
@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
def test_a_device_snapshot_drains_through_the_ring_bit_exact_reusing_one_buffer(make_saver, save_dir, snapshot):
    model, opt = trained()
    saver, memory = standin_saver(make_saver, model, opt, snapshot=snapshot, snapshot_device="always")
    for i in range(3):
        expected = state_of(model, opt)
        fut = saver.save_checkpoint(save_dir, tag=f"t{i}")
        step(model, opt)  # right after the call: the optimizer step (lazy: its hook settles the snapshot)...
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # ...and an in-place change after it
        result = fut.result(30)
        assert result.staging_peak_bytes <= BUDGET_MIB * 2**20 < nbytes_of(model, opt)
        assert_bit_exact(saved_state(save_dir, f"t{i}"), expected)
    assert len(memory.allocated) == 1 and saver.engine.pool.slots[0].device_allocations == 1  # drained; reused
    stats = saver.engine.pool.stats()
    assert stats["staging_bytes"] <= BUDGET_MIB * 2**20  # no full-size host buffer
    assert stats["device_snapshot_bytes"] == memory.allocated[0] >= nbytes_of(model, opt)


def test_a_lazy_device_snapshot_changed_where_no_hook_saw_is_not_published(make_saver, save_dir):
    model, opt = trained()
    saver, _ = standin_saver(make_saver, model, opt, snapshot="lazy", snapshot_device="always")
    released = threading.Event()
    caller = threading.current_thread()

    def held(dst, src):  # the background copies into the device buffer wait for the test
        if threading.current_thread() is not caller and not released.wait(30):
            raise TimeoutError("never released")
        copy_into(dst, src)

    saver.engine.pool.copier = held
    fut = saver.save_checkpoint(save_dir, tag="t")
    with torch.no_grad():
        model[0].weight.add_(1)  # before the snapshot was settled, where no hook sees it
    released.set()
    with pytest.raises(StateMismatchError, match="0.weight"):
        fut.result(30)
    assert not os.path.exists(os.path.join(save_dir, "t"))


def test_auto_falls_back_to_host_staging_when_the_headroom_leaves_no_room(make_saver, save_dir):
    model, opt = trained()
    saver, memory = standin_saver(make_saver, model, opt, free=1 << 30, snapshot_device="auto",
                                  snapshot_device_headroom_mib=1024.0 + 1)
    expected = state_of(model, opt)
    result = saver.save_checkpoint(save_dir, tag="t").result(30)
    assert memory.allocated == []  # the host ring of the budget, not a device drain
    assert result.staging_peak_bytes <= BUDGET_MIB * 2**20
    assert_bit_exact(saved_state(save_dir, "t"), expected)


def test_always_refuses_a_save_that_does_not_fit_naming_the_key(make_saver, save_dir):
    model, opt = trained()
    saver, _ = standin_saver(make_saver, model, opt, free=1 << 30, snapshot_device="always",
                             snapshot_device_headroom_mib=1024.0 + 1)
    with pytest.raises(ConfigError, match="snapshot_device.*headroom"):
        saver.save_checkpoint(save_dir, tag="t")
    assert len(saver.engine.pool._free) == len(saver.engine.pool.slots)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only state")
def test_always_refuses_a_cpu_only_state_and_auto_and_never_stage_on_the_host(make_saver, save_dir):
    model, opt = trained()
    with pytest.raises(ConfigError, match="snapshot_device.*no CUDA tensor"):
        make_saver(model, opt, snapshot_device="always").save_checkpoint(save_dir, tag="t")
    for mode in ("auto", "never"):
        saver = make_saver(model, opt, snapshot_device=mode)
        saver.save_checkpoint(save_dir, tag=mode).result(30)
        assert saver.engine.pool.slots[0].device_allocations == 0


@pytest.mark.parametrize("key,value", [("snapshot_device", "sometimes"), ("snapshot_device", True),
                                       ("snapshot_device_headroom_mib", -1), ("snapshot_device_headroom_mib", "1G")])
def test_bad_device_snapshot_keys_are_refused_naming_them(key, value):
    with pytest.raises(ConfigError, match=key):
        asyncckpt.Config.from_dict({key: value})


# ------------------------------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
def test_cuda_device_snapshot_is_bit_exact_and_reuses_its_buffer(make_saver, save_dir, snapshot):
    model, opt = trained("cuda")
    saver = make_saver(model, opt, snapshot=snapshot, snapshot_device="always", snapshot_device_headroom_mib=0.0,
                       writer={"memory_budget_mib": BUDGET_MIB})
    for i in range(2):
        expected = state_of(model, opt)
        fut = saver.save_checkpoint(save_dir, tag=f"t{i}")
        step(model, opt)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        result = fut.result(60)
        ring = BUDGET_MIB * 2**20
        assert result.staging_peak_bytes <= ring * 1.05
        assert_bit_exact(saved_state(save_dir, f"t{i}"), expected)
    pool = saver.engine.pool
    assert pool.slots[0].device_allocations == 1
    assert pool.stats()["staging_bytes"] <= BUDGET_MIB * 2**20 * 1.05  # the ring only: no full-size pinned buffer
    assert all(s.buffer is None for s in pool.slots)
    assert pool.slots[0]._ring_host.tensor.is_pinned()


@cuda
def test_cuda_device_snapshot_without_a_budget_holds_only_the_default_ring(make_saver, save_dir):
    from asyncckpt.staging import DEVICE_RING_BYTES
    model, opt = trained("cuda")
    saver = make_saver(model, opt, snapshot="eager", snapshot_device="always", snapshot_device_headroom_mib=0.0)
    result = saver.save_checkpoint(save_dir, tag="t").result(60)
    assert result.staging_peak_bytes <= DEVICE_RING_BYTES * 1.05
    assert saver.engine.pool.stats()["staging_bytes"] <= DEVICE_RING_BYTES * 1.05


@cuda
def test_cuda_lazy_device_snapshot_refuses_a_torn_state(make_saver, save_dir):
    model, opt = trained("cuda")
    saver = make_saver(model, opt, snapshot="lazy", snapshot_device="always", snapshot_device_headroom_mib=0.0,
                       writer={"memory_budget_mib": BUDGET_MIB})
    fut = saver.save_checkpoint(save_dir, tag="t")
    with torch.no_grad():
        model[0].weight.add_(1)  # no hook sees this: its version counter does
    with pytest.raises(StateMismatchError, match="0.weight"):
        fut.result(60)
    assert not os.path.exists(os.path.join(save_dir, "t"))


@cuda
def test_cuda_auto_falls_back_to_host_staging_when_the_headroom_is_too_large(make_saver, save_dir):
    model, opt = trained("cuda")
    saver = make_saver(model, opt, snapshot_device="auto", snapshot_device_headroom_mib=float(1 << 30))
    expected = state_of(model, opt)
    fut = saver.save_checkpoint(save_dir, tag="t")
    step(model, opt)
    fut.result(60)
    assert saver.engine.pool.slots[0].device_allocations == 0
    assert saver.engine.pool.slots[0].buffer is not None  # the full-size host buffer of host staging
    assert_bit_exact(saved_state(save_dir, "t"), expected)
    with pytest.raises(ConfigError, match="snapshot_device"):
        make_saver(model, opt, snapshot_device="always",
                   snapshot_device_headroom_mib=float(1 << 30)).save_checkpoint(save_dir, tag="u")
