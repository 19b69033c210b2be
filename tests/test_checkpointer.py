"""``AsyncCheckpointer``: DeepSpeed-shaped save/load, resume equivalence, snapshots that never alias live
state, host buffers allocated once, tags, ``latest`` and the errors around them."""
from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, CheckpointNotFoundError, TagExistsError

pytestmark = pytest.mark.timeout(60)


def snapshot(trainer) -> dict:
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                          "scheduler": trainer.scheduler.state_dict()})


# ------------------------------------------------------------------------------------ resume equivalence
@pytest.mark.parametrize("codec", [{}, {"compression": False}])
def test_resume_is_equivalent_to_training_on(codec, save_dir, make_trainer, make_saver, same):
    """Train N, save, train M more; a fresh model that loads the checkpoint and trains M ends bit-identical
    (dropout masks and data come from the torch/python/numpy RNGs, so their states must be restored)."""
    N, M = 5, 4
    random.seed(1), np.random.seed(1)
    a = make_trainer(seed=0)
    saver_a = make_saver(a, codec=codec)
    a.train(N)
    res = saver_a.save_checkpoint(save_dir, client_state={"epoch": 3, "note": "mid"}).result(timeout=30)
    assert res.tag == f"global_step{N}" and res.path == os.path.join(save_dir, f"global_step{N}")
    a.train(M)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # the load must restore all three
    b = make_trainer(seed=1)
    assert not torch.equal(a.model.inp.weight, b.model.inp.weight)
    saver_b = make_saver(b, codec=codec)
    path, client_state = saver_b.load_checkpoint(save_dir)
    assert path == res.path
    assert client_state == {"epoch": 3, "note": "mid"}
    assert saver_b.global_steps == N
    assert b.scheduler.last_epoch == N and b.scheduler.get_last_lr() == pytest.approx([1e-2 * 0.5 ** (N // 2)])
    b.train(M)

    same(snapshot(a), snapshot(b))
    assert saver_a.global_steps == saver_b.global_steps == N + M
    assert b.model.seen.item() == a.model.seen.item() == 16 * (N + M)  # buffers restored too
    assert saver_b.save_checkpoint(save_dir).result(timeout=30).tag == f"global_step{N + M}"


def test_step_counter_counts_optimizer_steps(save_dir, make_trainer, make_saver, latest):
    t = make_trainer()
    saver = make_saver(t)
    assert saver.save_checkpoint(save_dir).result(timeout=30).tag == "global_step0"
    t.train(3)
    assert saver.global_steps == 3
    saver.save_checkpoint(save_dir).result(timeout=30)
    assert latest(save_dir) == "global_step3"
    assert asyncckpt.list_tags(save_dir) == ["global_step0", "global_step3"]
    reader = asyncckpt.CheckpointReader(save_dir)
    assert reader.tag == "global_step3" and reader.manifest["global_steps"] == 3
    assert reader.manifest["format_version"] == 3 and reader.manifest["format"] == "asyncckpt"


def test_load_restores_exactly_what_was_saved(save_dir, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t)
    t.train(2)
    before = snapshot(t)
    rng = torch.get_rng_state()
    saver.save_checkpoint(save_dir, tag="mine").result(timeout=30)
    expected_next = torch.rand(5)
    t.train(3)
    path, cs = saver.load_checkpoint(save_dir, tag="mine")
    assert path.endswith("mine") and cs == {}
    same(before, snapshot(t))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(torch.rand(5), expected_next)
    state = asyncckpt.load(save_dir, "mine")  # the functional loader reads the same checkpoint
    assert set(state) >= {"module", "optimizer", "lr_scheduler", "global_steps", "frozen_parameters",
                          "client_state", "rng"}
    same(state["module"], before["model"])


def test_partial_loads(save_dir, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t)
    t.train(2)
    saved = snapshot(t)
    saver.save_checkpoint(save_dir).result(timeout=30)
    t.train(2)
    later = snapshot(t)

    saver.load_checkpoint(save_dir, load_optimizer_states=False, load_lr_scheduler_states=False)
    same(saved["model"], t.model.state_dict())
    same(later["optimizer"], t.optimizer.state_dict())
    same(later["scheduler"], t.scheduler.state_dict())

    t.train(1)
    steps = saver.global_steps
    saver.load_checkpoint(save_dir, load_module_only=True)
    same(saved["model"], t.model.state_dict())
    assert saver.global_steps == steps  # only the module was loaded

    saver.load_checkpoint(save_dir)
    same(saved, snapshot(t))
    assert saver.global_steps == 2


def test_exclude_frozen_parameters(save_dir, make_trainer, make_saver, same):
    t = make_trainer(freeze_input=True)
    saver = make_saver(t)
    t.train(2)
    saver.save_checkpoint(save_dir, exclude_frozen_parameters=True).result(timeout=30)
    state = asyncckpt.load(save_dir)
    assert "inp.weight" not in state["module"] and "inp.bias" not in state["module"]
    assert "hidden.weight" in state["module"] and "seen" in state["module"]
    assert sorted(state["frozen_parameters"]) == ["inp.bias", "inp.weight"]

    fresh = make_trainer(seed=5, freeze_input=True)
    frozen_before = fresh.model.inp.weight.detach().clone()
    saver2 = make_saver(fresh)
    path, _ = saver2.load_checkpoint(save_dir, load_module_strict=True)  # strict still works
    assert path is not None
    assert torch.equal(fresh.model.inp.weight, frozen_before)  # left as it was
    same(t.model.hidden.weight.detach(), fresh.model.hidden.weight.detach())
    same(t.optimizer.state_dict(), fresh.optimizer.state_dict())

    saver.save_checkpoint(save_dir, tag="with_frozen").result(timeout=30)  # default keeps them
    assert "inp.weight" in asyncckpt.load(save_dir, "with_frozen")["module"]


def test_strict_load_rejects_a_different_model(save_dir, make_trainer, make_saver):
    t = make_trainer()
    make_saver(t).save_checkpoint(save_dir).result(timeout=30)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32))
    saver = make_saver(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys"):
        saver.load_checkpoint(save_dir, load_optimizer_states=False)
    bigger = make_trainer(seed=3)
    bigger.model.extra = torch.nn.Linear(2, 2)
    saver2 = make_saver(bigger)
    with pytest.raises(CheckpointError, match="extra.weight"):
        saver2.load_checkpoint(save_dir)
    path, _ = saver2.load_checkpoint(save_dir, load_module_strict=False, load_optimizer_states=False)
    assert path is not None and torch.equal(bigger.model.out.weight, t.model.out.weight)


def test_tied_weights_stay_tied_after_load(save_dir, make_saver):
    def build():
        emb = torch.nn.Embedding(20, 8)
        head = torch.nn.Linear(8, 20, bias=False)
        head.weight = emb.weight
        return torch.nn.ModuleDict({"emb": emb, "head": head})

    torch.manual_seed(0)
    m = build()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    make_saver(m, opt).save_checkpoint(save_dir).result(timeout=30)
    state = asyncckpt.load(save_dir)
    assert state["module"]["emb.weight"] is state["module"]["head.weight"]
    torch.manual_seed(1)
    m2 = build()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    make_saver(m2, opt2).load_checkpoint(save_dir)
    assert m2.head.weight is m2.emb.weight and torch.equal(m2.emb.weight, m.emb.weight)


def test_client_state_with_tensors_and_nesting(save_dir, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t)
    cs = {"epoch": 7, "best": float("inf"), "history": [0.5, 0.25], "ema": {"w": torch.randn(4, 4)}, "pair": (1, 2)}
    saver.save_checkpoint(save_dir, client_state=cs).result(timeout=30)
    _, out = saver.load_checkpoint(save_dir)
    same(cs, out)


# --------------------------------------------------------------------------------------------- aliasing
def test_snapshot_never_aliases_live_state(save_dir, make_trainer, make_saver, writer_gate, same):
    """Parameters, buffers and optimizer state mutated in place (and a real optimizer step) after
    save_checkpoint returns but before anything is written must not leak into the checkpoint."""
    t = make_trainer()
    saver = make_saver(t, snapshot="eager")  # mutations outside the hooks: eager (tests/test_snapshot_lazy.py: lazy)
    t.train(2)
    expected = snapshot(t)
    gate = writer_gate(saver.engine)
    fut = saver.save_checkpoint(save_dir, client_state={"k": 1})
    assert not fut.done()
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(1000.0)
        t.model.seen.fill_(-1)
        for s in t.optimizer.state.values():
            s["exp_avg"].mul_(-3.0)
            s["exp_avg_sq"].zero_()
            s["step"].add_(100)
    t.step()  # the next optimizer step, in place
    t.scheduler.step()
    gate.open()
    fut.result(timeout=30)
    assert gate.calls == 1

    fresh = make_trainer(seed=7)
    make_saver(fresh).load_checkpoint(save_dir)
    same(expected, snapshot(fresh))


def test_functional_save_does_not_alias(save_dir, fast_config, monkeypatch, writer_gate):
    state = {"w": torch.arange(10000, dtype=torch.float32), "view": None}
    state["view"] = state["w"][::7]
    expected = state["w"].clone()
    from asyncckpt import api

    cfg = fast_config(max_inflight=2)
    engine = api._engine(cfg)
    gate = writer_gate(engine)
    fut = asyncckpt.save(state, save_dir, "t", config=cfg)
    state["w"].mul_(-1)
    gate.open()
    fut.result(timeout=30)
    out = asyncckpt.load(save_dir, "t")
    assert torch.equal(out["w"], expected) and torch.equal(out["view"], expected[::7])


# ----------------------------------------------------------------------------------- host buffer reuse
@pytest.mark.parametrize("max_inflight", [1, 2])
def test_no_host_allocation_in_steady_state(max_inflight, save_dir, make_trainer, make_saver, writer_gate):
    t = make_trainer()
    saver = make_saver(t, max_inflight=max_inflight)
    pool = saver.engine.pool
    t.train(1)  # the optimizer has its state now

    def round_of_saves(name: str, gated: bool) -> None:  # gated: every slot is in use at once
        gate = writer_gate(saver.engine) if gated else None
        futs = [saver.save_checkpoint(save_dir, tag=f"{name}{i}") for i in range(max_inflight)]
        if gate is not None:
            assert sum(1 for f in futs if not f.done()) == max_inflight
            gate.open()
        for f in futs:
            f.result(timeout=30)
        t.train(1)

    round_of_saves("warm", gated=True)
    assert pool.allocations == max_inflight  # one buffer per slot, on first use
    buffers = [s.buffer.data_ptr() for s in pool.slots]
    round_of_saves("second", gated=False)
    allocated = pool.allocations
    for i in range(3):
        round_of_saves(f"steady{i}-", gated=i == 1)
    assert pool.allocations == allocated == max_inflight
    assert [s.buffer.data_ptr() for s in pool.slots] == buffers
    assert len(asyncckpt.list_tags(save_dir)) == 5 * max_inflight


def test_prepare_preallocates(save_dir, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t, max_inflight=2)
    t.train(1)  # the first step starts allocating in the background (the optimizer has state now)
    saver.engine.pool.wait_reserved(30)
    saver.prepare()
    assert saver.engine.pool.allocations == 2
    assert all(s.capacity > 0 for s in saver.engine.pool.slots)
    for i in range(3):
        t.train(1)
        saver.save_checkpoint(save_dir).result(timeout=30)
    assert saver.engine.pool.allocations == 2
    fresh = make_trainer(seed=9)
    make_saver(fresh).load_checkpoint(save_dir)
    same(snapshot(t), snapshot(fresh))


# ------------------------------------------------------------------------------------ tags and `latest`
def test_save_latest_false_leaves_latest_alone(save_dir, make_trainer, make_saver, latest):
    t = make_trainer()
    saver = make_saver(t)
    saver.save_checkpoint(save_dir, tag="a").result(timeout=30)
    saver.save_checkpoint(save_dir, tag="b", save_latest=False).result(timeout=30)
    assert latest(save_dir) == "a"
    assert sorted(asyncckpt.list_tags(save_dir)) == ["a", "b"]
    path, _ = saver.load_checkpoint(save_dir)
    assert path.endswith(os.sep + "a")


def test_no_latest_returns_none_none(tmp_path, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t)
    before = snapshot(t)
    assert saver.load_checkpoint(str(tmp_path / "nothing")) == (None, None)
    saver.save_checkpoint(str(tmp_path / "d"), tag="x", save_latest=False).result(timeout=30)
    assert saver.load_checkpoint(str(tmp_path / "d")) == (None, None)  # as DeepSpeed: no latest, no load
    same(before, snapshot(t))
    with pytest.raises(CheckpointNotFoundError, match="published tags: x"):
        asyncckpt.load(str(tmp_path / "d"))  # the functional loader needs a tag or latest


def test_missing_tag_lists_existing_tags(save_dir, make_trainer, make_saver):
    t = make_trainer()
    saver = make_saver(t)
    for tag in ("alpha", "beta"):
        saver.save_checkpoint(save_dir, tag=tag).result(timeout=30)
    with pytest.raises(CheckpointNotFoundError) as ei:
        saver.load_checkpoint(save_dir, tag="gamma")
    assert "gamma" in str(ei.value) and "alpha, beta" in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="alpha, beta"):
        asyncckpt.load(save_dir, "gamma")
    with pytest.raises(CheckpointNotFoundError, match="published tags: none"):
        asyncckpt.load(os.path.join(save_dir, "nope"), "x")


def test_incomplete_tags_are_named_as_such(save_dir, make_trainer, make_saver):
    t = make_trainer()
    make_saver(t).save_checkpoint(save_dir, tag="good").result(timeout=30)
    os.makedirs(os.path.join(save_dir, ".cut.partial"))
    os.makedirs(os.path.join(save_dir, "empty"))
    with pytest.raises(CheckpointNotFoundError, match="never completed.*published tags: good"):
        asyncckpt.load(save_dir, "cut")
    with pytest.raises(CheckpointNotFoundError, match="incomplete.*published tags: good"):
        asyncckpt.load(save_dir, "empty")
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write("gone\n")
    with pytest.raises(CheckpointNotFoundError, match="'gone'.*published tags: good"):
        asyncckpt.load(save_dir)
    assert asyncckpt.list_tags(save_dir) == ["good"]


def test_existing_tag_is_an_error_unless_overwrite(save_dir, make_trainer, make_saver, leftovers):
    t = make_trainer()
    saver = make_saver(t)
    saver.save_checkpoint(save_dir, tag="same").result(timeout=30)
    with pytest.raises(TagExistsError, match="overwrite") as ei:
        saver.save_checkpoint(save_dir, tag="same")
    assert isinstance(ei.value, FileExistsError)
    assert saver.save_checkpoint(save_dir, tag="other").result(timeout=30).tag == "other"  # nothing stuck

    t.train(1)
    over = make_saver(t, overwrite=True)
    over.save_checkpoint(save_dir, tag="same").result(timeout=30)
    state = asyncckpt.load(save_dir, "same")
    assert state["global_steps"] == 0  # a new saver counts from 0 ...
    assert torch.equal(state["module"]["out.weight"], t.model.out.weight)  # ... but it holds the new weights
    assert leftovers(save_dir) == [] and sorted(os.listdir(save_dir)) == ["latest", "other", "same"]


@pytest.mark.parametrize("tag", ["../escape", "latest", ".hidden", "a/b", "", "x" * 201])
def test_invalid_tags_are_refused_at_once(tag, save_dir, make_trainer, make_saver):
    saver = make_saver(make_trainer())
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        saver.save_checkpoint(save_dir, tag=tag)
    assert not os.path.exists(save_dir) or os.listdir(save_dir) == []


def test_context_manager_and_close(save_dir, make_trainer, fast_config):
    t = make_trainer()
    with asyncckpt.AsyncCheckpointer(t.model, t.optimizer, lr_scheduler=t.scheduler, config=fast_config()) as saver:
        fut = saver.save_checkpoint(save_dir, tag="ctx")
    assert fut.done() and fut.result().path == os.path.join(save_dir, "ctx")
    with pytest.raises(CheckpointError, match="closed"):
        saver.save_checkpoint(save_dir, tag="after")
    saver.close()  # idempotent
    t.train(1)
    assert saver.global_steps == 0  # the step hook is removed on close


def test_config_sources(tmp_path, save_dir, make_trainer):
    t = make_trainer()
    path = tmp_path / "c.yaml"
    path.write_text("max_inflight: 2\nwriter:\n  fsync: false\n  nice: 0\n")
    for cfg in (str(path), path, {"max_inflight": 2}, asyncckpt.Config(max_inflight=2)):
        with asyncckpt.AsyncCheckpointer(t.model, t.optimizer, config=cfg) as saver:
            assert saver.config.max_inflight == 2 and len(saver.engine.pool.slots) == 2
    with asyncckpt.AsyncCheckpointer(t.model) as saver:  # no optimizer, default config
        assert saver.config == asyncckpt.Config()
        saver.save_checkpoint(save_dir, tag="m").result(timeout=30)
        assert saver.load_checkpoint(save_dir, "m")[0].endswith("m")
    assert asyncckpt.load(save_dir, "m")["optimizer"] is None


def test_save_result_figures(save_dir, make_trainer, make_saver):
    t = make_trainer()
    t.train(1)
    saver = make_saver(t, writer={"fsync": True})
    res = saver.save_checkpoint(save_dir).result(timeout=30)
    raw = sum(v.numel() * v.element_size() for v in t.model.state_dict().values())
    assert res.raw_bytes > raw and res.bytes_written > 0 and res.total_bytes_written == res.bytes_written
    assert 0 < res.stall_s <= res.time_to_durable_s
    assert {"stage", "prepare", "write", "publish"} <= set(res.phases)
    assert res.as_dict()["tag"] == "global_step0" and res.world_size == 1 and not res.skipped
