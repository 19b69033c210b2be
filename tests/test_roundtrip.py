"""Bit-exact round trips through ``asyncckpt.save``/``asyncckpt.load``: every CPU dtype torch has, every shape
class (0-d, empty, non-contiguous, expanded), NaN/inf payloads, shared storage, every codec setting, and the
non-tensor leaves the JSON skeleton carries without pickle."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.format import DTYPES

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")]

# dtypes torch exposes that carry no storable data of their own: quantized tensors (need scale/zero point),
# the "bits" and sub-byte int/uint placeholder dtypes (no CPU kernels; a byte holds several values).
_NOT_DATA = {"qint8", "qint32", "quint8", "quint4x2", "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4",
             "bits4x2", *(f"int{i}" for i in range(1, 8)), *(f"uint{i}" for i in range(1, 8))}


def all_cpu_dtypes() -> list[torch.dtype]:
    found = {getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    return sorted((d for d in found if str(d).removeprefix("torch.") not in _NOT_DATA), key=str)


DATA_DTYPES = all_cpu_dtypes()


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern: NaNs, infs, denormals, non-canonical bools)."""
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2  # bool must hold 0/1: other bytes are undefined behaviour in torch itself
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def roundtrip(state, save_dir, tag="t", config=None, **load_kw):
    fut = asyncckpt.save(state, save_dir, tag, config=config)
    res = fut.result(timeout=30)
    assert res.tag == tag and not res.skipped
    return asyncckpt.load(save_dir, tag, **load_kw)


CODECS = {
    "default": {},
    "no-shuffle": {"codec": {"shuffle": False}},
    "no-compression": {"codec": {"compression": False}},
    "level3-slow-planes": {"codec": {"level": 3, "fast_planes": False, "min_saving": 0.0}},
    "big-chunks": {"codec": {"chunk_mib": 8}},
}


def test_dtype_list_covers_the_issue():
    names = {str(d).removeprefix("torch.") for d in DATA_DTYPES}
    required = {"float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
                "complex64", "complex128"}
    required |= {n for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
                             "uint16", "uint32", "uint64", "complex32") if hasattr(torch, n)}
    assert required <= names
    assert set(DATA_DTYPES) <= set(DTYPES.values()), "format v1 misses a dtype torch has"


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_dtype_and_shape_class_bit_exact(codec, save_dir, fast_config, same):
    gen = torch.Generator().manual_seed(1)
    state = {}
    for dt in DATA_DTYPES:
        name = str(dt).removeprefix("torch.")
        big = random_tensor(dt, (48, 40), gen)  # >= 1.9 KiB per byte of itemsize: several 16 KiB chunks for wide types
        state[name] = {
            "plain": big,
            "scalar": random_tensor(dt, (), gen),
            "empty": torch.empty((0, 5), dtype=dt),
            "empty3d": torch.empty((2, 0, 3), dtype=dt),
            "transposed": random_tensor(dt, (7, 9), gen).t(),
            "strided": random_tensor(dt, (10, 12), gen)[::3, 1::2],
            "expanded": random_tensor(dt, (5, 1), gen).expand(5, 6),
            "zeros": torch.zeros(3000, dtype=dt),  # compressible
        }
    assert not state["float32"]["transposed"].is_contiguous()
    out = roundtrip(state, save_dir, config=fast_config(**CODECS[codec]))
    same(state, out)
    for name in state:  # non-contiguous inputs come back as ordinary (dense) tensors of the same values
        assert out[name]["transposed"].is_contiguous() and out[name]["expanded"].stride() == (6, 1)


def test_codec_settings_reach_the_file(save_dir, fast_config):
    """The chunk size and codec choice really apply: several chunks per tensor, noise stored raw,
    compressible data compressed, and nothing but raw chunks with compression off."""
    gen = torch.Generator().manual_seed(0)
    state = {"noise": random_tensor(torch.uint8, (100_000,), gen), "smooth": torch.linspace(0, 1, 50_000),
             "zeros": torch.zeros(40_000, dtype=torch.int64)}
    for tag, over in (("on", {}), ("noshuffle", {"codec": {"shuffle": False}}),
                      ("off", {"codec": {"compression": False}})):
        asyncckpt.save(state, save_dir, tag, config=fast_config(**over)).result(timeout=30)
        reader = asyncckpt.CheckpointReader(save_dir, tag)
        recs = {k: r[0][1] for k, r in reader.records.items()}
        assert len(recs["noise"].chunks) == math.ceil(100_000 / (16 << 10))
        assert all(c.raw <= 16 << 10 for r in recs.values() for c in r.chunks)
        codecs = {k: {c.codec for c in r.chunks} for k, r in recs.items()}
        if tag == "off":
            assert all(c == {"raw"} for c in codecs.values())
        else:
            assert codecs["noise"] == {"raw"}  # compression does not pay
            assert codecs["zeros"] == ({"shuffle"} if tag == "on" else {"zstd"})
            assert reader.stored_bytes < reader.raw_bytes
        assert asyncckpt.load(save_dir, tag)["smooth"].equal(state["smooth"])


def test_nan_inf_and_signed_zero_payloads_bit_exact(save_dir, fast_config, bits):
    f32 = torch.tensor([0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
                        0x80000000, 0x00000001, 0x807FFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    f64 = torch.tensor([0x7FF8000000000001, 0x7FF0000000000001, -0x0008000000000000, 0x7FF0000000000000,
                        -(1 << 63), 1], dtype=torch.int64).view(torch.float64)
    f16 = torch.tensor([0x7E01, 0x7C01, 0xFE00, 0x7C00, 0xFC00, 0x8000, 0x0001], dtype=torch.int32).to(torch.int16).view(torch.float16)
    bf16 = torch.tensor([0x7FC1, 0x7F81, 0xFFC0, 0x7F80, 0xFF80, 0x8000], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    c64 = torch.complex(f32[:4], f32[4:8])
    state = {"f32": f32, "f64": f64, "f16": f16, "bf16": bf16, "c64": c64,
             "f32_big": f32.repeat(5000),  # large enough to be shuffled and compressed
             "py": [float("nan"), float("inf"), float("-inf"), -0.0, 5e-324]}
    assert torch.isnan(f32[:5]).all() and torch.isinf(f32[5:7]).all()
    for tag, over in (("zstd", {}), ("raw", {"codec": {"compression": False}})):
        out = roundtrip(state, save_dir, tag, config=fast_config(**over))
        for k in ("f32", "f64", "f16", "bf16", "c64", "f32_big"):
            assert torch.equal(bits(out[k]), bits(state[k])), k
        assert torch.equal(out["f32"].view(torch.int32), f32.view(torch.int32))
        assert torch.equal(out["f64"].view(torch.int64), f64.view(torch.int64))
        assert math.isnan(out["py"][0]) and out["py"][1:3] == [math.inf, -math.inf]
        assert math.copysign(1.0, out["py"][3]) == -1.0 and out["py"][4] == 5e-324


def test_tied_tensors_come_back_as_one_object(save_dir, fast_config):
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied weights
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    out = roundtrip({"model": sd, "again": [sd["emb.weight"]]}, save_dir, config=fast_config())
    m = out["model"]
    assert m["emb.weight"] is m["head.weight"] is out["again"][0]
    assert torch.equal(m["emb.weight"], emb.weight.detach())
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    assert reader.raw_bytes == emb.weight.numel() * 4  # stored once


def test_overlapping_views_share_storage_again(save_dir, fast_config, same):
    base = torch.arange(64, dtype=torch.float32)
    state = {
        "a": base[2:40],
        "b": base[30:60].view(5, 6),
        "c": base.view(8, 8).t()[1:4],  # strided view of the same storage
        "bytes": base[4:8].view(torch.uint8),  # another dtype over the same bytes
        "whole": base,
    }
    out = roundtrip(state, save_dir, config=fast_config())
    same(state, out)
    ptr = out["whole"].untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == ptr for v in out.values())
    assert out["c"].stride() == state["c"].stride()
    out["whole"][35] = -1.0  # writes through every view that covers element 35, as before saving
    assert out["a"][33] == -1.0 and out["b"][0, 5] == -1.0 and base[35] == 35.0
    reader = asyncckpt.CheckpointReader(save_dir, "t")
    assert reader.raw_bytes == 64 * 4  # the storage span is stored once


def test_views_without_the_base_share_only_what_they_cover(save_dir, fast_config, same):
    base = torch.randn(1000)
    state = {"x": base[100:300], "y": base[250:400]}  # overlap 250..300; the rest of base is not saved
    out = roundtrip(state, save_dir, config=fast_config())
    same(state, out)
    out["x"][160] = 42.0  # element 260
    assert out["y"][10] == 42.0
    assert asyncckpt.CheckpointReader(save_dir, "t").raw_bytes == 300 * 4


def test_non_tensor_leaves_round_trip_without_pickle(save_dir, fast_config, same):
    od = collections.OrderedDict([("w", torch.ones(2)), ("b", torch.zeros(1))])
    od._metadata = collections.OrderedDict([("", {"version": 1})])
    state = {
        "ints": [0, -1, 2**62, -(2**63), 2**80], "floats": [1.5, -0.0, 1e308],
        "none": None, "bools": [True, False], "str": "ünï/cödé ~0", "nested": {"a": {"b": [[], {}, ()]}},
        "tuple": (1, "two", (3.0, None)), "int_keys": {1: "one", 2: "two"}, "mixed_keys": {"x": 1, 2: "y", None: 0},
        "slashy/key": {"~tilde~/": 1}, "__t": "looks like a tag", "bytes": b"\x00\xffabc",
        "dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
        "ndarray": np.arange(12, dtype=np.float64).reshape(3, 4), "npscalar": np.float32(1.25), "npint": np.int64(-7),
        "odict": od,
    }
    out = roundtrip(state, save_dir, config=fast_config())
    same(state, out)
    assert out["odict"]._metadata == {"": {"version": 1}}


def test_load_map_location_and_default_tag(save_dir, fast_config, same):
    state = {"w": torch.randn(10, 10)}
    asyncckpt.save(state, save_dir, "first", config=fast_config()).result(timeout=30)
    asyncckpt.save({"w": torch.ones(3)}, save_dir, "second", config=fast_config()).result(timeout=30)
    asyncckpt.save({"w": torch.zeros(3)}, save_dir, "third", save_latest=False, config=fast_config()).result(timeout=30)
    assert torch.equal(asyncckpt.load(save_dir)["w"], torch.ones(3))  # latest names "second", not "third"
    same(asyncckpt.load(save_dir, "first", map_location="cpu"), state)
    same(asyncckpt.load(save_dir, "first", map_location={"cpu": "cpu"}), state)
    same(asyncckpt.load(save_dir, "first", map_location=lambda dev: "cpu"), state)
    same(asyncckpt.load(save_dir, "first", verify=False), state)


def test_unsupported_dtype_is_refused_at_save(save_dir, fast_config):
    with pytest.raises(TypeError, match="bits8"):
        asyncckpt.save({"x": torch.zeros(4, dtype=torch.uint8).view(torch.bits8)}, save_dir, "t", config=fast_config())
    with pytest.raises(TypeError, match="sparse"):
        asyncckpt.save({"x": torch.eye(3).to_sparse()}, save_dir, "t", config=fast_config())
    assert not asyncckpt.list_tags(save_dir)


_dtypes = st.sampled_from(DATA_DTYPES)
_shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=_dtypes, shape=_shapes, seed=st.integers(0, 2**31 - 1), permute=st.booleans(),
       step=st.integers(1, 3), shared=st.booleans(), compression=st.booleans())
def test_random_tensors_round_trip(tmp_path_factory, same, dtype, shape, seed, permute, step, shared, compression):
    """Random dtype, shape, layout (permuted, sliced with a step) and sharing, with and without compression."""
    save_dir = str(tmp_path_factory.mktemp("hyp"))
    gen = torch.Generator().manual_seed(seed)
    t = random_tensor(dtype, shape, gen)
    if permute and t.dim() > 1:
        t = t.permute(*reversed(range(t.dim())))
    if t.dim() and t.shape[0]:
        t = t[::step]
    state = {"t": t}
    if shared and t.numel():
        state["alias"] = t
        state["part"] = t.reshape(-1)[:1] if t.is_contiguous() else t[:1]
    cfg = asyncckpt.Config.from_dict({"codec": {"chunk_mib": 1 / 64, "compression": compression},
                                      "writer": {"threads_per_node": 2, "nice": 0, "fsync": False}})
    out = roundtrip(state, save_dir, config=cfg)
    same(state, out)
    if "alias" in state:
        assert out["alias"] is out["t"]
        assert out["part"].untyped_storage().data_ptr() == out["t"].untyped_storage().data_ptr()
