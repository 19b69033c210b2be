"""The flatten cache (issue 10, CPU warm stall): a steady state of saves reuses the storage analysis of the
previous flatten; any change of structure (keys, shapes, dtypes, strides, offsets, which tensors share a
storage, lazy conjugate/negative bits, placements) is a miss, and a cached flatten always equals a fresh one."""
from __future__ import annotations

import pytest
import torch

import asyncckpt
from asyncckpt.state import FlattenCache, flatten

pytestmark = pytest.mark.timeout(60)


def described(flat) -> tuple:
    """Everything a flatten decides, tensors by (key, dtype, shape, bytes)."""
    items = tuple((i.key, i.dtype, i.shape, i.device, i.replicated, i.global_shape, i.global_offset,
                   bytes(i.src.contiguous().view(-1).view(torch.uint8).numpy().tobytes())) for i in flat.items)
    return flat.skeleton, items, tuple(flat.views)


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
    assert cache.hits == 2 and cache.misses == 1
    model[1].weight = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    saver.save_checkpoint(save_dir, tag="dtype").result(timeout=30)
    model[1].weight = model[0].weight  # tied
    saver.save_checkpoint(save_dir, tag="tied").result(timeout=30)
    assert cache.misses == 3
    state = asyncckpt.load(save_dir, "tied")["module"]
    assert state["1.weight"].data_ptr() == state["0.weight"].data_ptr()  # saved once, shared again on load
    same(dict(model.state_dict()), dict(state))
    assert asyncckpt.load(save_dir, "dtype")["module"]["1.weight"].dtype == torch.float64
