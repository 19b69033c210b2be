"""Bounded host memory (issue 10, item 4): a state larger than ``writer.memory_budget_mib`` is staged and
written in waves through a ring of K fixed host segments instead of one full-size buffer. The file format is
unchanged (the same records, chunks and packs as a normal save), the load is bit-exact, the host staging
memory a save holds (``SaveResult.staging_peak_bytes``) stays within the budget, and the state the save
captures is the state at the call: eager saves return after the last wave is staged, lazy saves make the
optimizer-step and forward hooks wait for it (a mutation no hook saw fails the save, naming the tensor)."""
from __future__ import annotations

import os
import threading

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, SaverBusyError, StateMismatchError
from asyncckpt.format import parse_rank_index, rank_index_name
from asyncckpt.staging import RingLayout, copy_into, ring_shape
from asyncckpt.state import flatten

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.thread_only("the ring stages in waves for the training process's own writer; service mode stages the "
                                      "whole state in shared memory (a budget under it is refused, README)")]

CHUNK = 16 << 10  # FAST's codec.chunk_mib = 1/64
BUDGET_MIB = 0.125  # 128 KiB: 4 segments of 32 KiB (2 chunks each) per rank


def mixed_state(seed: int = 0) -> dict:
    """Every kind of staged item: tensors of several chunks (ending in a short chunk), exactly one chunk,
    just under one, packs of small tensors of several element sizes, empty and 0-dim tensors, non-contiguous
    sources (transposed, strided) both small and of several chunks, views sharing one storage, bool, bf16,
    complex and int tensors."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(70_001, generator=g)  # 280 KB: many chunks, several segments
    base = torch.randn(3000, generator=g)
    state = {
        "big": big,
        "one_chunk": torch.randn(CHUNK // 4, generator=g),
        "under_chunk": torch.randn(CHUNK // 4 - 3, generator=g),
        "small": {f"s{i}": torch.randn(1 + 7 * i, generator=g) for i in range(40)},
        "halves": [torch.randn(5 + i, generator=g).to(torch.bfloat16) for i in range(20)],
        "flags": torch.rand(333, generator=g) > 0.5,
        "ints": torch.randint(-2**40, 2**40, (1000,), generator=g, dtype=torch.int64),
        "complex": torch.randn(600, generator=g, dtype=torch.complex64),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25),
        "transposed_small": torch.randn(40, 30, generator=g).t(),
        "transposed_big": torch.randn(60, 120, generator=g).t(),  # 28.8 KB: two chunks, within a segment
        "strided": torch.randn(20_000, generator=g)[::3],
        "view_a": base[:1000], "view_b": base[500:2500],
        "step": 7, "name": "ring",
    }
    return state


def config(fast_config, **over):
    return fast_config(writer={"memory_budget_mib": BUDGET_MIB, **over.pop("writer", {})}, **over)


def records(save_dir: str, tag: str) -> dict:
    path = os.path.join(save_dir, tag, rank_index_name(0))
    with open(path, "rb") as f:
        _, recs = parse_rank_index(f.read(), path)
    return recs


def raw_shape(recs: dict) -> dict:
    """Every record as what it holds: kind, dtype, shape and the raw size of each of its chunks (not where)."""
    return {k: (r.dtype, r.shape, r.base, r.byte_offset, r.packed, tuple(c.raw for c in r.chunks))
            for k, r in recs.items()}


def assert_bits_equal(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bits_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bits_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8) if a.numel() else a,
                           b.contiguous().view(-1).view(torch.uint8) if b.numel() else b)
    else:
        assert a == b


@pytest.mark.parametrize("files_per_rank", [1, 3])
def test_a_state_over_the_budget_is_saved_in_waves_with_the_records_of_a_normal_save(fast_config, save_dir,
                                                                                         files_per_rank):
    state = mixed_state()
    nbytes = flatten(state).nbytes
    assert nbytes > 3 * BUDGET_MIB * 2**20
    normal = asyncckpt.save(state, save_dir, "normal",
                            config=fast_config(writer={"files_per_rank": files_per_rank})).result(30)
    cfg = config(fast_config, writer={"files_per_rank": files_per_rank})
    ringed = asyncckpt.save(state, save_dir, "ring", config=cfg).result(30)
    assert ringed.staging_peak_bytes <= BUDGET_MIB * 2**20 < normal.staging_peak_bytes
    assert normal.staging_peak_bytes >= nbytes
    assert raw_shape(records(save_dir, "ring")) == raw_shape(records(save_dir, "normal"))
    assert_bits_equal(asyncckpt.load(save_dir, "ring"), state)
    engine = asyncckpt.api._engine(cfg)
    assert engine.pool.stats()["staging_bytes"] <= BUDGET_MIB * 2**20


def test_the_ring_is_allocated_once_and_reused_by_every_save(fast_config, save_dir):
    engine = asyncckpt.engine.SaveEngine(config(fast_config, max_inflight=2, writer={"memory_budget_mib": 0.25}))
    try:
        state = mixed_state()
        flat = flatten(state)
        results = [engine.save(flatten(state), save_dir, "t0").result(30)]
        allocations = engine.pool.allocations
        results += [engine.save(flatten(state), save_dir, f"t{i}").result(30) for i in (1, 2)]
        assert engine.pool.allocations == allocations == 1  # one ring, on first use, reused
        assert all(r.staging_peak_bytes <= 0.25 * 2**20 / 2 for r in results)
        stats = engine.pool.stats()
        assert stats["staging_bytes"] <= 0.25 * 2**20 and stats["allocated_bytes"] == stats["staging_bytes"]
        for i in range(3):
            assert_bits_equal(asyncckpt.load(save_dir, f"t{i}"), state)
        assert flat.nbytes * 2 > 0.25 * 2**20
    finally:
        engine.close(30)


def test_an_eager_save_returns_after_the_last_wave_so_later_changes_are_not_saved(fast_config, save_dir):
    state = mixed_state()
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    fut = asyncckpt.save(state, save_dir, "t", config=config(fast_config))
    state["big"].mul_(-3)  # right after the call
    state["strided"].add_(1)
    fut.result(30)
    loaded = asyncckpt.load(save_dir, "t")
    assert torch.equal(loaded["big"], expected["big"]) and torch.equal(loaded["strided"], expected["strided"])


def test_a_non_contiguous_tensor_larger_than_a_segment_is_refused_naming_it(fast_config, save_dir):
    big_t = torch.randn(300, 300).t()  # 360 KB, not contiguous; segments are 32 KiB
    with pytest.raises(CheckpointError, match="'w'.*not contiguous"):
        asyncckpt.save({"w": big_t}, save_dir, "t", config=config(fast_config)).result(30)
    assert not os.path.exists(os.path.join(save_dir, "t"))


def test_a_budget_smaller_than_two_chunks_per_slot_is_refused_naming_the_key(fast_config, save_dir):
    cfg = fast_config(writer={"memory_budget_mib": 16 / 1024})  # 16 KiB: one chunk
    with pytest.raises(SaverBusyError, match="writer.memory_budget_mib"):
        asyncckpt.save({"w": torch.randn(100_000)}, save_dir, "t", config=cfg).result(30)


def test_ring_shape_fits_the_budget_with_whole_chunks():
    """At least 4 segments where a chunk fits each (else 2), segments of whole chunks and at most
    RING_SEGMENT_MAX (the pinned registration each segment gets), as many as the budget holds."""
    from asyncckpt.staging import RING_SEGMENT_MAX

    for chunk in (CHUNK, 4 << 20, 512 << 20):
        for budget in (2 * chunk, 3 * chunk, 4 * chunk, 10 * chunk + 5, 1 << 30, 10 << 30):
            k, s = ring_shape(budget, chunk)
            if budget < 2 * chunk:
                assert (k, s) == (0, 0)
                continue
            assert k >= (4 if budget >= 4 * chunk else 2) and s % chunk == 0 and s >= chunk and k * s <= budget
            assert s <= max(RING_SEGMENT_MAX, chunk) and budget - k * s < s + 4 * chunk
    assert ring_shape(2 * CHUNK - 1, CHUNK) == (0, 0)


def test_no_chunk_pack_or_non_contiguous_item_crosses_a_segment_boundary():
    flat = flatten(mixed_state(1))
    for segment in (2 * CHUNK, 5 * CHUNK):
        layout = RingLayout.of(flat.items, frozenset(), CHUNK, segment)
        for e in layout.plan.entries:
            if isinstance(e, int):
                off, n = layout.offsets[e], layout.sizes[e]
                spans = [(off + a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)] if n else []
                spans = [(s0, off + e_) for s0, e_ in spans]
                if not flat.items[e].src.is_contiguous():
                    spans = [(off, off + n)] if n else []
            else:
                assert len(e.runs) == 1  # members adjacent: a pack is one zero-copy stretch
                spans = [(e.runs[0][0], e.runs[0][0] + e.nbytes)]
            for a, b in spans:
                assert a // segment == (b - 1) // segment
        assert sum(layout.units) == sum(len(range(0, layout.sizes[e], CHUNK)) if isinstance(e, int) else 1
                                        for e in layout.plan.entries)


# ------------------------------------------------------------------------------------------- lazy + ring
class HeldCopier:
    """Copies made off the calling thread wait until :meth:`release` (at most 30 s)."""

    def __init__(self):
        self.released = threading.Event()
        self.waiting = threading.Event()  # a background copy is held
        self.caller = threading.current_thread()

    def __call__(self, dst, src) -> None:
        if threading.current_thread() is not self.caller:
            self.waiting.set()
            if not self.released.wait(30):
                raise TimeoutError("never released")
        copy_into(dst, src)


def big_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    return model, opt


def snapshot_of(model, opt) -> dict:
    import copy
    return copy.deepcopy({"module": model.state_dict(), "optimizer": opt.state_dict()})


def test_lazy_ring_hooks_wait_for_the_last_wave_and_the_save_is_the_state_at_the_call(make_saver, save_dir):
    model, opt = big_model()
    saver = make_saver(model, opt, snapshot="lazy", writer={"memory_budget_mib": BUDGET_MIB})
    expected = snapshot_of(model, opt)
    fut = saver.save_checkpoint(save_dir, tag="t")
    model(torch.randn(8, 64)).sum().backward()  # forward waits for the last wave (module buffers change here)
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    result = fut.result(30)
    assert result.staging_peak_bytes <= BUDGET_MIB * 2**20
    loaded = asyncckpt.load(save_dir, "t")
    assert_bits_equal({"module": loaded["module"], "optimizer": loaded["optimizer"]["state"]},
                      {"module": expected["module"], "optimizer": expected["optimizer"]["state"]})


def test_lazy_ring_fails_a_save_whose_state_changed_where_no_hook_saw(make_saver, save_dir):
    model, opt = big_model()
    saver = make_saver(model, opt, snapshot="lazy", writer={"memory_budget_mib": BUDGET_MIB})
    copier = saver.engine.pool.copier = HeldCopier()
    fut = saver.save_checkpoint(save_dir, tag="t")
    assert copier.waiting.wait(30)  # the call returned while the waves are staged in the background
    with torch.no_grad():
        model[0].weight.add_(1)  # no hook sees this, before the last wave is staged
    copier.released.set()
    with pytest.raises(StateMismatchError, match="0.weight"):
        fut.result(30)
    assert not os.path.exists(os.path.join(save_dir, "t"))
    saver.save_checkpoint(save_dir, tag="u").result(30)  # the ring is free again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8,
                                   torch.uint8, torch.int32, torch.bool, torch.complex64, torch.complex128,
                                   torch.float8_e4m3fn])
def test_every_dtype_crossing_segments_round_trips_bit_exact(fast_config, save_dir, dtype):
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (150_001,), generator=g, dtype=torch.uint8)  # every bit pattern, 150 KB
    n = raw.numel() // torch.empty(0, dtype=dtype).element_size()
    t = raw[: n * torch.empty(0, dtype=dtype).element_size()].view(dtype)
    state = {"t": t, "small": torch.arange(10, dtype=torch.float32)}
    result = asyncckpt.save(state, save_dir, "t", config=config(fast_config)).result(30)
    assert result.staging_peak_bytes <= BUDGET_MIB * 2**20
    assert_bits_equal(asyncckpt.load(save_dir, "t"), state)


def test_a_failed_write_frees_the_waves_the_call_is_waiting_for(fast_config, save_dir, monkeypatch):
    """The eager call stages waves while the writer frees ring slots: a writer that fails must not leave the
    call waiting; the failure is the save's, and the next save uses the ring again."""
    from patching import patch_existing

    engine = asyncckpt.engine.SaveEngine(config(fast_config))
    try:
        from asyncckpt.codec import ChunkCodec

        real = ChunkCodec.encode
        calls = []

        def failing(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise OSError("injected encode failure")
            return real(self, *args)

        patch_existing(monkeypatch, ChunkCodec, "encode", failing)
        fut = engine.save(flatten(mixed_state()), save_dir, "t")
        with pytest.raises(Exception, match="injected encode failure"):
            fut.result(30)
        assert not os.path.exists(os.path.join(save_dir, "t"))
        monkeypatch.undo()
        state = mixed_state(2)
        engine.save(flatten(state), save_dir, "u").result(30)
        assert_bits_equal(asyncckpt.load(save_dir, "u"), state)
    finally:
        engine.close(30)


def test_two_ring_saves_in_flight_use_a_ring_each(fast_config, save_dir):
    engine = asyncckpt.engine.SaveEngine(config(fast_config, max_inflight=2, writer={"memory_budget_mib": 0.25}))
    try:
        a, b = mixed_state(3), mixed_state(4)
        futs = [engine.save(flatten(a), save_dir, "a"), engine.save(flatten(b), save_dir, "b")]
        for f in futs:
            f.result(30)
        assert_bits_equal(asyncckpt.load(save_dir, "a"), a)
        assert_bits_equal(asyncckpt.load(save_dir, "b"), b)
        assert engine.pool.stats()["staging_bytes"] <= 0.25 * 2**20
    finally:
        engine.close(30)


def test_a_saver_over_the_budget_reserves_its_ring_ahead(make_saver, save_dir):
    """The background allocation from construction reserves the ring (not a full-size buffer that the budget
    would refuse), so the first save allocates nothing."""
    model, opt = big_model()
    saver = make_saver(model, opt, writer={"memory_budget_mib": BUDGET_MIB})
    saver.engine.pool.wait_reserved(30)
    reserved = saver.engine.pool.allocations
    assert reserved == 1 and 0 < saver.engine.pool.stats()["staging_bytes"] <= BUDGET_MIB * 2**20
    saver.save_checkpoint(save_dir, tag="t").result(30)
    assert saver.engine.pool.allocations == reserved
