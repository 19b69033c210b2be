"""``snapshot: lazy`` (issue 10.1): ``save_checkpoint`` returns before the state is copied; the copy runs in
the background and the training side waits only before the first mutation of saved state (any optimizer's
step, the forward of a module with buffers). A mutation no hook sees fails that save, naming the tensor.

The copies are held back by an event-driven copier (``pool.copier``, the staging seam for host copies): the
copy of a test's save starts only once the test says so, so every ordering below is forced, never timed."""
from __future__ import annotations

import copy
import random
import threading

import numpy as np

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import asyncckpt
from asyncckpt import StateMismatchError
from asyncckpt.staging import copy_into

pytestmark = pytest.mark.timeout(60)


class HeldCopier:
    """A copier whose background copies wait until :meth:`release` (at most 30 s) and are logged; the copies
    made on the calling thread (state no hook guards: RNG, scheduler, client state) go through at once."""

    def __init__(self):
        self.released = threading.Event()
        self.log: list[str] = []
        self.caller = threading.current_thread()

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if threading.current_thread() is self.caller:
            copy_into(dst, src)
            return
        if not self.released.wait(30):
            raise TimeoutError("the test never released the copies")
        copy_into(dst, src)
        self.log.append("copy")

    def release(self, *_args) -> None:
        self.released.set()


def state_of(model, optimizer) -> dict:
    return copy.deepcopy({"module": model.state_dict(), "optimizer": optimizer.state_dict()})


def loaded(save_dir, tag) -> dict:
    return asyncckpt.load(save_dir, tag)


def hold(saver) -> HeldCopier:
    copier = HeldCopier()
    saver.engine.pool.copier = copier
    return copier


@pytest.fixture
def global_step_hook():
    """``global_step_hook(fn)``: a step pre-hook on every optimizer, registered now (so before a saver made
    later: it runs before the saver's), removed at teardown."""
    handles = []

    def add(fn):
        handles.append(register_optimizer_step_pre_hook(fn))

    yield add
    for h in handles:
        h.remove()


def test_step_waits_for_the_copy_and_the_snapshot_is_bit_exact(save_dir, make_saver, same, global_step_hook):
    """Forward, backward, the optimizer step and in-place ops right after the call: the step's pre-hook waits
    for the copy (held until the step has begun; every copy is logged before the step's body), and the
    checkpoint holds the state of the call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))  # no buffers
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def forward_backward():
        model(torch.randn(16, 8)).pow(2).mean().backward()

    forward_backward()
    opt.step()
    global_step_hook(lambda *a: copier.release())  # runs before the saver's hook: the step has begun
    saver = make_saver(model, opt, snapshot="lazy")
    copier = hold(saver)
    opt.register_step_pre_hook(lambda *a: copier.log.append("step"))  # runs after the saver's hook
    expected = state_of(model, opt)
    fut = saver.save_checkpoint(save_dir, tag="a")
    assert copier.log == []  # nothing copied yet: the call returned before the copy
    opt.zero_grad()
    forward_backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    assert copier.log[-1] == "step" and copier.log.count("copy") == len(copier.log) - 1 > 0
    fut.result(timeout=30)
    same(expected, {k: v for k, v in loaded(save_dir, "a").items() if k in expected})


def test_forward_waits_for_the_buffers(save_dir, make_saver, same):
    """BatchNorm running statistics change in forward: a forward right after the call waits for the buffers
    (copied first, with their own completion), not for the rest of the state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4),
                                torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(32, 8)).sum().backward()
    opt.step()
    model.register_forward_pre_hook(lambda *a: copier.release())  # before the saver's: the forward has begun
    saver = make_saver(model, opt, snapshot="lazy")
    copier = hold(saver)
    model[1].register_forward_pre_hook(lambda *a: copier.log.append("forward"))  # after the saver's hooks
    expected = state_of(model, opt)
    buffers = len(list(model.buffers()))
    fut = saver.save_checkpoint(save_dir, tag="a")
    assert copier.log == []
    out = model(torch.randn(32, 8) * 5 + 3)  # changes every running statistic
    assert copier.log.index("forward") >= buffers  # every buffer was copied before the first BatchNorm ran
    assert not torch.equal(model[1].running_mean, expected["module"]["1.running_mean"])
    out.sum().backward()
    opt.step()
    fut.result(timeout=30)
    same(expected, {k: v for k, v in loaded(save_dir, "a").items() if k in expected})


@pytest.mark.parametrize("noticed_by", ["background", "step", "wait_snapshot"])
def test_a_mutation_no_hook_sees_fails_that_save(noticed_by, save_dir, make_trainer, make_saver, latest, leftovers):
    """A parameter written in place after the call, before the copy (no hook runs): the save fails naming the
    tensor, nothing is published, ``latest`` still names the previous checkpoint, and later saves work."""
    t = make_trainer()
    t.train(1)
    saver = make_saver(t, snapshot="lazy")
    saver.save_checkpoint(save_dir, tag="good").result(timeout=30)
    copier = hold(saver)
    fut = saver.save_checkpoint(save_dir, tag="torn")
    with torch.no_grad():
        t.model.hidden.weight.add_(1.0)  # not in optimizer.step(), not in forward: no hook
    copier.release()
    if noticed_by == "step":
        t.step()
    elif noticed_by == "wait_snapshot":
        saver.wait_snapshot(timeout=30)
    with pytest.raises(StateMismatchError, match=r"'module/hidden\.weight'") as ei:
        fut.result(timeout=30)
    assert "wait_snapshot" in str(ei.value) and "'module/out.weight'" not in str(ei.value)
    assert latest(save_dir) == "good" and asyncckpt.list_tags(save_dir) == ["good"]
    assert leftovers(save_dir) == []
    saver.save_checkpoint(save_dir, tag="after").result(timeout=30)
    assert latest(save_dir) == "after"


def test_wait_snapshot(save_dir, make_trainer, make_saver, same):
    """``wait_snapshot`` blocks until the copy is complete (a timeout raises TimeoutError and leaves it
    pending); after it, saved state may change in place; without a pending snapshot it returns at once."""
    t = make_trainer()
    t.train(1)
    saver = make_saver(t, snapshot="lazy")
    saver.wait_snapshot()  # nothing pending
    copier = hold(saver)
    expected = state_of(t.model, t.optimizer)
    fut = saver.save_checkpoint(save_dir, tag="a")
    with pytest.raises(TimeoutError):
        saver.wait_snapshot(timeout=0.01)  # the copies are held: it cannot be complete
    copier.release()
    saver.wait_snapshot(timeout=30)
    assert copier.log and set(copier.log) == {"copy"}
    with torch.no_grad():
        for p in t.model.parameters():
            p.zero_()
    fut.result(timeout=30)
    same(expected, {k: v for k, v in loaded(save_dir, "a").items() if k in expected})


def test_hooks_are_removed_on_close(save_dir, make_trainer, fast_config):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    t = make_trainer()
    before_global = len(_global_optimizer_pre_hooks)
    saver = asyncckpt.AsyncCheckpointer(t.model, t.optimizer, config=fast_config(snapshot="lazy"))
    assert len(_global_optimizer_pre_hooks) == before_global + 1
    assert len(t.model._forward_pre_hooks) == 1  # Net holds a buffer (`seen`); its layers hold none
    t.train(1)
    saver.save_checkpoint(save_dir).result(timeout=30)
    saver.close()
    assert len(_global_optimizer_pre_hooks) == before_global
    assert all(not m._forward_pre_hooks for m in t.model.modules())
    assert not t.optimizer._optimizer_step_post_hooks
    t.train(1)  # training goes on without the saver


def test_eager_registers_no_hook(make_trainer, make_saver):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    t = make_trainer()
    before = len(_global_optimizer_pre_hooks)
    make_saver(t, snapshot="eager")
    assert len(_global_optimizer_pre_hooks) == before and not t.model._forward_pre_hooks
    assert not t.model._load_state_dict_pre_hooks and not t.optimizer._optimizer_load_state_dict_pre_hooks


def test_several_optimizers(save_dir, make_saver, same, global_step_hook):
    """A second optimizer the saver does not wrap updates other parameters of the saved model right after
    the call: its step waits for the copy too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    first = torch.optim.AdamW(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[1].parameters(), lr=0.5, momentum=0.9)

    def train():
        model(torch.randn(4, 8)).pow(2).sum().backward()
        first.step()
        second.step()

    train()
    global_step_hook(lambda *a: copier.release())
    saver = make_saver(model, first, snapshot="lazy")
    copier = hold(saver)
    expected = copy.deepcopy({"module": model.state_dict(), "optimizer": first.state_dict()})
    fut = saver.save_checkpoint(save_dir, tag="a")
    model(torch.randn(4, 8)).pow(2).sum().backward()
    second.step()  # the unwrapped optimizer first
    first.step()
    fut.result(timeout=30)
    same(expected, {k: v for k, v in loaded(save_dir, "a").items() if k in expected})


def test_exclude_frozen_parameters(save_dir, make_trainer, make_saver, same):
    t = make_trainer(freeze_input=True)
    t.train(2)
    t.model.register_forward_pre_hook(lambda *a: copier.release())  # Net's forward changes its buffer
    saver = make_saver(t, snapshot="lazy")
    copier = hold(saver)
    expected = {k: v.clone() for k, v in t.model.state_dict().items() if not k.startswith("inp.")}
    fut = saver.save_checkpoint(save_dir, tag="a", exclude_frozen_parameters=True)
    t.step()
    fut.result(timeout=30)
    state = loaded(save_dir, "a")
    assert sorted(state["frozen_parameters"]) == ["inp.bias", "inp.weight"]
    same(expected, dict(state["module"]))


def test_lazy_resume_matches_eager(save_dir, tmp_path, make_trainer, make_saver, same):
    """Saving lazily every step while training gives the same checkpoints as saving eagerly."""
    tags = {}
    for mode in ("eager", "lazy"):
        random.seed(0), np.random.seed(0)
        t = make_trainer()  # seeds torch
        saver = make_saver(t, snapshot=mode)
        directory = str(tmp_path / mode)
        for _ in range(3):
            t.step()
            saver.save_checkpoint(directory)  # the step right after waits for the copy (lazy)
        saver.wait()
        tags[mode] = {tag: loaded(directory, tag) for tag in asyncckpt.list_tags(directory)}
    assert sorted(tags["eager"]) == sorted(tags["lazy"]) == ["global_step1", "global_step2", "global_step3"]
    for tag in tags["eager"]:
        a, b = tags["eager"][tag], tags["lazy"][tag]
        same({k: a[k] for k in ("module", "optimizer", "lr_scheduler", "global_steps")},
             {k: b[k] for k in ("module", "optimizer", "lr_scheduler", "global_steps")})


def test_snapshot_config_key(fast_config):
    assert asyncckpt.Config().snapshot == "lazy"  # the default since the GPU benchmark measured it (README)
    assert fast_config(snapshot="eager").snapshot == "eager"
    with pytest.raises(asyncckpt.ConfigError, match="'snapshot'"):
        fast_config(snapshot="sometimes")


@pytest.mark.parametrize("what", ["module", "submodule", "optimizer"])
def test_load_state_dict_waits_for_the_copy(save_dir, make_trainer, make_saver, same, what):
    """load_state_dict right after a lazy save (loading weights, resetting an optimizer) writes the saved tensors
    in place: its pre-hook settles the snapshot first, so the save holds the state at the call and succeeds
    (without the hook, the version counters fail it as torn)."""
    t = make_trainer()
    t.train(2)
    saver = make_saver(t, snapshot="lazy")
    expected = {k: v.clone() for k, v in t.model.state_dict().items()}
    expected_opt = {k: {n: v.clone() for n, v in st.items()} for k, st in t.optimizer.state_dict()["state"].items()}
    other = make_trainer(seed=1)
    other.train(3)
    fut = saver.save_checkpoint(save_dir, tag="t")
    if what == "module":
        t.model.load_state_dict(other.model.state_dict())
    elif what == "submodule":
        name, child = next((n, c) for n, c in t.model.named_children() if list(c.parameters()))
        child.load_state_dict(getattr(other.model, name).state_dict())
    else:
        t.optimizer.load_state_dict(other.optimizer.state_dict())
    fut.result(timeout=60)
    back = asyncckpt.load(save_dir, "t")
    same(dict(back["module"]), expected)
    same(dict(back["optimizer"]["state"]), expected_opt)
