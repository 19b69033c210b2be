"""The future a save returns (``result``/``done``/``exception``/``await``), ``wait``/``close`` draining, and
backpressure (``max_inflight`` with ``on_busy: wait | skip | error``). The background writer is held with a
gate the test opens, so nothing here depends on timing or sleeps."""
from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest
import torch

import asyncckpt
from asyncckpt import SaveFuture, SaveResult, SaverBusyError
from storage_faults import injected

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def trainer(make_trainer):
    t = make_trainer()
    t.train(1)
    return t


# ------------------------------------------------------------------------------------------ the future
def test_future_lifecycle(save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer)
    gate = writer_gate(saver.engine)
    fut = saver.save_checkpoint(save_dir, tag="f")
    assert isinstance(fut, SaveFuture) and fut.tag == "f"
    assert not fut.done() and "pending" in repr(fut)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.05)
    assert not os.path.exists(os.path.join(save_dir, "f"))  # not published before the writer ran
    seen = []
    fut.add_done_callback(lambda f: seen.append(f))
    gate.open()
    res = fut.result(timeout=30)
    assert fut.done() and fut.exception() is None and not fut.skipped
    assert isinstance(res, SaveResult) and res.path == os.path.join(save_dir, "f")
    assert seen == [fut] and "done" in repr(fut)
    assert os.path.isfile(os.path.join(save_dir, "f", "manifest.json"))


def test_wait_returns_every_result_and_times_out(save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer, max_inflight=2)
    gate = writer_gate(saver.engine)
    futs = [saver.save_checkpoint(save_dir, tag=t) for t in ("w1", "w2")]
    with pytest.raises(TimeoutError, match="2 checkpoint save"):
        saver.wait(timeout=0.05)
    gate.open()
    results = saver.wait(timeout=30)
    assert [r.tag for r in results] == ["w1", "w2"] and all(f.done() for f in futs)
    assert asyncckpt.list_tags(save_dir) == ["w1", "w2"]


def test_close_drains_in_flight_saves(save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer, max_inflight=2)
    gate = writer_gate(saver.engine)
    futs = [saver.save_checkpoint(save_dir, tag=t) for t in ("c1", "c2")]
    closer = threading.Thread(target=saver.close, kwargs={"timeout": 30})
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not any(f.done() for f in futs)  # close waits for the writer
    gate.open()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert all(f.done() and f.exception() is None for f in futs)
    assert asyncckpt.list_tags(save_dir) == ["c1", "c2"]


def test_close_timeout_keeps_the_saver_open(save_dir, trainer, make_saver, writer_gate, leftovers):
    """A close() whose timeout expires raises TimeoutError and leaves the in-flight save running (its future
    resolves, its checkpoint is published); a second close() then drains and closes."""
    saver = make_saver(trainer)
    gate = writer_gate(saver.engine)
    fut = saver.save_checkpoint(save_dir, tag="slow")
    with pytest.raises(TimeoutError, match="still in flight"):
        saver.close(timeout=0.05)
    trainer.train(1)
    assert saver.global_steps == 1  # still open: steps are still counted
    gate.open()
    assert fut.result(timeout=30).tag == "slow"
    saver.close(timeout=30)
    with pytest.raises(asyncckpt.CheckpointError, match="closed"):
        saver.save_checkpoint(save_dir, tag="late")
    assert asyncckpt.list_tags(save_dir) == ["slow"] and leftovers(save_dir) == []


def test_context_manager_exit_drains(save_dir, trainer, fast_config, writer_gate):
    with asyncckpt.AsyncCheckpointer(trainer.model, trainer.optimizer, config=fast_config()) as saver:
        gate = writer_gate(saver.engine)
        fut = saver.save_checkpoint(save_dir, tag="cm")
        threading.Timer(0.05, gate.open).start()  # opens the gate while __exit__ is already draining
    assert fut.done() and fut.result().tag == "cm"


@pytest.mark.asyncio
async def test_await_future(save_dir, trainer, make_saver):
    saver = make_saver(trainer, max_inflight=2)
    res = await saver.save_checkpoint(save_dir, tag="aw1")
    assert isinstance(res, SaveResult) and res.tag == "aw1"
    futs = [saver.save_checkpoint(save_dir, tag=t) for t in ("aw2", "aw3")]
    results = await asyncio.wait_for(asyncio.gather(*futs), timeout=30)
    assert [r.tag for r in results] == ["aw2", "aw3"]
    assert all(f.done() for f in futs)
    skipped = await asyncckpt.SaveFuture.completed(SaveResult("s", None, skipped=True))
    assert skipped.skipped


@pytest.mark.asyncio
async def test_await_does_not_block_the_event_loop(save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer)
    gate = writer_gate(saver.engine)
    fut = saver.save_checkpoint(save_dir, tag="nb")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 5:
                gate.open()  # the loop kept running while the save was awaited
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        res = await asyncio.wait_for(fut, timeout=30)
    finally:
        task.cancel()
    assert res.tag == "nb" and ticks >= 5


@pytest.mark.asyncio
async def test_await_failed_future_raises(save_dir, trainer, make_saver):
    saver = make_saver(trainer)
    with injected() as faults:
        faults.fail("write", ".bin", OSError(errno.ENOSPC, "No space left on device (injected)"))
        fut = saver.save_checkpoint(save_dir, tag="bad")
        with pytest.raises(asyncckpt.WriteError):
            await asyncio.wait_for(fut, timeout=30)
    saver.wait(timeout=30)  # awaited = observed: not raised again


def test_functional_save_returns_the_same_future(save_dir, fast_config):
    fut = asyncckpt.save({"x": torch.ones(3)}, save_dir, "fn", config=fast_config())
    assert isinstance(fut, SaveFuture)
    assert fut.result(timeout=30).path == os.path.join(save_dir, "fn")
    asyncckpt.wait_all(timeout=30)
    assert torch.equal(asyncckpt.load(save_dir)["x"], torch.ones(3))


# -------------------------------------------------------------------------------------- backpressure
@pytest.mark.parametrize("max_inflight", [1, 2])
def test_on_busy_skip(max_inflight, save_dir, trainer, make_saver, writer_gate, latest):
    saver = make_saver(trainer, max_inflight=max_inflight, on_busy="skip")
    gate = writer_gate(saver.engine)
    held = [saver.save_checkpoint(save_dir, tag=f"held{i}") for i in range(max_inflight)]
    skip = saver.save_checkpoint(save_dir, tag="skipped")
    assert skip.done()  # returned at once
    res = skip.result(timeout=0)
    assert res.skipped and res.path is None and res.tag == "skipped" and skip.skipped
    assert not any(f.done() for f in held)
    gate.open()
    assert all(not f.result(timeout=30).skipped for f in held)
    assert "skipped" not in asyncckpt.list_tags(save_dir) and latest(save_dir) == f"held{max_inflight - 1}"
    assert not saver.save_checkpoint(save_dir, tag="after").result(timeout=30).skipped  # a slot is free again
    assert [r.tag for r in saver.wait(timeout=30)][-1] == "after"


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_on_busy_error(max_inflight, save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer, max_inflight=max_inflight, on_busy="error")
    gate = writer_gate(saver.engine)
    held = [saver.save_checkpoint(save_dir, tag=f"held{i}") for i in range(max_inflight)]
    with pytest.raises(SaverBusyError, match=f"max_inflight={max_inflight}"):
        saver.save_checkpoint(save_dir, tag="refused")
    assert isinstance(SaverBusyError("x"), asyncckpt.CheckpointError)
    gate.open()
    for f in held:
        f.result(timeout=30)
    assert saver.save_checkpoint(save_dir, tag="after").result(timeout=30).tag == "after"
    assert "refused" not in asyncckpt.list_tags(save_dir)


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_on_busy_wait_blocks_until_a_slot_is_free(max_inflight, save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer, max_inflight=max_inflight, on_busy="wait")
    gate = writer_gate(saver.engine)
    held = [saver.save_checkpoint(save_dir, tag=f"held{i}") for i in range(max_inflight)]
    box: dict = {}
    waiter = threading.Thread(target=lambda: box.setdefault("fut", saver.save_checkpoint(save_dir, tag="waited")))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and "fut" not in box  # blocked on the full pool
    gate.open()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert box["fut"].result(timeout=30).tag == "waited"
    assert all(f.result(timeout=30).path for f in held)
    assert asyncckpt.list_tags(save_dir)[-1] == "waited"


def test_on_busy_wait_gives_up_after_commit_timeout(save_dir, trainer, make_saver, writer_gate):
    saver = make_saver(trainer, on_busy="wait", commit_timeout_s=0.2)
    gate = writer_gate(saver.engine)
    held = saver.save_checkpoint(save_dir, tag="held")
    with pytest.raises(SaverBusyError, match="within 0.2s"):
        saver.save_checkpoint(save_dir, tag="late")
    gate.open()
    assert held.result(timeout=30).tag == "held"
    assert saver.save_checkpoint(save_dir, tag="next").result(timeout=30).tag == "next"


def test_inflight_saves_publish_in_order(save_dir, trainer, make_saver, writer_gate, latest):
    saver = make_saver(trainer, max_inflight=3)
    gate = writer_gate(saver.engine)
    futs = []
    for i in range(3):
        trainer.train(1)
        futs.append(saver.save_checkpoint(save_dir))
    gate.open()
    assert [f.result(timeout=30).tag for f in futs] == ["global_step1", "global_step2", "global_step3"]
    assert latest(save_dir) == "global_step3"
    states = [asyncckpt.load(save_dir, f.tag) for f in futs]
    assert [s["global_steps"] for s in states] == [1, 2, 3]
    assert not torch.equal(states[0]["module"]["out.weight"], states[2]["module"]["out.weight"])
