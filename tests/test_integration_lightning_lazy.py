"""The Lightning plugin with ``snapshot: lazy``: ``save_checkpoint`` returns before the copy; training waits
only before a forward (for the model state no optimizer updates: buffers) and before an optimizer's update
(for the rest); a mutation no hook sees fails that save.

Copies are held back through the staging copier seam (``StagingPool.copier``) until the test (or the next
optimizer step) releases them, so every ordering below is forced, never timed."""
from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

L = pytest.importorskip("lightning")

import asyncckpt  # noqa: E402
import asyncckpt.staging  # noqa: E402
from asyncckpt import StateMismatchError  # noqa: E402
from asyncckpt.integrations.lightning import AsyncCheckpointIO  # noqa: E402
from asyncckpt.staging import copy_into  # noqa: E402
from patching import patch_existing  # noqa: E402
from test_integration_lightning import Tiny, assert_same, make_trainer, snapshot, visible  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class HeldCopier:
    """Background copies wait for ``gate`` (at most 30 s) and are logged; copies on the calling thread (state
    no hook guards) go through at once."""

    def __init__(self):
        self.gate = threading.Event()
        self.log: list[str] = []
        self.caller = threading.current_thread()

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if threading.current_thread() is not self.caller:
            if not self.gate.wait(30):
                raise TimeoutError("the test never released the copies")
            self.log.append("copy")
        copy_into(dst, src)

    def release(self, *_args) -> None:
        self.gate.set()


@pytest.fixture
def global_hooks():
    """Global hooks registered by the test (so before the plugin's, which run after them), removed at the end."""
    handles = []
    yield handles
    for h in handles:
        h.remove()


@pytest.fixture
def io(fast_config):
    made = []

    def make(**over):
        made.append(AsyncCheckpointIO(fast_config(snapshot="lazy", max_inflight=2, **over)))
        return made[-1]

    yield make
    for p in made:
        copier = getattr(p._engine, "pool", None) and p._engine.pool.copier
        if isinstance(copier, HeldCopier):  # a test that failed early: never leave a copy held
            copier.release()
        try:
            p.teardown()
        except Exception:  # noqa: BLE001 - a test that tore a save leaves its failure unobserved
            pass


def live(model, optimizer, step) -> dict:
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": step}


def expected_of(model, optimizer, step) -> dict:
    return copy.deepcopy(live(model, optimizer, step))


def saved(path) -> dict:
    state = AsyncCheckpointIO().load_checkpoint(path)
    return {k: state[k] for k in ("state_dict", "optimizer_states", "global_step")}


def warm(io, model, optimizer, path) -> HeldCopier:
    """A first save (the plugin's engine is made) and a step after it (the plugin learns which tensors the
    optimizer updates); returns a held copier installed for the next saves."""
    io.save_checkpoint(live(model, optimizer, 0), path)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    io.wait(timeout=30)
    copier = HeldCopier()
    io._engine.pool.copier = copier
    return copier


def test_forward_and_backward_overlap_the_copy_update_waits(tmp_path, io):
    """Lightning runs forward and backward inside ``optimizer.step(closure)``: the copy is released only at
    the end of the closure (had the step waited before the closure, it would never be released), the update
    waits for it, and the checkpoint is bit-identical to the state at the call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # no buffers
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    plugin = io()
    copier = warm(plugin, model, opt, str(tmp_path / "w.ckpt"))
    expected = expected_of(model, opt, 1)
    plugin.save_checkpoint(live(model, opt, 1), str(tmp_path / "a.ckpt"))
    assert copier.log == []  # returned before the copy

    def closure():
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        copier.log.append("backward")
        copier.release()
        return loss

    opt.step(closure)
    assert copier.log[0] == "backward" and copier.log.count("copy") > 0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)  # after the step: the copy is complete, so this cannot tear the save
    plugin.wait(timeout=30)
    assert_same(saved(str(tmp_path / "a.ckpt")), expected)
    assert plugin._guard._forward_hook is None and plugin._guard._step_hook is None  # hooks gone once settled


def test_forward_waits_for_the_buffers_only(tmp_path, io, global_hooks):
    """BatchNorm running statistics change in forward: a forward right after the call waits for the buffers
    (copied first), released by a global forward hook that runs before the plugin's; the parameters'
    copy is not waited for there. Both checkpoints of save_last-style back-to-back saves are exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plugin = io()
    copier = warm(plugin, model, opt, str(tmp_path / "w.ckpt"))
    global_hooks.append(register_module_forward_pre_hook(lambda m, a: copier.release()))
    model[1].register_forward_pre_hook(lambda m, a: copier.log.append("batchnorm"))
    expected = expected_of(model, opt, 1)
    plugin.save_checkpoint(live(model, opt, 1), str(tmp_path / "a.ckpt"))
    plugin.save_checkpoint(live(model, opt, 1), str(tmp_path / "last.ckpt"))  # save_last: two pending copies
    buffers = 2 * len(list(model.buffers()))
    model(torch.randn(8, 4) * 5 + 3).pow(2).mean().backward()  # changes every running statistic
    assert copier.log.index("batchnorm") >= buffers
    opt.step()
    plugin.wait(timeout=30)
    assert_same(saved(str(tmp_path / "a.ckpt")), expected)
    assert_same(saved(str(tmp_path / "last.ckpt")), expected)


def test_an_optimizer_of_its_own_waits_before_its_step(tmp_path, io, global_hooks):
    """An optimizer whose step is not torch's may update before it evaluates its closure: it waits before
    its step begins (every copy is logged before its body runs)."""
    class Mine(torch.optim.SGD):
        def step(self, closure=None):
            log.append("step")
            return super().step(closure)

    log: list[str] = []  # the held copier's log, once installed
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = Mine(model.parameters(), lr=0.1, momentum=0.9)
    plugin = io()
    copier = warm(plugin, model, opt, str(tmp_path / "w.ckpt"))
    copier.log = log
    log.clear()
    global_hooks.append(register_optimizer_step_pre_hook(lambda *a: copier.release()))
    expected = expected_of(model, opt, 1)
    plugin.save_checkpoint(live(model, opt, 1), str(tmp_path / "a.ckpt"))
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step(lambda: None)
    assert copier.log[-1] == "step" and copier.log.count("copy") == len(copier.log) - 1 > 0
    plugin.wait(timeout=30)
    assert_same(saved(str(tmp_path / "a.ckpt")), expected)


@pytest.mark.parametrize("noticed_by", ["background", "step", "wait_snapshot"])
def test_a_mutation_no_hook_sees_fails_that_save(tmp_path, io, noticed_by):
    """A parameter written in place after the call and before the copy (no hook runs): the save fails naming
    the tensor (raised by the next save or wait), the path never appears, `latest` still names the previous
    checkpoint, and later saves work."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    plugin = io()
    d = tmp_path / "c"
    copier = warm(plugin, model, opt, str(d / "good.ckpt"))
    plugin.save_checkpoint(live(model, opt, 1), str(d / "torn.ckpt"))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # neither a forward nor an optimizer step
    if noticed_by == "step":
        copier.release()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    elif noticed_by == "wait_snapshot":
        with pytest.raises(TimeoutError):
            plugin.wait_snapshot(timeout=0.01)  # held: not complete
        copier.release()
        plugin.wait_snapshot(timeout=30)
    else:
        copier.release()
    with pytest.raises(StateMismatchError, match=r"'state_dict/0\.weight'") as ei:
        plugin.wait(timeout=30)
    assert "wait_snapshot" in str(ei.value) and "'state_dict/1.weight'" not in str(ei.value)
    assert not os.path.lexists(d / "torn.ckpt") and visible(str(d)) == ["good.ckpt"]
    assert asyncckpt.loader.read_latest(str(d)) == "good.ckpt"
    plugin.save_checkpoint(live(model, opt, 2), str(d / "after.ckpt"))
    plugin.wait(timeout=30)
    assert saved(str(d / "after.ckpt"))["global_step"] == 2


@pytest.fixture
def held_until_next_step(monkeypatch, global_hooks):
    """Every staging pool's background copies of a save wait until the next optimizer step begins (a global
    step hook registered before the plugin's), or until the plugin's teardown (the last save has no next step)."""
    gate = threading.Event()
    real_init = asyncckpt.staging.StagingPool.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        copier = HeldCopier()
        copier.gate = gate
        self.copier = copier

    patch_existing(monkeypatch, asyncckpt.staging.StagingPool, "__init__", init)
    global_hooks.append(register_optimizer_step_pre_hook(lambda *a: gate.set()))

    class Held(AsyncCheckpointIO):
        def save_checkpoint(self, *a, **kw):
            gate.clear()
            super().save_checkpoint(*a, **kw)

        def teardown(self):
            gate.set()
            super().teardown()

    return Held


def test_fit_lazy_checkpoints_and_resume_are_exact(tmp_path, fast_config, held_until_next_step):
    """A real Trainer with ModelCheckpoint(save_top_k=2, save_last=True) and snapshot: lazy, each copy held
    until the next training step has begun: every checkpoint is bit-identical to the eager run's, and
    ckpt_path="last" resumes exactly (weights, optimizer, scheduler, step, losses)."""
    lazy = fast_config(snapshot="lazy", max_inflight=2)
    eager_dir, lazy_dir = str(tmp_path / "eager"), str(tmp_path / "lazy")
    ref = make_trainer(AsyncCheckpointIO(fast_config(max_inflight=2)), eager_dir, 8)
    ref_model = Tiny(0)
    ref.fit(ref_model)
    first = make_trainer(held_until_next_step(lazy), lazy_dir, 4)
    first.fit(Tiny(0))
    assert visible(lazy_dir) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    second = make_trainer(held_until_next_step(lazy), lazy_dir, 8)
    model = Tiny(seed=123)
    second.fit(model, ckpt_path="last")
    assert_same(snapshot(second), snapshot(ref))
    assert model.losses == ref_model.losses[4:]
    assert visible(lazy_dir) == visible(eager_dir) == ["epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    for name in visible(lazy_dir):
        mine = AsyncCheckpointIO().load_checkpoint(os.path.join(lazy_dir, name))
        theirs = AsyncCheckpointIO().load_checkpoint(os.path.join(eager_dir, name))
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch"):
            assert_same(mine[key], theirs[key], f"{name}/{key}")
