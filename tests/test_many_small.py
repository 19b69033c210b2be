"""Many tiny tensors: small tensors are written in packs (one chunk, one checksum per pack), read back
bit-exact, each with its own storage; the number of chunks follows the bytes, not the tensor count; a
corrupt pack is named; a rank index that load would refuse is never published."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointReader, Config, CorruptCheckpointError
from asyncckpt.engine import SaveEngine
from asyncckpt.format import DTYPES, seal
from asyncckpt.owners import restamp
from asyncckpt.packing import PACK_PREFIX, Packer, pack_limit
from asyncckpt.staging import Slot
from asyncckpt.state import flatten

CHUNK = 16 << 10  # chunk_mib 1/64: small packs, so that several are made
CFG = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 2, "nice": 0, "fsync": False}}
LIMIT = pack_limit(CHUNK)
WAIT_S = 60


def save(state, save_dir, tag, **over) -> None:
    cfg = Config.from_dict({**CFG, **over})
    asyncckpt.save(state, save_dir, tag, config=cfg).result(WAIT_S)


def random_tensor(dtype: torch.dtype, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaN payloads, subnormals, every float8 code) of any dtype."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), key
    assert raw_bytes(a) == raw_bytes(b), key


def packed_keys(reader: CheckpointReader) -> set[str]:
    return {k for k, recs in reader.records.items() for _, r in recs if r.packed}


def packs(reader: CheckpointReader) -> list[str]:
    return [k for k in reader.records if k.startswith(PACK_PREFIX)]


# ------------------------------------------------------------------------------------------- round trip
def every_dtype_state(gen: torch.Generator) -> dict:
    state = {}
    for name, dtype in DTYPES.items():
        state[name] = {
            "scalar": random_tensor(dtype, (), gen),
            "vec": random_tensor(dtype, (7,), gen),
            "mat": random_tensor(dtype, (3, 5), gen),
            "empty": random_tensor(dtype, (0, 4), gen),
            "below": random_tensor(dtype, ((LIMIT - dtype.itemsize) // dtype.itemsize,), gen),  # last packed size
            "at": random_tensor(dtype, (LIMIT // dtype.itemsize,), gen),  # first size written on its own
            "big": random_tensor(dtype, (3 * LIMIT // dtype.itemsize + 1,), gen),
        }
    state["noncontiguous"] = torch.randn(6, 4, generator=gen).t()  # staged contiguous: a packed tensor
    return state


def test_every_dtype_round_trips_bit_exact_packed_or_not(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = every_dtype_state(gen)
    save(state, tmp_path, "t")
    reader = CheckpointReader(tmp_path, "t")
    packed = packed_keys(reader)
    for name in DTYPES:
        for kind in ("scalar", "vec", "mat", "below"):
            assert f"{name}/{kind}" in packed, f"{name}/{kind} should be packed"
        for kind in ("empty", "at", "big"):  # empty tensors have no chunks and stay alone
            assert f"{name}/{kind}" not in packed and not reader.record_for(f"{name}/{kind}").is_view
    assert "noncontiguous" in packed
    loaded = asyncckpt.load(tmp_path, "t")
    for name in DTYPES:
        for kind, t in state[name].items():
            assert_bit_exact(loaded[name][kind], t, f"{name}/{kind}")
    assert torch.equal(loaded["noncontiguous"], state["noncontiguous"])
    assert reader.verify()["chunks"] < len(packed)


def test_packs_group_element_sizes_so_they_still_shuffle(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {f"{name}{i}": random_tensor(dtype, (8,), gen) for i in range(20)
             for name, dtype in (("f", torch.float32), ("h", torch.bfloat16), ("d", torch.float64))}
    save(state, tmp_path, "t")
    reader = CheckpointReader(tmp_path, "t")
    by_pack: dict[str, set[int]] = {}
    for key in state:
        rec = reader.record_for(key)
        by_pack.setdefault(rec.base, set()).add(rec.dtype.itemsize)
    assert len(by_pack) == 3 and all(len(sizes) == 1 for sizes in by_pack.values())


def test_loaded_small_tensors_do_not_share_storage(tmp_path):
    state = {"m": [torch.full((4,), float(i)) for i in range(50)], "step": torch.tensor(3)}
    save(state, tmp_path, "t")
    loaded = asyncckpt.load(tmp_path, "t")
    tensors = loaded["m"] + [loaded["step"]]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == len(tensors)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    loaded["m"][0].add_(100)  # an optimizer updating one moment in place leaves the others alone
    assert all(torch.equal(t, torch.full((4,), float(i))) for i, t in enumerate(loaded["m"][1:], 1))


def test_tied_tensors_and_views_mixed_with_small_tensors(tmp_path):
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(40, generator=gen)
    tied = torch.randn(3, generator=gen)
    state = {"a": [torch.randn(2, generator=gen) for _ in range(10)], "tied1": tied, "tied2": tied,
             "va": shared[:10], "vb": shared[5:30].view(5, 5), "small": torch.randn(5, generator=gen),
             "b": [torch.randn(3, generator=gen) for _ in range(10)]}
    save(state, tmp_path, "t")
    loaded = asyncckpt.load(tmp_path, "t")
    for i in range(10):
        assert torch.equal(loaded["a"][i], state["a"][i]) and torch.equal(loaded["b"][i], state["b"][i])
    assert torch.equal(loaded["tied1"], tied) and loaded["tied1"] is loaded["tied2"]  # still one tensor
    assert torch.equal(loaded["va"], state["va"]) and torch.equal(loaded["vb"], state["vb"])
    assert loaded["va"].untyped_storage().data_ptr() == loaded["vb"].untyped_storage().data_ptr()  # still shared
    loaded["va"][7] = 1234.0
    assert loaded["vb"][0, 2] == 1234.0
    assert loaded["small"].untyped_storage().data_ptr() != loaded["va"].untyped_storage().data_ptr()


def test_read_region_of_a_packed_tensor(tmp_path):
    """The path replicated DTensors load through reads packed tensors too."""
    state = {"r": torch.arange(12.0).reshape(3, 4), "other": torch.ones(2)}
    save(state, tmp_path, "t")
    reader = CheckpointReader(tmp_path, "t")
    assert reader.record_for("r").packed
    assert torch.equal(reader.read_region("r", (2, 2), (1, 1)), state["r"][1:3, 1:3])


# --------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("chunk_mib", [1 / 64, 4])
def test_chunks_follow_bytes_not_tensor_count(tmp_path, chunk_mib):
    n, numel = 10_000, 16
    state = {"t": [torch.full((numel,), float(i)) for i in range(n)]}
    save(state, tmp_path, "t", codec={"chunk_mib": chunk_mib})
    reader = CheckpointReader(tmp_path, "t")
    chunk = Config.from_dict({"codec": {"chunk_mib": chunk_mib}}).codec.chunk_bytes
    expected = math.ceil(n * numel * 4 / chunk)
    assert len(packs(reader)) == expected and reader.verify()["chunks"] == expected
    loaded = asyncckpt.load(tmp_path, "t")
    assert all(torch.equal(t, torch.full((numel,), float(i))) for i, t in enumerate(loaded["t"]))


def test_pack_plan_is_reused_while_the_layout_repeats():
    state = {"t": [torch.randn(4) for _ in range(100)], "big": torch.randn(1 << 15)}
    items = flatten(state).items
    slot = Slot(0, pin=False)
    slot.stage(items)
    packer = Packer(CHUNK)
    first = packer.plan(items, slot.layout, frozenset())
    slot.stage(items)  # same sizes: the slot keeps its layout...
    assert packer.plan(items, slot.layout, frozenset()) is first  # ...and the writer its plan
    assert packer.plan(items, slot.layout, frozenset({0})) is not first
    other = flatten({"t": [torch.randn(5) for _ in range(100)]}).items
    slot.stage(other)
    assert packer.plan(other, slot.layout, frozenset()) is not first


def test_steady_state_saves_allocate_no_host_memory(tmp_path):
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(16)) for _ in range(500)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = Config.from_dict(CFG)
    with asyncckpt.AsyncCheckpointer(model, opt, config=cfg) as saver:
        for i in range(4):
            sum(p.square().sum() for p in model).backward()
            opt.step()
            saver.save_checkpoint(tmp_path, tag=f"s{i}").result(WAIT_S)
        assert saver.engine.pool.allocations == 1
        reader = CheckpointReader(tmp_path, "s3")
        # 1000 tensors of 64 bytes in packs of one chunk each (the RNG states add a pack of their own)
        assert len(packed_keys(reader)) >= 1000 and len(packs(reader)) <= math.ceil(1000 * 64 / CHUNK) + 2
        saver.load_checkpoint(tmp_path, tag="s3")


# ------------------------------------------------------------------------------------------ corruption
def test_corrupt_pack_is_detected_and_named(tmp_path):
    state = {"t": [torch.full((16,), float(i)) for i in range(300)]}
    save(state, tmp_path, "t", codec={"chunk_mib": 1 / 64, "compression": False})
    reader = CheckpointReader(tmp_path, "t")
    pack = packs(reader)[1]
    (_, rec), = reader.records[pack]
    path = os.path.join(reader.path, rec.file)
    with open(path, "r+b") as f:  # flip one byte in the middle of the second pack's chunk
        at = rec.chunks[0].offset + rec.chunks[0].length // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointReader(tmp_path, "t").verify()
    assert rec.file in str(err.value) and "chunk 0" in str(err.value) and repr(pack) in str(err.value)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        asyncckpt.load(tmp_path, "t")


def _rewrite_index(save_dir, tag: str, mutate) -> None:
    """Change rank 0's index and re-seal it and the manifest (a consistent checkpoint, as a writer would make)."""
    d = os.path.join(save_dir, tag)
    path = os.path.join(d, "rank00000.json")
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    mutate(doc)
    data = seal(doc)
    with open(path, "wb") as f:
        f.write(data)
    restamp(d)


def test_a_reader_that_ignores_the_flag_reads_the_same_values(tmp_path):
    """Readers that predate the ``packed`` flag see plain views of the pack: the same values."""
    state = {"t": [torch.randn(3) for _ in range(20)]}
    save(state, tmp_path, "t")

    def strip(doc):
        for t in doc["tensors"].values():
            assert t.pop("packed", True) is True

    _rewrite_index(tmp_path, "t", strip)
    loaded = asyncckpt.load(tmp_path, "t")
    assert all(torch.equal(a, b) for a, b in zip(loaded["t"], state["t"]))
    assert len({t.untyped_storage().data_ptr() for t in loaded["t"]}) == 1  # views of one pack, as documented


@pytest.mark.parametrize("forge,match", [
    (lambda t: t.update(packed=1), "packed must be true or false"),
    (lambda t: t.update(stride=[2]), "contiguous"),
    (lambda t: t.update(byte_offset=1 << 40), "outside its storage"),
])
def test_forged_packed_records_are_refused(tmp_path, forge, match):
    save({"t": [torch.randn(3) for _ in range(5)]}, tmp_path, "t")

    def mutate(doc):
        forge(next(t for t in doc["tensors"].values() if t.get("packed")))

    _rewrite_index(tmp_path, "t", mutate)
    with pytest.raises(CorruptCheckpointError, match=match):
        asyncckpt.load(tmp_path, "t")


# --------------------------------------------------------------------------------- refused before publish
def _drop_item(flat, key: str):
    flat.items = [i for i in flat.items if i.key != key]
    return flat


@pytest.mark.parametrize("case", ["tensor", "storage of views"])
def test_inconsistent_state_is_refused_before_publish(tmp_path, case):
    engine = SaveEngine(Config.from_dict(CFG))
    try:
        shared = torch.randn(8)
        state = {"a": torch.randn(4), "b": [torch.randn(2) for _ in range(5)], "v1": shared[:4], "v2": shared[2:]}
        engine.save(flatten(state), str(tmp_path), "good").result(WAIT_S)
        flat = flatten(state)
        key = "a" if case == "tensor" else next(i.key for i in flat.items if i.key.startswith("~s/"))
        fut = engine.save(_drop_item(flat, key), str(tmp_path), "bad")
        err = fut.exception(WAIT_S)
        assert isinstance(err, asyncckpt.CheckpointError) and repr(key) in str(err), repr(err)
        assert asyncckpt.list_tags(str(tmp_path)) == ["good"]
        with open(os.path.join(tmp_path, "latest")) as f:
            assert f.read() == "good\n"
        assert not os.path.exists(os.path.join(tmp_path, "bad"))
        assert torch.equal(asyncckpt.load(tmp_path)["a"], state["a"])
    finally:
        engine.close()


def test_only_empty_small_tensors_publish_and_load(tmp_path):
    """Tensors of 0 bytes are never packed (a pack of them would be an empty chunk, which readers refuse)."""
    state = {"a": torch.zeros(0), "b": torch.zeros(0, 3, dtype=torch.int64), "c": [torch.empty(0, dtype=torch.bool)]}
    asyncckpt.save(state, str(tmp_path), "e").result(60)
    out = asyncckpt.load(str(tmp_path), "e")
    assert out["a"].shape == (0,) and out["b"].shape == (0, 3) and out["c"][0].dtype == torch.bool
    asyncckpt.CheckpointReader(str(tmp_path), "e").verify()
