"""The flatten cache (issue 10, CPU warm stall): a steady state of saves reuses the storage analysis of the
previous flatten, and replays its skeleton instead of walking the state; any change of structure (keys,
container types, shapes, dtypes, strides, offsets, which tensors share a storage, lazy conjugate/negative
bits, placements) is a miss, and a cached flatten always equals a fresh one, skeleton text included."""
from __future__ import annotations

import collections
import enum
import json

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.errors import CheckpointError
from asyncckpt.state import FlattenCache, flatten

pytestmark = pytest.mark.timeout(60)


def described(flat) -> tuple:
    """Everything a flatten decides, tensors by (key, dtype, shape, bytes)."""
    items = tuple((i.key, i.dtype, i.shape, i.device, i.replicated, i.global_shape, i.global_offset,
                   bytes(i.src.contiguous().view(-1).view(torch.uint8).numpy().tobytes())) for i in flat.items)
    return json.dumps(flat.skeleton, allow_nan=False), items, tuple(flat.views)


def base_state() -> dict:
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    return {"w": w, "b": torch.randn(6), "list": [torch.arange(5), torch.zeros(0)], "n": 3}


def variants():
    """(name, state, reused): each state differs in structure from the one before, unless ``reused``."""
    s = base_state()
    yield "first", base_state(), False
    yield "new objects, same structure", {**base_state(), "b": torch.randn(6), "n": 4}, True
    yield "shape", {**s, "b": torch.randn(7)}, False
    yield "dtype", {**s, "b": torch.randn(7, dtype=torch.float64)}, False
    yield "key added", {**s, "c": torch.ones(2)}, False
    yield "key renamed", {**{k: v for k, v in s.items() if k != "b"}, "B": s["b"]}, False
    tied = torch.randn(6)
    yield "tied (one tensor twice)", {**s, "b": tied, "b2": tied}, False
    yield "untied, same shapes", {**s, "b": torch.randn(6), "b2": torch.randn(6)}, False
    base = torch.randn(10)
    yield "views of one storage", {**s, "b": base[0:6], "b2": base[4:10]}, False
    other = torch.randn(10)
    yield "the same views of another storage", {**s, "b": other[0:6], "b2": other[4:10]}, True
    yield "same views, separate storages", {**s, "b": torch.randn(10)[0:6], "b2": torch.randn(10)[4:10]}, False
    base = torch.randn(10)
    yield "views at other offsets", {**s, "b": base[1:7], "b2": base[3:9]}, False
    yield "transposed (stride)", {**s, "w": torch.randn(6, 4).t()}, False
    c = torch.randn(3, dtype=torch.complex64)
    yield "conj twice", {**s, "c1": c.conj(), "c2": c.conj()}, False
    yield "conj and neg", {**s, "c1": c.conj(), "c2": c._neg_view()}, False
    yield "numpy array", {**s, "a": torch.randn(3).numpy()}, False
    yield "numpy array, new object", {**s, "a": torch.randn(3).numpy()}, True


def test_cached_flatten_equals_a_fresh_one_across_structure_changes():
    cache = FlattenCache()
    for name, state, reused in variants():
        hits = cache.hits
        cached = flatten(state, cache=cache)
        assert cache.hits == hits + reused, name
        assert described(cached) == described(flatten(state)), name


@pytest.mark.parametrize("name, first, second", [
    ("shape", {"x": torch.zeros(4)}, {"x": torch.zeros(5)}),
    ("dtype", {"x": torch.zeros(4)}, {"x": torch.zeros(4, dtype=torch.int32)}),
    ("key", {"x": torch.zeros(4)}, {"y": torch.zeros(4)}),
    ("stride", {"x": torch.zeros(2, 3)}, {"x": torch.zeros(3, 2).t()}),
    ("offset", {"x": torch.zeros(8)[0:4]}, {"x": torch.zeros(8)[2:6]}),
])
def test_each_structural_change_misses(name, first, second):
    cache = FlattenCache()
    flatten(first, cache=cache)
    flatten({k: v.clone() if v.is_contiguous() else v for k, v in first.items()}, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1), name
    assert described(flatten(second, cache=cache)) == described(flatten(second)), name
    assert cache.misses == 2, name


def test_saver_reuses_the_plan_and_follows_a_model_change(save_dir, make_saver, same):
    """A saver's steady state hits the cache; replacing a parameter by one of another shape and tying two
    weights are followed: every checkpoint loads as the state it was saved from."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = make_saver(model, opt)
    cache = saver._flatten_cache
    for i in range(3):
        saver.save_checkpoint(save_dir, tag=f"s{i}").result(timeout=30)
    assert cache.hits == 2 and cache.misses == 1 and cache.replays == 2
    model[1].weight = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    saver.save_checkpoint(save_dir, tag="dtype").result(timeout=30)
    model[1].weight = model[0].weight  # tied
    saver.save_checkpoint(save_dir, tag="tied").result(timeout=30)
    assert cache.misses == 3
    state = asyncckpt.load(save_dir, "tied")["module"]
    assert state["1.weight"].data_ptr() == state["0.weight"].data_ptr()  # saved once, shared again on load
    same(dict(model.state_dict()), dict(state))
    assert asyncckpt.load(save_dir, "dtype")["module"]["1.weight"].dtype == torch.float64


# ------------------------------------------------------------------------------------------------ replay
def _complex() -> torch.Tensor:
    return torch.randn(4, dtype=torch.complex64)


def _views(z: torch.Tensor, conj: bool = False) -> list:
    """Two overlapping views of one complex storage (staged once, as a span), the second maybe conjugated."""
    return [z[0:3], (z.conj() if conj else z)[1:4]]


def _parts(z: torch.Tensor, neg: bool = False) -> list:
    """The real and imaginary parts of one complex storage, the second maybe with the negative bit."""
    return [z.real, (z.conj() if neg else z).imag]


def rich() -> dict:
    """A state with every container and scalar kind the replay matches (module-like, optimizer-like, RNG)."""
    torch.manual_seed(0)
    module = collections.OrderedDict([("w", torch.randn(3, 4)), ("b", torch.randn(4))])
    module._metadata = collections.OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])
    return {
        "module": module,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(3, 4)}, 1: {"m": torch.randn(4)}},
                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "name": "g"}]},
        "rng": {"python": (3, tuple(range(1000, 1625)), None), "numpy": ("MT19937", np.arange(8, dtype=np.uint32), 5),
                "torch": torch.arange(16, dtype=torch.uint8)},
        "steps": 7, "flag": True, "none": None, "f": 1.5, "zero": 0.0, "text": "a",
        "ints": [1, 2, 3], "floats": [1.0, 2.0], "flags": [True, False], "mixed": [1, 2.0, "x", None],
        "keys": {1: "a", None: 3.0, 2.5: 5, "s": 1}, "bools": {False: 1}, "fkeys": {0.0: 1},
        "empty": [], "arrays": [np.zeros(3), np.ones(3)], "zpair": _views(torch.randn(4, dtype=torch.complex64)),
        "parts": _parts(torch.randn(4, dtype=torch.complex64)),
        "nested": [[1, [2, {"deep": torch.zeros(2)}]], ()],
    }


class Color(enum.IntEnum):
    RED = 1


class Sub(torch.Tensor):
    pass


class Name(str):
    pass


def changed(edit):
    def make():
        state = rich()
        edit(state)
        return state
    return make


def _set(path, value):
    def edit(state):
        *parents, last = path
        target = state
        for p in parents:
            target = target[p]
        target[last] = value(state) if callable(value) else value
    return edit


REPLAYED = {
    "the same state object": None,
    "new tensor objects, same values": changed(lambda s: None),
    "a tensor replaced by another of its shape": changed(_set(("module", "w"), lambda s: torch.randn(3, 4) + 5)),
    "a parameter for a tensor": changed(_set(("module", "w"), lambda s: torch.nn.Parameter(torch.randn(3, 4)))),
    "an int changed": changed(_set(("steps",), 8)),
    "a float changed": changed(_set(("f",), 2.5)),
    "a float to nan": changed(_set(("f",), float("nan"))),
    "a float to -inf": changed(_set(("f",), float("-inf"))),
    "0.0 to -0.0": changed(_set(("zero",), -0.0)),
    "a bool to an int": changed(_set(("flag",), 1)),
    "an int to a bool": changed(_set(("steps",), True)),
    "None to a string": changed(_set(("none",), "x")),
    "a string changed": changed(_set(("text",), "b")),
    "a learning rate changed": changed(lambda s: s["optimizer"]["param_groups"][0].update(lr=0.2)),
    "a tuple of floats changed": changed(lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.8, 0.9))),
    "an RNG state changed": changed(_set(("rng", "python"), (3, tuple(range(2000, 2625)), None))),
    "an int list to floats": changed(_set(("ints",), [1, 2.0, 3])),
    "an int list to a bool": changed(_set(("ints",), [1, True, 3])),
    "an int list to -0.0": changed(_set(("ints",), [1, -0.0, 3])),
    "a float list to equal ints": changed(_set(("floats",), [1, 2])),
    "a bool list to equal ints": changed(_set(("flags",), [1, 0])),
    "a mixed list to ints": changed(_set(("mixed",), [1, 2, 3, 4])),
    "a mixed list to strings": changed(_set(("mixed",), ["1", "2", "x", "y"])),
    "an int list to strings": changed(_set(("ints",), ["a", "b", "c"])),
    "an int list to big ints": changed(_set(("ints",), [10 ** 100, -10 ** 200, 3])),
    "a list without tensors to a scalar": changed(_set(("ints",), 5)),
    "a dict value changed": changed(_set(("keys", 2.5), 6)),
    "a module version changed": changed(lambda s: s["module"]._metadata["sub"].update(version=3)),
    "a numpy array, new object and values": changed(_set(("rng", "numpy"),
                                                         ("MT19937", np.arange(8, 16, dtype=np.uint32), 6))),
    "a tensor deep in lists": changed(_set(("nested", 0, 1, 1, "deep"), lambda s: torch.ones(2))),
}

MISSED = {
    "a shape": changed(_set(("module", "b"), lambda s: torch.randn(5))),
    "a dtype": changed(_set(("module", "b"), lambda s: torch.randn(4, dtype=torch.float64))),
    "a stride": changed(_set(("module", "w"), lambda s: torch.randn(4, 3).t())),
    "an offset": changed(_set(("module", "b"), lambda s: torch.randn(6)[2:6])),
    "tied": changed(_set(("optimizer", "state", 0, "m"), lambda s: s["module"]["w"])),
    "views of one storage": changed(lambda s: s["module"].update(b=s["optimizer"]["state"][1]["m"][0:4])),
    "a key added": changed(_set(("extra",), 1)),
    "a key removed": changed(lambda s: s.pop("text")),
    "a key renamed": changed(lambda s: s.__setitem__("text2", s.pop("text"))),
    "keys reordered": changed(lambda s: s.__setitem__("steps", s.pop("steps"))),
    "a module key reordered": changed(lambda s: s["module"].move_to_end("w")),
    "an int key to a string key": changed(lambda s: s["keys"].__setitem__("1", s["keys"].pop(1))),
    "a bool key to an int key": changed(_set(("bools",), {0: 1})),
    "a float key to another": changed(lambda s: s.__setitem__("keys", {1: "a", None: 3.0, 2.25: 5, "s": 1})),
    "0.0 key to -0.0": changed(_set(("fkeys",), {-0.0: 1})),
    "a dict to an OrderedDict": changed(_set(("keys",), lambda s: collections.OrderedDict(s["keys"]))),
    "an OrderedDict to a dict": changed(_set(("module",), lambda s: dict(s["module"]))),
    "metadata removed": changed(lambda s: delattr(s["module"], "_metadata")),
    "a list to a tuple": changed(_set(("ints",), (1, 2, 3))),
    "a tuple to a list": changed(lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.9, 0.999])),
    "a list longer": changed(_set(("ints",), [1, 2, 3, 4])),
    "a tensor to a scalar": changed(_set(("module", "b"), 4)),
    "a scalar to a tensor": changed(_set(("steps",), lambda s: torch.ones(1))),
    "a scalar to a list": changed(_set(("steps",), [7])),
    "a tensor to a numpy array": changed(_set(("module", "b"), lambda s: np.zeros(4, dtype=np.float32))),
    "a numpy array to a tensor": changed(_set(("rng", "numpy"), ("MT19937", torch.arange(8), 5))),
    "a numpy array twice": changed(lambda s: s["rng"].update(numpy=("MT19937", s["rng"]["numpy"][1], 5),
                                                             again=s["rng"]["numpy"][1])),
    "one numpy array twice for two": changed(lambda s: s["arrays"].__setitem__(1, s["arrays"][0])),
    "a conjugate view of a shared storage": changed(_set(("zpair",), lambda s: _views(_complex(), True))),
    "a negative view of a shared storage": changed(_set(("parts",), lambda s: _parts(_complex(), True))),
    "a numpy dtype": changed(_set(("rng", "numpy"), ("MT19937", np.arange(8, dtype=np.int64), 5))),
    "a numpy shape": changed(_set(("rng", "numpy"), ("MT19937", np.arange(9, dtype=np.uint32), 5))),
    "a big-endian numpy array": changed(_set(("rng", "numpy"), ("MT19937", np.arange(8, dtype=">u4"), 5))),
    "a conjugate view": changed(_set(("c",), lambda s: torch.randn(3, dtype=torch.complex64).conj())),
    "a negative view": changed(_set(("module", "b"), lambda s: torch.randn(4, dtype=torch.complex64).conj().imag)),
    "a tensor subclass": changed(_set(("module", "b"), lambda s: torch.randn(4).as_subclass(Sub))),
    "a numpy scalar for a float": changed(_set(("f",), np.float64(1.5))),
    "an int enum for an int": changed(_set(("steps",), Color.RED)),
    "a str subclass for a str": changed(_set(("text",), Name("b"))),
    "bytes for a string": changed(_set(("text",), b"a")),
    "an int too long": changed(_set(("steps",), 10 ** 5000)),
    "an int too long in a list": changed(_set(("ints",), [1, 10 ** 5000])),
    "a dtype for a scalar": changed(_set(("none",), torch.float32)),
}


def outcome(state, **kw):
    """What flattening ``state`` gives: its description, or the error it raises."""
    try:
        return described(flatten(state, **kw))
    except CheckpointError as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize("name", [*REPLAYED, *MISSED])
def test_replay_equals_a_fresh_flatten(name):
    """Each change of a saved state, after a flatten of the original: a replay (the skeleton reused, the walk
    skipped) exactly where nothing but scalars and tensor contents changed, and the same skeleton, items,
    views and errors as a flatten without a cache either way."""
    replayed = name in REPLAYED
    cache = FlattenCache()
    first = rich()
    flatten(first, cache=cache)
    second = first if REPLAYED.get(name) is None and replayed else (REPLAYED.get(name) or MISSED[name])()
    replays = cache.replays
    got = outcome(second, cache=cache)
    assert got == outcome(second), name
    assert cache.replays == replays + replayed, name
    assert cache.replays == replays or not isinstance(got[0], type), name


def test_every_missed_change_is_a_change():
    """The miss cases differ from the original state in what a flatten produces (else they test nothing)."""
    base = outcome(rich())
    for name, make in MISSED.items():
        assert outcome(make()) != base, name


def test_replay_after_a_miss_and_after_an_error():
    """A miss or an error leaves the cache usable: the original state flattens right after it, then replays."""
    cache = FlattenCache()
    flatten(rich(), cache=cache)
    for name, make in MISSED.items():
        outcome(make(), cache=cache)
        assert outcome(rich(), cache=cache) == outcome(rich()), name
        before = cache.replays
        assert outcome(rich(), cache=cache) == outcome(rich()), name
        assert cache.replays == before + 1, name


def test_a_replayed_skeleton_never_changes_an_earlier_one():
    """Skeletons share unchanged nodes; a changed scalar anywhere gets a node of its own."""
    cache = FlattenCache()
    states = [rich(), changed(_set(("rng", "python"), (3, tuple(range(5, 630)), None)))(),
              changed(lambda s: s["module"]._metadata["sub"].update(version=9))(),
              changed(lambda s: s["optimizer"]["param_groups"][0].update(lr=0.5, params=[1, 0]))()]
    flats = [flatten(s, cache=cache) for s in states]
    assert cache.replays == 3
    for state, flat in zip(states, flats):
        assert described(flat) == described(flatten(state))


def test_replay_follows_the_replicated_predicate_and_lists_leaves():
    cache = FlattenCache()
    state = rich()
    flatten(state, cache=cache, replicated=lambda key: key.startswith("module/"))
    other = lambda key: key.startswith("module/")  # noqa: E731 - another predicate object: never replayed
    assert described(flatten(state, cache=cache, replicated=other)) == described(flatten(state, replicated=other))
    assert cache.replays == 0
    fresh, cached = [], []
    flatten(state, leaves=fresh, replicated=other)
    flatten(state, cache=cache, leaves=cached, replicated=other)
    assert cache.replays == 1
    seen = lambda leaves: [(k, t.dtype, t.shape, t.tolist()) for k, t in leaves]  # noqa: E731
    assert seen(cached) == seen(fresh)
    live = lambda leaves: [t.data_ptr() for k, t in leaves if k.startswith(("module/", "optimizer/"))]  # noqa: E731
    assert live(cached) == live(fresh)  # the state's own tensors (numpy arrays are copied at each flatten)
