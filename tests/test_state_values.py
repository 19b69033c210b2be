"""Values the state walker must save faithfully or refuse clearly: keys of every type whose text forms collide,
tensors with a lazy conjugate / negative bit, tensors and numpy values that cannot be saved, huge ints, numpy
arrays viewing one buffer, and containers nested deeper than MAX_DEPTH (at save and in a forged skeleton)."""
from __future__ import annotations

import collections
import enum
import math
import os
import sys

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt import state as st
from asyncckpt.errors import (KeyCollisionError, PickleNotAllowedError, UnsafeCheckpointError,
                              UnsupportedStateError)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    LOW = 1


class Name(str, enum.Enum):
    A = "A"


def roundtrip(state, save_dir, config, tag="t", allow_pickle=False):
    asyncckpt.save(state, save_dir, tag, config=config(allow_pickle=allow_pickle)).result(timeout=60)
    return asyncckpt.load(save_dir, tag, allow_pickle=allow_pickle)


def same_key(a, b) -> bool:
    """Same type and value (NaN equals NaN, -0.0 differs from 0.0, tensors by their values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_key(x, y) for x, y in zip(a, b))
    return a == b


def assert_entries(live: dict, loaded: dict, where: str) -> None:
    """Every entry of ``live`` came back in order, with a key of the same type and value, and its tensor."""
    assert type(loaded) is type(live), where
    assert len(loaded) == len(live), f"{where}: {len(live)} entries saved, {len(loaded)} loaded"
    for (k1, v1), (k2, v2) in zip(live.items(), loaded.items()):
        assert same_key(k1, k2), f"{where}: key {k1!r} ({type(k1).__name__}) came back as {k2!r} ({type(k2).__name__})"
        assert torch.equal(v1, v2), f"{where}: the value of {k1!r} came back as another tensor's"


# ------------------------------------------------------------------------------------ 1. key paths collide
NAN_A, NAN_B = float("nan"), float("nan")  # distinct objects: both can be keys of one dict
T_KEY = torch.tensor([7.0])

# (first key, second key, needs allow_pickle): pairs whose str/repr forms are equal, or that equal an encoding
KEY_PAIRS = {
    "int vs str": (1, "1", False),
    "negative int vs str": (-5, "-5", False),
    "None vs str": (None, "None", False),
    "True vs str": (True, "True", False),
    "False vs str": (False, "False", False),
    "float vs str": (1.5, "1.5", False),
    "-0.0 vs str": (-0.0, "-0.0", False),
    "inf vs str": (float("inf"), "inf", False),
    "-inf vs str": (float("-inf"), "-inf", False),
    "nan vs str": (NAN_A, "nan", False),
    "nan vs nan": (NAN_A, NAN_B, False),
    "int vs float": (2, 2.5, False),
    "tuple vs its repr": ((1, 2), "(1, 2)", False),
    "tuple vs str of its item": (("a",), "a", False),
    "dtype vs str": (torch.float32, "torch.float32", False),
    "tensor key vs its repr": (T_KEY, repr(T_KEY), False),
    "enum vs str": (Color.RED, "Color.RED", True),
    "IntEnum vs str": (Level.LOW, "1", True),
    "str enum vs its name": (Name.A, "Name.A", True),
    "empty str vs marker": ("", "~e", False),
    "str vs int marker": ("~i1", 1, False),
    "str vs None marker": ("~n", None, False),
    "str vs bool marker": ("~b1", True, False),
    "str vs float marker": ("~f1.5", 1.5, False),
    "str vs key-object marker": ("~k0", (0,), False),
    "slash vs escape": ("a/b", "a~1b", False),
    "tilde vs escape": ("~", "~0", False),
}


def _wrap(where: str, d: dict):
    if where == "root":
        return d, lambda s: s
    if where == "nested":
        return {"m": d, "other": torch.zeros(1)}, lambda s: s["m"]
    if where == "odict":
        return {"m": collections.OrderedDict(d)}, lambda s: s["m"]
    if where == "in list":
        return {"l": [torch.ones(1), {"x": d}]}, lambda s: s["l"][1]["x"]
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["root", "nested", "odict", "in list"])
@pytest.mark.parametrize("name", list(KEY_PAIRS))
def test_keys_whose_text_collides_round_trip(name, where, save_dir, fast_config):
    k1, k2, pickled = KEY_PAIRS[name]
    inner = {k1: torch.full((3,), 1.0), k2: torch.full((3,), 2.0)}
    assert len(inner) == 2
    state, pick = _wrap(where, inner)
    out = roundtrip(state, save_dir, fast_config, allow_pickle=pickled)
    assert_entries(pick(state), pick(out), f"{name} at {where}")


@pytest.mark.parametrize("where", ["root", "nested", "odict"])
def test_every_key_type_in_one_dict(where, save_dir, fast_config):
    keys = [1, "1", None, "None", False, "False", 0.25, "0.25", -0.0, NAN_A, NAN_B, float("inf"), (1, "x"),
            torch.int8, "", "~e", "~k1", "a/b", "a~1b", T_KEY]
    inner = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
    state, pick = _wrap(where, inner)
    assert_entries(pick(state), pick(roundtrip(state, save_dir, fast_config)), where)


@pytest.mark.parametrize("make_key", [lambda t: t, lambda t: (t,), lambda t: (1, (t, "x"))],
                         ids=["tensor", "tuple of a tensor", "nested tuple"])
def test_key_object_holding_tensors_and_its_value_are_apart(make_key, save_dir, fast_config):
    """A key object that holds tensors is saved under its own path, apart from its value's."""
    key = make_key(torch.tensor([1.0, 2.0]))
    out = roundtrip({"d": {key: torch.tensor([3.0])}}, save_dir, fast_config)
    (k, v), = out["d"].items()
    assert same_key(k, key) and torch.equal(v, torch.tensor([3.0]))


def test_empty_root_key_and_root_key_named_like_its_child(save_dir, fast_config):
    state = {"": {"w": torch.ones(2)}, "w": torch.zeros(2)}
    out = roundtrip(state, save_dir, fast_config)
    assert torch.equal(out[""]["w"], torch.ones(2)) and torch.equal(out["w"], torch.zeros(2))


@pytest.mark.parametrize("user_key", ["#storage", "~s", "~0s"])
def test_user_key_named_like_a_storage_record(user_key, save_dir, fast_config):
    base = torch.arange(8.0)
    state = {"a": base[:4], "b": base[2:6], user_key: {"a": torch.full((4,), -1.0)}}
    out = roundtrip(state, save_dir, fast_config)
    assert torch.equal(out["a"], base[:4]) and torch.equal(out["b"], base[2:6])
    assert torch.equal(out[user_key]["a"], torch.full((4,), -1.0))
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()  # still shared


def test_odict_item_named_like_its_metadata(save_dir, fast_config):
    od = collections.OrderedDict(_metadata={"t": torch.ones(2)}, w=torch.zeros(2))
    od._metadata = {"t": torch.full((2,), 5.0)}
    out = roundtrip({"m": od}, save_dir, fast_config)
    assert torch.equal(out["m"]["_metadata"]["t"], torch.ones(2))
    assert torch.equal(out["m"]._metadata["t"], torch.full((2,), 5.0))


def test_string_keys_keep_their_plain_paths():
    """Module and optimizer key paths stay readable (DDP replication matches on them)."""
    flat = st.flatten({"module": {"fc.weight": torch.ones(1)}, "a/b": {"~x": torch.ones(1)},
                       "opt": {"state": {0: {"exp_avg": torch.ones(1)}}}, "": torch.ones(1)})
    assert [i.key for i in flat.items] == ["module/fc.weight", "a~1b/~0x", "opt/state/~i0/exp_avg", "~e"]


def test_key_parts_are_distinct():
    samples = ["", "~", "~0", "~1", "/", "a/b", "~e", "~i1", "~n", "~b1", "~f1.5", "~k0", "~K0", "~m", "~s", "0",
               "1", "None", "True", "1.5", "nan"]
    parts = [st.key_part(k, 0) for k in samples]
    parts += [st.key_part(k, 0) for k in (0, 1, -1, True, False, None, 0.0, -0.0, 1.5, float("inf"), float("-inf"))]
    parts += [st.key_part(k, i) for i, k in enumerate([NAN_A, (1,), Color.RED, Level.LOW, Name.A], start=1)]
    assert len(set(parts)) == len(parts), parts
    assert all(p and "/" not in p for p in parts)
    assert not any(p.startswith(("~s", "~m", "~K")) for p in parts)  # reserved: storages, _metadata, key objects


def test_collision_guard_names_both_key_paths(monkeypatch):
    """The last line: if an encoding ever gave two tensors one key path, the save stops at once."""
    monkeypatch.setattr(st, "key_part", lambda key, index: str(key))
    with pytest.raises(KeyCollisionError) as ei:
        st.flatten({"m": {1: torch.ones(1), "1": torch.zeros(1)}})
    assert "'m/1'" in str(ei.value) and "['m'][1]" in str(ei.value) and "['m']['1']" in str(ei.value)


def test_checkpoints_with_other_key_names_still_load(save_dir, fast_config, monkeypatch):
    """Loading takes every key from the skeleton node: a checkpoint written with the v1 naming (``str(key)``
    parts, ``#storage/`` records) loads the same."""
    base = torch.arange(10.0)
    state = {"opt": {"state": {0: {"exp_avg": torch.ones(3)}, 1: {"exp_avg": torch.zeros(3)}}},
             "a": base[:5], "b": base[5:], "t": (torch.full((2,), 3.0),)}
    with monkeypatch.context() as m:
        m.setattr(st, "key_part", lambda key, index: st.escape(str(key)))
        m.setattr(st, "STORAGE_PREFIX", "#storage/")
        asyncckpt.save(state, save_dir, "old", config=fast_config()).result(timeout=60)
    reader = asyncckpt.CheckpointReader(save_dir, "old")
    assert {"opt/state/0/exp_avg", "#storage/a"} <= set(reader.records)
    out = asyncckpt.load(save_dir, "old")
    assert list(out["opt"]["state"]) == [0, 1]
    assert torch.equal(out["opt"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(out["opt"]["state"][1]["exp_avg"], torch.zeros(3))
    assert torch.equal(out["a"], base[:5]) and torch.equal(out["b"], base[5:])
    assert torch.equal(out["t"][0], torch.full((2,), 3.0))


# -------------------------------------------------------------------------- 2. conjugate / negative views
def _complex(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.complex(torch.randn(n, generator=g), torch.randn(n, generator=g))


VIEWS = {
    "conj": lambda x, r: x.conj(),
    "neg (imag of conj)": lambda x, r: x.conj().imag,
    "_neg_view of real": lambda x, r: torch._neg_view(r),
    "_neg_view of complex": lambda x, r: torch._neg_view(x),
    "conj and neg": lambda x, r: torch._neg_view(x.conj()),
    "slice of conj": lambda x, r: x.conj()[1:4],
    "conj of slice": lambda x, r: x[2:].conj(),
    "strided view of neg": lambda x, r: x.conj().imag[::2],
    "2-D transposed conj": lambda x, r: x.view(2, 3).conj().t(),
    "view of neg view": lambda x, r: torch._neg_view(r).view(3, 2)[1],
}


def resolved(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().resolve_neg()


@pytest.mark.parametrize("order", ["base first", "view first"])
@pytest.mark.parametrize("name", list(VIEWS))
def test_conj_and_neg_views_load_as_their_values(name, order, save_dir, fast_config, bits):
    x = _complex()
    r = torch.randn(6)
    v = VIEWS[name](x, r)
    assert v.is_conj() or v.is_neg()
    entries = [("x", x), ("r", r), ("v", v)]
    state = dict(entries if order == "base first" else entries[::-1])
    state["tied"] = v  # the same view a second time
    state["optimizer"] = {"state": {0: {"exp_avg": v, "step": torch.tensor(3.0)}}, "param_groups": [{"params": [0]}]}
    out = roundtrip(state, save_dir, fast_config)
    for key in ("v", "tied"):
        assert not out[key].is_conj() and not out[key].is_neg()
        assert torch.equal(bits(out[key]), bits(resolved(v))), key
    assert torch.equal(bits(out["optimizer"]["state"][0]["exp_avg"]), bits(resolved(v)))
    assert torch.equal(bits(out["x"]), bits(x)) and torch.equal(bits(out["r"]), bits(r))
    out["x"].zero_()
    out["r"].zero_()
    assert torch.equal(bits(out["v"]), bits(resolved(v)))  # a storage of its own


def test_conj_view_beside_other_views_of_its_storage(save_dir, fast_config, bits):
    x = _complex(8)
    state = {"head": x[:4], "tail": x[4:], "conj": x[2:6].conj(), "imag": x.imag}
    out = roundtrip(state, save_dir, fast_config)
    for k, t in state.items():
        assert torch.equal(bits(out[k]), bits(resolved(t))), k
    assert out["head"].untyped_storage().data_ptr() == out["tail"].untyped_storage().data_ptr()


# ------------------------------------------------------------------------ 3. values that cannot be saved
def _sparse_csr():
    return torch.eye(3).to_sparse_csr()


UNSUPPORTED = {
    "meta tensor": (lambda: torch.empty(3, device="meta"), "meta"),
    "nested tensor": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    "sparse coo": (lambda: torch.eye(3).to_sparse(), "sparse"),
    "sparse csr": (_sparse_csr, "sparse"),
    "bits8 dtype": (lambda: torch.zeros(4, dtype=torch.uint8).view(torch.bits8), "bits8"),
    "longdouble scalar": (lambda: np.longdouble(1.5), "longdouble|float128|float96"),
    "clongdouble scalar": (lambda: np.clongdouble(1.5), "clongdouble|complex256|complex192"),
    "longdouble array": (lambda: np.ones(3, dtype=np.longdouble), "longdouble|float128|float96"),
    "clongdouble array": (lambda: np.ones(3, dtype=np.clongdouble), "clongdouble|complex256|complex192"),
    "int over the digit limit": (lambda: 10 ** st.MAX_INT_DIGITS, "digits"),
    "negative int over the digit limit": (lambda: -(10 ** st.MAX_INT_DIGITS), "digits"),
}


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_values_are_refused_at_once_naming_the_key_path(name, allow_pickle, save_dir, fast_config):
    make, what = UNSUPPORTED[name]
    state = {"client": {"run": [1, {"bad/x": make()}]}, "ok": torch.ones(2)}
    with pytest.raises(UnsupportedStateError, match=what) as ei:
        asyncckpt.save(state, save_dir, "t", config=fast_config(allow_pickle=allow_pickle))
    assert "'client/run/1/bad~1x'" in str(ei.value)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, asyncckpt.CheckpointError)
    assert not os.path.exists(save_dir) or os.listdir(save_dir) == []  # nothing was started


def test_huge_int_key_is_refused_naming_its_dict():
    with pytest.raises(UnsupportedStateError, match="'d'"):
        st.flatten({"d": {10 ** st.MAX_INT_DIGITS: torch.ones(1)}})


def test_ints_up_to_the_digit_limit_round_trip(save_dir, fast_config):
    big = 10 ** st.MAX_INT_DIGITS - 1
    state = {"big": big, "neg": -big, "keys": {big: torch.ones(1), -big: torch.zeros(1)}, "wide": 2 ** 200}
    out = roundtrip(state, save_dir, fast_config)
    assert out["big"] == big and out["neg"] == -big and out["wide"] == 2 ** 200
    assert list(out["keys"]) == [big, -big]


def test_a_lower_interpreter_int_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(sys, "get_int_max_str_digits", lambda: 640, raising=False)
    st.flatten({"n": 10 ** 639})
    with pytest.raises(UnsupportedStateError, match="640 decimal digits"):
        st.flatten({"n": 10 ** 640})


def test_unpicklable_object_with_allow_pickle_names_the_key_path():
    with pytest.raises(UnsupportedStateError, match="'cfg/fn'.*cannot be pickled"):
        st.flatten({"cfg": {"fn": lambda: 0}}, allow_pickle=True)


NONNUMERIC = {
    "object": lambda: np.array([1, "a", None], dtype=object),
    "str": lambda: np.array(["ab", "c"]),
    "bytes": lambda: np.array([b"ab", b"c"]),
    "void": lambda: np.zeros(2, dtype="V4"),
    "structured": lambda: np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    "datetime": lambda: np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "timedelta": lambda: np.array([1, 2], dtype="timedelta64[s]"),
    "big-endian": lambda: np.arange(3, dtype=">f4"),
    "masked (a subclass)": lambda: np.ma.masked_array([1.0, 2.0], mask=[False, True]),
}


@pytest.mark.parametrize("name", list(NONNUMERIC))
def test_nonnumeric_numpy_arrays_pickle_or_are_refused(name, save_dir, fast_config):
    arr = NONNUMERIC[name]()
    with pytest.raises(PickleNotAllowedError, match="'x/a'"):
        asyncckpt.save({"x": {"a": arr}}, save_dir, "t", config=fast_config())
    out = roundtrip({"x": {"a": arr}}, save_dir, fast_config, allow_pickle=True)["x"]["a"]
    assert type(out) is type(arr) and out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tolist() == arr.tolist() if arr.dtype.kind == "O" else out.tobytes() == arr.tobytes()
    if isinstance(arr, np.ma.MaskedArray):
        assert out.mask.tolist() == arr.mask.tolist()


NUMPY_SHARING = {
    "shorter first": lambda buf: {"a": buf[:3], "b": buf},
    "longer first": lambda buf: {"b": buf, "a": buf[:3]},
    "overlapping": lambda buf: {"a": buf[2:7], "b": buf[:5], "c": buf[5:]},
    "reshaped and strided": lambda buf: {"a": buf.reshape(2, 5), "b": buf[::3], "c": buf.reshape(5, 2).T},
    "reversed": lambda buf: {"a": buf[::-1], "b": buf[4:]},
    "same array twice": lambda buf: {"a": buf, "b": buf, "c": [buf[1:]]},
}


@pytest.mark.parametrize("name", list(NUMPY_SHARING))
def test_numpy_arrays_viewing_one_buffer_round_trip(name, save_dir, fast_config):
    buf = np.arange(10.0)
    state = NUMPY_SHARING[name](buf)
    out = roundtrip(state, save_dir, fast_config)
    for k, v in state.items():
        got = out[k]
        if isinstance(v, list):
            v, got = v[0], got[0]
        assert type(got) is np.ndarray and got.dtype == v.dtype and got.shape == v.shape, k
        assert np.array_equal(got, v), k


def test_numpy_scalars_keep_their_type(save_dir, fast_config):
    state = {"f64": np.float64(0.1), "f32": np.float32(0.5), "i": np.int64(-3), "b": np.bool_(True),
             "c": np.complex128(1 + 2j), "keys": {np.float64(1.5): torch.ones(1), np.int32(2): torch.zeros(1)}}
    out = roundtrip(state, save_dir, fast_config)
    for k in ("f64", "f32", "i", "b", "c"):
        assert type(out[k]) is type(state[k]) and out[k] == state[k], k
    assert [type(k) for k in out["keys"]] == [np.float64, np.int32]


# ------------------------------------------------------------------------------------------ 4. nesting
def _nest(kind: str, levels: int, leaf):
    node = leaf
    for i in range(levels):
        if kind == "list":
            node = [node]
        elif kind == "dict":
            node = {"k": node}
        elif kind == "int-key dict":
            node = {i: node}
        elif kind == "odict":
            node = collections.OrderedDict(k=node)
        elif kind == "tuple":
            node = (node,)
        elif kind == "tuple key":
            node = {(i,): node} if i % 2 else [node]
        else:
            raise AssertionError(kind)
    return node


KINDS = ["list", "dict", "int-key dict", "odict", "tuple", "tuple key"]


@pytest.mark.parametrize("kind", KINDS)
def test_state_nested_max_depth_round_trips(kind, save_dir, fast_config):
    state = _nest(kind, st.MAX_DEPTH, torch.arange(3.0))
    out = roundtrip(state, save_dir, fast_config)
    for _ in range(st.MAX_DEPTH):
        state, out = (state[0], out[0]) if isinstance(state, (list, tuple)) else (next(iter(state.values())),
                                                                                   next(iter(out.values())))
    assert torch.equal(out, torch.arange(3.0))


@pytest.mark.parametrize("kind", KINDS)
def test_state_nested_deeper_is_refused_naming_the_path(kind, save_dir, fast_config):
    with pytest.raises(UnsupportedStateError, match="MAX_DEPTH") as ei:
        asyncckpt.save(_nest(kind, st.MAX_DEPTH + 1, torch.ones(1)), save_dir, "t", config=fast_config())
    assert "key path '" in str(ei.value)


def test_self_referencing_state_is_refused():
    loop: list = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(UnsupportedStateError, match="MAX_DEPTH"):
        st.flatten({"loop": loop})


@pytest.fixture
def deep_stack_allowed():
    """A recursion limit far above MAX_DEPTH (as Python 3.12 effectively has for these walks): a depth check
    that leans on RecursionError would let everything through."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.parametrize("kind", ["list", "plain dict", "tagged dict", "odict", "tuple", "odict metadata"])
def test_forged_deep_skeleton_is_refused(kind, deep_stack_allowed):
    node: object = {"__t": "tensor", "key": "w"}
    for _ in range(st.MAX_DEPTH + 1):
        node = {"list": [node], "plain dict": {"k": node}, "tagged dict": {"__t": "dict", "items": [[1, node]]},
                "odict": {"__t": "odict", "items": [["k", node]]}, "tuple": {"__t": "tuple", "items": [node]},
                "odict metadata": {"__t": "odict", "items": [], "metadata": node}}[kind]
    with pytest.raises(UnsafeCheckpointError, match="nested deeper than MAX_DEPTH"):
        st.skeleton_tensor_refs(node)
    with pytest.raises(UnsafeCheckpointError, match="nested deeper than MAX_DEPTH"):
        st.unflatten(node, {"w": torch.ones(1)})


def test_skeleton_at_max_depth_loads():
    flat = st.flatten(_nest("odict", st.MAX_DEPTH, torch.ones(1)))
    refs = st.skeleton_tensor_refs(flat.skeleton)
    assert list(refs) == [flat.items[0].key]
    out = st.unflatten(flat.skeleton, {flat.items[0].key: torch.ones(1)})
    assert isinstance(out, collections.OrderedDict)
