"""CUDA staging path: pinned host buffers, side-stream copies, events the writer waits on.
Skipped without CUDA (this project's CI machine has none; a GPU machine runs them)."""
from __future__ import annotations

import threading

import pytest
import torch

import asyncckpt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()


def test_buffers_are_pinned_and_reused(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with asyncckpt.AsyncCheckpointer(model, opt, config={"snapshot_device": "never"}) as saver:
        model(torch.randn(4, 256, device="cuda")).sum().backward()
        opt.step()
        saver.save_checkpoint(tmp_path, tag="a").result(60)
        allocations = saver.engine.pool.allocations
        saver.save_checkpoint(tmp_path, tag="b").result(60)
        assert saver.engine.pool.allocations == allocations
        assert all(s.buffer.is_pinned() for s in saver.engine.pool.slots if s.buffer is not None)


@pytest.mark.parametrize("snapshot_device", ["never", "always"])
def test_inplace_update_after_save_does_not_leak_into_checkpoint(tmp_path, snapshot_device):
    """The next optimizer step is queued on the training stream right after save_checkpoint returns; the
    side-stream copy (host staging, or the device snapshot) must still see the pre-step values."""
    model = _model()
    big = torch.nn.Parameter(torch.randn(64 << 20 >> 2, device="cuda"))  # 64 MiB: the copy takes a while
    model.register_parameter("big", big)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    gate = threading.Event()
    with asyncckpt.AsyncCheckpointer(model, None, config={"snapshot_device": snapshot_device}) as saver:
        orig = saver.engine.writer.write_rank

        async def gated(**kw):
            gate.wait(30)
            return await orig(**kw)

        saver.engine.writer.write_rank = gated
        fut = saver.save_checkpoint(tmp_path, tag="t")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1).add_(7)  # in place, on the training stream, right away
        gate.set()
        fut.result(120)
    state = asyncckpt.load(tmp_path, "t", map_location="cpu")
    for k, v in expected.items():
        assert torch.equal(state["module"][k], v), k


def test_load_restores_cuda_device_and_map_location(tmp_path):
    model = _model()
    with asyncckpt.AsyncCheckpointer(model, None) as saver:
        saver.save_checkpoint(tmp_path, tag="t").result(60)
    state = asyncckpt.load(tmp_path, "t")
    assert all(v.is_cuda for v in state["module"].values())
    state = asyncckpt.load(tmp_path, "t", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["module"].values())
    for k, v in model.state_dict().items():
        assert torch.equal(state["module"][k], v.cpu())


def test_bf16_and_float8_on_cuda_round_trip(tmp_path):
    state = {"bf16": torch.randn(1000, device="cuda").bfloat16(),
             "f8": torch.randn(1000, device="cuda").to(torch.float8_e4m3fn),
             "nc": torch.randn(64, 64, device="cuda").t()}
    asyncckpt.save(state, tmp_path, "t").result(60)
    back = asyncckpt.load(tmp_path, "t")
    for k, v in state.items():
        assert back[k].device == v.device
        assert torch.equal(back[k].view(torch.uint8) if v.element_size() == 1 else back[k].float(),
                           v.view(torch.uint8) if v.element_size() == 1 else v.float()), k


def test_state_larger_than_one_pinned_registration_stages_bit_exact(tmp_path):
    """The staging buffer is pinned in chunks of RESERVE_CHUNK_BYTES (one cudaHostRegister each); tensors that
    straddle a chunk boundary (a large one, a non-contiguous one, small ones around it) must still copy: one
    asynchronous copy may not span two registrations."""
    from asyncckpt.staging import RESERVE_CHUNK_BYTES

    n = (RESERVE_CHUNK_BYTES + (3 << 20)) // 4  # crosses the first boundary
    state = {"a_small": torch.arange(11, device="cuda"),
             "b_big": torch.randn(n, device="cuda"),
             "c_nc": torch.randn(1 << 12, 1 << 13, device="cuda").t(),  # 128 MiB, non-contiguous, crosses the next
             "d_tail": torch.randn(5, device="cuda")}
    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2).cuda(), None, config={"snapshot_device": "never"}) as saver:
        saver.save_checkpoint(tmp_path, tag="t", client_state={"s": state}).result(120)
        assert all(s.buffer.is_pinned() for s in saver.engine.pool.slots if s.buffer is not None)
    back = asyncckpt.load(tmp_path, "t")["client_state"]["s"]
    for k, v in state.items():
        assert back[k].device == v.device and torch.equal(back[k], v), k
