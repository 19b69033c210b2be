"""``AsyncCheckpointer.load_checkpoint`` is all or nothing: a checkpoint that does not fit, or a load that fails
half-way (a custom module, optimizer or scheduler raising), leaves model, optimizer, scheduler, step counter
and the torch/python/numpy RNG states bit-exactly as they were, and raises a ``CheckpointError`` subclass
naming the key at fault. Also: integer tags load as they save."""
from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, StateMismatchError
from asyncckpt import checkpointer as ckpt_mod

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------- helpers
def everything(saver) -> dict:
    """A deep copy of all a load may change."""
    py = random.getstate()
    np_state = np.random.get_state()
    return copy.deepcopy({
        "model": saver.module.state_dict(),
        "param_ids": [id(p) for p in saver.module.parameters()],
        "optimizer": saver.optimizer.state_dict() if saver.optimizer is not None else None,
        "optimizer_state_ids": [id(v) for s in saver.optimizer.state.values() for v in s.values()]
        if saver.optimizer is not None else None,
        "scheduler": saver.lr_scheduler.state_dict() if saver.lr_scheduler is not None else None,
        "global_steps": saver.global_steps,
        "torch_rng": torch.get_rng_state(),
        "python_rng": py,
        "numpy_rng": (np_state[0], np_state[1], *np_state[2:]),
    })


@pytest.fixture
def live(make_trainer, make_saver):
    """A trained model, AdamW and StepLR wrapped in a saver."""

    def make(trainer=None, **saver_kw):
        t = trainer or make_trainer(seed=0)
        t.train(2)
        saver = make_saver(t, **saver_kw)
        saver.global_steps = 2
        return t, saver

    return make


@pytest.fixture
def checkpoint(make_trainer, make_saver, save_dir, fast_config):
    """``checkpoint(edit)`` → ``(save_dir, tag)`` of the state of another, further trained, trainer after
    ``edit(state)`` changed it (the state is AsyncCheckpointer's: module, optimizer, lr_scheduler, rng, ...)."""
    counter = iter(range(1000))

    def make(edit=lambda state: None, trainer=None):
        src = trainer or make_trainer(seed=7)
        src.train(3)
        saver = make_saver(src)
        random.seed(99), np.random.seed(99), torch.manual_seed(99)
        state = saver.state_dict(client_state={"epoch": 9})
        state = copy.deepcopy(state)
        edit(state)
        tag = f"edited{next(counter)}"
        asyncckpt.save(state, save_dir, tag, config=fast_config()).result(timeout=30)
        random.seed(4321), np.random.seed(4321), torch.manual_seed(4321)  # live RNGs unlike the checkpoint's
        return save_dir, tag

    return make


def assert_refused(saver, before, same, load, *needles, error=StateMismatchError):
    with pytest.raises(CheckpointError) as ei:
        load()
    assert isinstance(ei.value, error), f"{type(ei.value).__name__}: {ei.value}"
    for needle in needles:
        assert needle in str(ei.value), str(ei.value)
    same(before, everything(saver))
    return ei.value


# ------------------------------------------------------------------------- refused before modifying
def test_missing_key_strict(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].pop("hidden.weight"))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "missing keys", "'hidden.weight'")
    saver.load_checkpoint(d, tag, load_module_strict=False)  # non-strict: loads, leaving hidden.weight
    assert torch.equal(t.model.hidden.weight, before["model"]["hidden.weight"])
    assert not torch.equal(t.model.out.weight, before["model"]["out.weight"])


def test_unexpected_key_strict(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].__setitem__("bogus.weight", torch.ones(3)))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "unexpected keys", "'bogus.weight'")


def test_many_offenders_are_listed_up_to_ten(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].update({f"extra{i}": torch.ones(1) for i in range(25)}))
    before = everything(saver)
    err = assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'extra0'", "'extra9'",
                         "(15 more)")
    assert "'extra10'" not in str(err)


def test_frozen_parameters_listed_by_the_checkpoint_may_be_missing(live, checkpoint, make_trainer, same):
    def drop_input(state):
        for k in ("inp.weight", "inp.bias"):
            state["module"].pop(k)
        state["frozen_parameters"] = ["inp.weight"]  # inp.bias is not listed: still missing

    t, saver = live()
    d, tag = checkpoint(drop_input)
    before = everything(saver)
    err = assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag, load_optimizer_states=False),
                         "'inp.bias'")
    assert "'inp.weight'" not in str(err)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("key, shape", [("out.weight", (5, 32)), ("hidden.bias", (32, 1)), ("seen", (1,)),
                                        ("inp.weight", (8, 32))])
def test_shape_mismatch_strict_or_not(live, checkpoint, same, strict, key, shape):
    """torch raises a RuntimeError even when not strict, but only after copying every tensor that fits."""
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].__setitem__(key, torch.zeros(shape, dtype=s["module"][key].dtype)))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag, load_module_strict=strict),
                   repr(key), str(shape))


def test_a_non_tensor_for_a_tensor_is_refused(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].__setitem__("out.bias", [1.0, 2.0]))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag, load_module_strict=False),
                   "'out.bias'", "list")


def test_param_group_count(live, checkpoint, same):
    def two_groups(state):
        groups = state["optimizer"]["param_groups"]
        first = dict(groups[0], params=groups[0]["params"][:3])
        second = dict(groups[0], params=groups[0]["params"][3:])
        state["optimizer"]["param_groups"] = [first, second]

    t, saver = live()
    d, tag = checkpoint(two_groups)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "optimizer.param_groups",
                   "2 parameter groups in the checkpoint, 1 in the optimizer")


def test_params_per_group(live, checkpoint, same):
    def drop_param(state):
        state["optimizer"]["param_groups"][0]["params"].pop()
        state["optimizer"]["state"].pop(len(state["optimizer"]["param_groups"][0]["params"]), None)

    t, saver = live()
    d, tag = checkpoint(drop_param)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "param_groups[0]",
                   "5 parameters in the checkpoint, 6 in the optimizer")


def test_state_for_an_id_no_group_lists(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["optimizer"]["state"].__setitem__(17, {"step": torch.tensor(1.0)}))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "optimizer.state", "17")


@pytest.mark.parametrize("fresh_optimizer", [False, True])
@pytest.mark.parametrize("key, shape", [("exp_avg", (4, 32)), ("exp_avg_sq", (8, 32)), ("exp_avg", (32,))])
def test_state_tensor_shape(live, checkpoint, same, fresh_optimizer, key, shape):
    """torch loads these silently (the next step fails or broadcasts): compared against the live state, or
    against the parameter when the optimizer has no state yet."""
    def wrong_state(state):
        state["optimizer"]["state"][0][key] = torch.zeros(shape)  # param 0 is inp.weight, (32, 8)

    t, saver = live()
    if fresh_optimizer:  # no state yet: the shape is compared with the parameter's
        t.optimizer.state.clear()
    d, tag = checkpoint(wrong_state)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), f"state[0][{key!r}]", str(shape))


def test_parameters_in_another_order_are_refused(make_trainer, make_saver, checkpoint, same):
    """The usual way optimizer state lands on the wrong parameters: a fresh optimizer built over the
    parameters in another order (inp.weight's (32, 8) moments would go to inp.bias)."""
    t = make_trainer(seed=0)
    params = list(t.model.parameters())
    t.optimizer = torch.optim.AdamW(params[::-1], lr=1e-2)
    t.scheduler = torch.optim.lr_scheduler.StepLR(t.optimizer, step_size=2)
    saver = make_saver(t)
    d, tag = checkpoint()
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "state[0]['exp_avg']",
                   "for a parameter of shape (4,)")


def test_missing_optimizer_state(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s.__setitem__("optimizer", None))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'optimizer'",
                   "load_optimizer_states=False")
    saver.load_checkpoint(d, tag, load_optimizer_states=False)
    same(before["optimizer"], t.optimizer.state_dict())


def test_optimizer_entry_that_is_not_a_state_dict(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s.__setitem__("optimizer", {"state": {}}))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'optimizer'", "param_groups")


def test_missing_scheduler_state(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s.__setitem__("lr_scheduler", None))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'lr_scheduler'",
                   "load_lr_scheduler_states=False")
    saver.load_checkpoint(d, tag, load_lr_scheduler_states=False)
    same(before["scheduler"], t.scheduler.state_dict())


@pytest.mark.parametrize("steps", [-1, 2.5, "7", True])
def test_bad_global_steps(live, checkpoint, same, steps):
    t, saver = live()
    d, tag = checkpoint(lambda s: s.__setitem__("global_steps", steps))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'global_steps'")


# ------------------------------------------------------------------------- failing half-way: put back
class RaisingStepLR(torch.optim.lr_scheduler.StepLR):
    """Loads (rebinding attributes, as torch's schedulers do), then raises."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.extra_attribute = 1
        raise RuntimeError("scheduler load failed after changing things")


def test_scheduler_raising(make_trainer, live, checkpoint, same):
    t = make_trainer(seed=0)
    t.scheduler = RaisingStepLR(t.optimizer, step_size=2, gamma=0.5)
    t, saver = live(t)
    d, tag = checkpoint()
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'lr_scheduler'",
                   "scheduler load failed", "nothing was changed")
    assert not hasattr(t.scheduler, "extra_attribute")


def test_sequential_scheduler_failing_in_its_third_child(make_trainer, make_saver, save_dir, same):
    """torch's SequentialLR loads its children one by one: a checkpoint with more children loads two, then
    fails with an IndexError; both children are put back."""
    def sequential(t, n):
        children = [torch.optim.lr_scheduler.StepLR(t.optimizer, step_size=k + 1) for k in range(n)]
        return torch.optim.lr_scheduler.SequentialLR(t.optimizer, children, milestones=list(range(2, 2 * n, 2)))

    src = make_trainer(seed=7)
    src.scheduler = sequential(src, 3)
    src.train(5)
    make_saver(src).save_checkpoint(save_dir, tag="seq3").result(timeout=30)
    t = make_trainer(seed=0)
    t.scheduler = sequential(t, 2)
    t.train(1)
    saver = make_saver(t)
    before = everything(saver)
    children = [copy.deepcopy(c.state_dict()) for c in t.scheduler._schedulers]
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(save_dir, "seq3"), "'lr_scheduler'",
                   "IndexError")
    same(children, [c.state_dict() for c in t.scheduler._schedulers])


class Factor:
    """An lr_lambda object: LambdaLR saves and loads its ``__dict__``."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, epoch: int) -> float:
        return self.factor ** epoch


class RaisingLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        raise RuntimeError("lambda scheduler failed")


def test_lambda_objects_of_a_failing_scheduler_are_put_back(make_trainer, make_saver, save_dir, same):
    src = make_trainer(seed=7)
    src.scheduler = torch.optim.lr_scheduler.LambdaLR(src.optimizer, Factor(0.5))
    src.train(3)
    make_saver(src).save_checkpoint(save_dir, tag="lambda").result(timeout=30)
    t = make_trainer(seed=0)
    factor = Factor(0.9)
    t.scheduler = RaisingLambdaLR(t.optimizer, factor)
    t.train(1)
    saver = make_saver(t)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(save_dir, "lambda"), "'lr_scheduler'",
                   "lambda scheduler failed")
    assert t.scheduler.lr_lambdas[0] is factor and factor.factor == 0.9


class RaisingLinear(torch.nn.Linear):
    """Copies its tensors like any Linear, then raises."""

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        raise RuntimeError("custom module load failed")


class NetLoadingHalf(torch.nn.Module):
    """A root module whose own load_state_dict copies some tensors, then raises."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def load_state_dict(self, state_dict, strict=True, assign=False):
        with torch.no_grad():
            self.net.inp.weight.copy_(state_dict["net.inp.weight"])
            self.net.seen.fill_(12345)
        raise ValueError("root load failed half-way")


@pytest.mark.parametrize("how", ["submodule_class", "post_hook", "pre_hook_late", "root_load_state_dict"])
def test_module_raising_half_way(make_trainer, make_saver, save_dir, same, how):
    """Earlier submodules are already copied into when a later one raises: every parameter and buffer is put
    back, into the same tensor objects (the optimizer refers to them)."""
    src = make_trainer(seed=7)
    src.train(3)
    t = make_trainer(seed=0)
    t.train(2)
    if how == "submodule_class":
        for m in (src.model, t.model):
            m.out.__class__ = RaisingLinear  # `out` is loaded last
    elif how == "post_hook":
        t.model.register_load_state_dict_post_hook(lambda module, keys: (_ for _ in ()).throw(KeyError("post")))
    elif how == "pre_hook_late":
        t.model.out.register_load_state_dict_pre_hook(lambda *a: (_ for _ in ()).throw(KeyError("pre")))
    else:
        src.model, t.model = NetLoadingHalf(src.model), NetLoadingHalf(t.model)
    make_saver(src.model, src.optimizer, src.scheduler).save_checkpoint(save_dir, tag="src").result(timeout=30)
    saver = make_saver(t.model, t.optimizer, t.scheduler)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(save_dir, "src"), "'module'",
                   "nothing was changed")


class InPlaceAdamW(torch.optim.AdamW):
    """Its own load_state_dict changes the live state in place, then raises."""

    def load_state_dict(self, state_dict):
        for s in self.state.values():
            s["exp_avg"].add_(1.0)
            s["step"] = torch.tensor(999.0)
        self.param_groups[0]["lr"] = 123.0
        self.param_groups.append({"params": [], "lr": 0.0})
        raise RuntimeError("custom optimizer load failed")


def test_custom_optimizer_raising_half_way(make_trainer, make_saver, checkpoint, same):
    t = make_trainer(seed=0)
    t.optimizer = InPlaceAdamW(t.model.parameters(), lr=1e-2)
    t.scheduler = torch.optim.lr_scheduler.StepLR(t.optimizer, step_size=2, gamma=0.5)
    t.train(2)
    saver = make_saver(t)
    d, tag = checkpoint()
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'optimizer'",
                   "custom optimizer load failed")
    assert len(t.optimizer.param_groups) == 1 and t.optimizer.param_groups[0]["lr"] != 123.0


def test_optimizer_load_hook_raising(live, checkpoint, same):
    t, saver = live()
    t.optimizer.register_load_state_dict_post_hook(lambda opt: (_ for _ in ()).throw(RuntimeError("hook")))
    d, tag = checkpoint()
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'optimizer'", "hook")


def test_torch_optimizer_failing_inside_its_own_load(live, checkpoint, same):
    """AdamW.__setstate__ raises KeyError for a state entry without 'step', after the new state was swapped
    in: putting the old ``state``/``param_groups`` objects back is enough (no copy of the state is kept)."""
    t, saver = live()
    d, tag = checkpoint(lambda s: s["optimizer"]["state"][0].pop("step"))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'optimizer'", "KeyError")


def test_broken_rng_state(live, checkpoint, same):
    """The python RNG state is set before the torch one fails: both are put back."""
    t, saver = live()
    d, tag = checkpoint(lambda s: s["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)))
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'RNG'")
    saver.load_checkpoint(d, tag, load_rng_states=False)  # everything else loads


def test_interrupt_half_way_is_put_back_and_let_through(make_trainer, make_saver, checkpoint, same):
    class Interrupted(torch.optim.lr_scheduler.StepLR):
        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            raise KeyboardInterrupt

    t = make_trainer(seed=0)
    t.scheduler = Interrupted(t.optimizer, step_size=2)
    t.train(2)
    saver = make_saver(t)
    d, tag = checkpoint()
    before = everything(saver)
    with pytest.raises(KeyboardInterrupt):
        saver.load_checkpoint(d, tag)
    same(before, everything(saver))


def test_model_loaded_by_torch_alone_is_not_copied(live, checkpoint, monkeypatch, same):
    """The memory choice: no copy of a plain model (nor of a torch optimizer's state) is taken."""
    t, saver = live()
    d, tag = checkpoint()
    assert ckpt_mod._torch_loads_module(t.model)
    assert ckpt_mod._OptimizerUndo(t.optimizer).contents is None
    monkeypatch.setattr(ckpt_mod, "_ModuleUndo", None)  # would raise if called
    saver.load_checkpoint(d, tag)
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))  # torch's own load hook
    assert ckpt_mod._torch_loads_module(lazy)
    lazy.register_load_state_dict_post_hook(lambda module, keys: None)
    assert not ckpt_mod._torch_loads_module(lazy)


def test_unexpected_failure_of_torchs_own_module_load_says_so(live, checkpoint, monkeypatch, same):
    """The one part not copied: the error says the model may be partly loaded, everything else is put back."""
    t, saver = live()
    d, tag = checkpoint()
    real = torch.nn.Linear._load_from_state_dict

    def failing(self, state_dict, prefix, *args, **kwargs):
        real(self, state_dict, prefix, *args, **kwargs)
        if prefix == "out.":
            raise torch.OutOfMemoryError("injected")

    failing.__module__ = "torch.nn.modules.linear"  # counts as torch's code
    monkeypatch.setattr(torch.nn.Linear, "_load_from_state_dict", failing)
    before = everything(saver)
    with pytest.raises(CheckpointError, match="put back: RNG, optimizer, lr_scheduler; the module may be partly") as ei:
        saver.load_checkpoint(d, tag)
    assert not isinstance(ei.value, StateMismatchError) and "'module'" in str(ei.value)
    after = everything(saver)
    for part in ("optimizer", "scheduler", "global_steps", "torch_rng", "python_rng", "numpy_rng"):
        same(before[part], after[part])


def test_no_memory_for_the_module_copy_is_refused_before_loading_the_module(make_trainer, make_saver, checkpoint,
                                                                            monkeypatch, same):
    """Taking the copy that undoes the module (custom loading code) can fail, out of memory: the parts loaded
    before it are put back and nothing else happens."""
    def no_memory(module):
        raise torch.OutOfMemoryError("injected: no memory for the copy")

    t = make_trainer(seed=0)
    t.model.out.__class__ = RaisingLinear
    t.train(2)
    saver = make_saver(t)
    d, tag = checkpoint()
    monkeypatch.setattr(ckpt_mod, "_ModuleUndo", no_memory)
    before = everything(saver)
    assert_refused(saver, before, same, lambda: saver.load_checkpoint(d, tag), "'module'", "no memory for the copy",
                   "nothing was changed")


# --------------------------------------------------------------------------------- no false refusals
def test_dtype_differences_are_cast_as_torch_does(live, checkpoint, same):
    t, saver = live()
    d, tag = checkpoint(lambda s: s["module"].__setitem__("out.weight", s["module"]["out.weight"].double()))
    saver.load_checkpoint(d, tag)
    assert t.model.out.weight.dtype == torch.float32
    assert torch.equal(t.model.out.weight, asyncckpt.load(d, tag)["module"]["out.weight"].float())


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.LBFGS(ps, lr=0.1, history_size=3),
    lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
], ids=["lbfgs", "adafactor", "sgd", "adagrad"])
def test_torch_optimizer_layouts_load_into_fresh_optimizers(make_saver, save_dir, same, make_opt):
    """Flat (LBFGS, whose first parameter here is 1-D), factored (Adafactor), element-wise: all fit."""
    def model_and_opt(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        return model, make_opt(list(model.parameters()))

    src, opt = model_and_opt(0)
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = src(x).square().sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    make_saver(src, opt).save_checkpoint(save_dir, tag="opt").result(timeout=30)
    dst, fresh = model_and_opt(1)
    make_saver(dst, fresh).load_checkpoint(save_dir, "opt")
    same(opt.state_dict(), fresh.state_dict())


class ProjectedSGD(torch.optim.Optimizer):
    """A custom optimizer keeping state of its own layout (a low-rank projection, as GaLore does)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["proj"] = torch.ones(2, p.numel())


def test_custom_optimizer_layout_loads_into_a_fresh_optimizer(make_saver, save_dir, same):
    src = torch.nn.Linear(4, 3)
    opt = ProjectedSGD(src.parameters())
    opt.step()
    make_saver(src, opt).save_checkpoint(save_dir, tag="p").result(timeout=30)
    dst = torch.nn.Linear(4, 3)
    fresh = ProjectedSGD(dst.parameters())
    make_saver(dst, fresh).load_checkpoint(save_dir, "p")
    same(opt.state_dict(), fresh.state_dict())


# ------------------------------------------------------------------------------------------- int tags
def test_int_tags_load_as_they_save(save_dir, make_trainer, make_saver, same):
    t = make_trainer()
    saver = make_saver(t)
    t.train(1)
    assert saver.save_checkpoint(save_dir, tag=100).result(timeout=30).tag == "100"
    saver.save_checkpoint(save_dir, tag=np.int64(7)).result(timeout=30)
    expected = copy.deepcopy(t.model.state_dict())
    t.train(1)
    path, _ = saver.load_checkpoint(save_dir, tag=100)
    assert path == os.path.join(save_dir, "100")
    same(expected, t.model.state_dict())
    assert saver.load_checkpoint(save_dir, tag="100")[0] == path
    assert saver.load_checkpoint(save_dir, tag=np.int64(7))[0] == os.path.join(save_dir, "7")
    assert saver.load_checkpoint(save_dir)[0].endswith("7")  # None is still `latest`


@pytest.mark.parametrize("tag", [True, 1.5, b"100", ["a"]])
def test_other_tag_types_are_refused_by_save_and_load(save_dir, make_trainer, make_saver, tag):
    saver = make_saver(make_trainer())
    saver.save_checkpoint(save_dir, tag="ok").result(timeout=30)
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        saver.save_checkpoint(save_dir, tag=tag)
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        saver.load_checkpoint(save_dir, tag=tag)
    assert sorted(os.listdir(save_dir)) == ["latest", "ok"]
