"""Export to torch.save / safetensors files and import from them (issue 12, parts 4 and 5): bit-exact round
trips for every dtype, casting, tied weights and views, FSDP2 and DDP checkpoints of 2 ranks, sharded
safetensors with a Hugging Face index, import of every source kind, CLI exit statuses and progress bars,
bounded memory, and the pinned ``inspect --json`` schema."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import asyncckpt
import multirank_workers as w
from asyncckpt.cli import main
from asyncckpt.export import SAFETENSORS_DTYPES
from asyncckpt.format import DTYPES
from dist_helpers import assert_all_ok, forkserver_context, run_ranks

safetensors_torch = pytest.importorskip("safetensors.torch")
load_file = safetensors_torch.load_file

FAST = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 2, "nice": 0, "fsync": False}}
NO_SAFETENSORS = [d for d in DTYPES.values() if d not in SAFETENSORS_DTYPES]  # complex32/128, float8_e8m0, float4


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def publish(state, save_dir, tag: str = "t") -> str:
    asyncckpt.save(state, save_dir, tag, config=FAST).result(60)
    return os.path.join(save_dir, tag)


def random_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes seen as ``dtype`` (NaN payloads, subnormals, every bit pattern)."""
    n = max(1, int(np.prod(shape)))
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype)[: int(np.prod(shape))].reshape(shape).clone()


def every_dtype_state(dtypes) -> dict:
    """Per dtype: a 2-d tensor, a 0-d tensor and an empty tensor."""
    state = {}
    for i, dtype in enumerate(dtypes):
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.full"] = random_of(dtype, (3, 5), i)
        state[f"{name}.scalar"] = random_of(dtype, (), 100 + i)
        state[f"{name}.empty"] = torch.empty((0, 4), dtype=dtype)
    return state


# ---------------------------------------------------------------------------------------- round trips
def test_safetensors_round_trip_is_bit_exact_for_every_dtype(tmp_path, same):
    state = every_dtype_state(SAFETENSORS_DTYPES)
    src = publish(state, str(tmp_path / "ck"))
    result = asyncckpt.export(src, tmp_path / "st")
    assert result.files == [str(tmp_path / "st" / "model.safetensors")] and result.non_tensors == 0
    same(load_file(result.files[0]), asyncckpt.load(str(tmp_path / "ck"), "t"))


def test_export_and_import_close_every_file_they_open(tmp_path):
    """Readers are closed when the call returns, not when the garbage collector gets to them."""
    import gc

    src = publish({"w": torch.randn(64), "b": torch.ones(3)}, str(tmp_path / "ck"))
    asyncckpt.export(src, tmp_path / "all.pt", to="torch")
    asyncckpt.import_checkpoint(tmp_path / "all.pt", tmp_path / "back", "i0")  # starts the saver's threads
    gc.collect()
    gc.disable()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        asyncckpt.export(src, tmp_path / "st")
        asyncckpt.export(src, tmp_path / "all.pt", to="torch", overwrite=True)
        asyncckpt.import_checkpoint(tmp_path / "all.pt", tmp_path / "back", "i1")
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", NO_SAFETENSORS, ids=str)
def test_safetensors_refuses_dtypes_it_cannot_hold_naming_the_key(tmp_path, dtype):
    src = publish({"ok": torch.ones(2), "odd": {"x": torch.zeros(4, dtype=dtype)}}, str(tmp_path / "ck"))
    with pytest.raises(asyncckpt.UnsupportedStateError, match=rf"'odd/x'.*{dtype}"):
        asyncckpt.export(src, tmp_path / "st")
    assert not os.path.exists(tmp_path / "st" / "model.safetensors")


def test_torch_round_trip_is_bit_exact_for_every_dtype_and_the_whole_tree(tmp_path, same):
    od = collections.OrderedDict(w=torch.randn(2, 3))
    od._metadata = {"": {"version": 1}}
    state = {**every_dtype_state(DTYPES.values()), "tree": {
        "od": od, "tuple": (1, 2.5, "s", None, True), "list": [float("nan"), float("-inf"), -0.0],
        "ints": {3: torch.arange(3), (1, "k"): "tuple key", 2 ** 80: "big"}, "dtype": torch.bfloat16,
        "device": torch.device("cpu"), "size": torch.Size([2, 3]), "bytes": b"\x00\xff"}}
    src = publish(state, str(tmp_path / "ck"))
    result = asyncckpt.export(src, tmp_path / "all.pt", to="torch")
    assert result.dropped == [] and result.files == [str(tmp_path / "all.pt")]
    same(torch.load(tmp_path / "all.pt", weights_only=True), asyncckpt.load(str(tmp_path / "ck"), "t"))


def test_dtype_casts_floating_tensors_only(tmp_path):
    state = {"f32": torch.randn(4, 4), "f64": torch.randn(3, dtype=torch.float64), "f16": torch.randn(2).half(),
             "fp8": torch.randn(5).to(torch.float8_e4m3fn), "i64": torch.arange(5), "u8": torch.arange(4).byte(),
             "bool": torch.tensor([True, False]), "c64": torch.randn(2, dtype=torch.complex64), "s": torch.tensor(2.5)}
    src = publish(state, str(tmp_path / "ck"))
    loaded = asyncckpt.load(str(tmp_path / "ck"), "t")
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in loaded.items()}
    asyncckpt.export(src, tmp_path / "st", dtype="bf16")
    asyncckpt.export(src, tmp_path / "x.pt", to="torch", dtype=torch.bfloat16)
    for got in (load_file(tmp_path / "st" / "model.safetensors"), torch.load(tmp_path / "x.pt", weights_only=True)):
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k].view(-1).view(torch.uint8),
                                                           v.view(-1).view(torch.uint8)), k
    with pytest.raises(asyncckpt.ConfigError, match="int8"):
        asyncckpt.export(src, tmp_path / "y.pt", to="torch", dtype="int8")


def test_tied_weights_and_views(tmp_path, same):
    """Tied tensors: written once, the other name recorded (safetensors) or kept tied (torch); views of one
    storage (transposed, sliced, of another dtype) become contiguous tensors with the same values."""
    big = torch.arange(24, dtype=torch.float32)
    w_ = torch.randn(3, 4)
    state = {"embed": w_, "sub": {"lm_head": w_}, "t": w_.t(), "big": big, "slice": big[2:20:3],
             "as_int": big[4:8].view(torch.int32), "grid": big.view(4, 6)[:, 1:3]}
    src = publish(state, str(tmp_path / "ck"))
    loaded = asyncckpt.load(str(tmp_path / "ck"), "t")
    result = asyncckpt.export(src, tmp_path / "st")
    assert result.aliases == {"sub/lm_head": "embed"}
    from safetensors import safe_open

    with safe_open(result.files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt", "sub/lm_head": "embed"}
    got = load_file(result.files[0])
    assert set(got) == set(loaded) - {"sub"}
    for k, v in got.items():
        assert v.is_contiguous()
        same(v, loaded[k], k)
    # torch: the tie survives (one storage), views are values
    asyncckpt.export(src, tmp_path / "x.pt", to="torch")
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert back["embed"].untyped_storage().data_ptr() == back["sub"]["lm_head"].untyped_storage().data_ptr()
    same(back, loaded)
    # import ties the recorded alias back
    asyncckpt.import_checkpoint(tmp_path / "st", str(tmp_path / "imp"), "i", config=FAST)
    imp = asyncckpt.load(str(tmp_path / "imp"), "i")
    assert imp["sub/lm_head"].data_ptr() == imp["embed"].data_ptr()
    same(imp["sub/lm_head"], w_)


def test_numpy_values_become_tensors_and_pickled_objects_are_dropped(tmp_path):
    state = {"arr": np.arange(6, dtype=np.uint16).reshape(2, 3), "np64": np.float64(1.5), "npi": np.int32(-7),
             "obj": collections.Counter("ab"), "keep": [1, collections.Counter("c")]}
    asyncckpt.save(state, str(tmp_path / "ck"), "t", config={**FAST, "allow_pickle": True}).result(60)
    src = str(tmp_path / "ck" / "t")
    result = asyncckpt.export(src, tmp_path / "x.pt", to="torch")
    assert result.dropped == ["obj", "keep/1"]
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(back["arr"], torch.from_numpy(state["arr"])) and back["arr"].dtype == torch.uint16
    assert back["np64"].dtype == torch.float64 and back["np64"].item() == 1.5 and back["np64"].dim() == 0
    assert back["npi"].dtype == torch.int32 and back["npi"].item() == -7
    assert back["obj"] is None and back["keep"] == [1, None]
    st = asyncckpt.export(src, tmp_path / "st")
    assert list(load_file(st.files[0])) == ["arr"]
    assert st.non_tensors == 5 and st.dropped == []  # 2 numpy scalars, 2 pickled objects and the int 1


def test_model_only(tmp_path, same):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    with asyncckpt.AsyncCheckpointer(model, opt, config=FAST) as saver:
        saver.save_checkpoint(str(tmp_path / "ck")).result(60)
    st = asyncckpt.export(str(tmp_path / "ck"), tmp_path / "st", model_only=True)
    assert st.non_tensors == 0
    same(load_file(st.files[0]), dict(model.state_dict()))
    asyncckpt.export(str(tmp_path / "ck"), tmp_path / "m.pt", to="torch", model_only=True)
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    same(sd, model.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(sd)
    src = publish({"w": torch.ones(2)}, str(tmp_path / "plain"))
    with pytest.raises(asyncckpt.StateMismatchError, match="'module'"):
        asyncckpt.export(src, tmp_path / "n.pt", to="torch", model_only=True)


# ---------------------------------------------------------------------------------------- sharding
def test_sharded_safetensors_with_an_index(tmp_path, same):
    g = torch.Generator().manual_seed(1)
    state = {f"layer{i}.weight": torch.randn(64, 16, generator=g) for i in range(6)}  # 4 KiB each
    state["huge"] = torch.randn(64, 64, generator=g)  # 16 KiB: more than a shard, alone in its file
    state["small"] = torch.arange(10)
    src = publish(state, str(tmp_path / "ck"))
    result = asyncckpt.export(src, tmp_path / "st", max_shard_size="9KiB")
    names = sorted(os.listdir(tmp_path / "st"))
    n = len(names) - 1
    assert n > 2 and names[-1] == "model.safetensors.index.json"
    assert names[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"]) == set(state)
    total = 0
    merged = {}
    for name in names[:-1]:  # what a Hugging Face loader does: every shard the index names, with load_file
        shard = load_file(tmp_path / "st" / name)
        assert all(index["weight_map"][k] == name for k in shard)
        assert "huge" not in shard or len(shard) == 1
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= 9 * 1024 or len(shard) == 1
        total += sum(t.numel() * t.element_size() for t in shard.values())
        merged.update(shard)
    assert index["metadata"]["total_size"] == total == result.nbytes
    same(dict(sorted(merged.items())), dict(sorted(state.items())))
    # a smaller export replaces all of it (with overwrite), leaving no stale shard behind
    with pytest.raises(asyncckpt.ConfigError, match="overwrite"):
        asyncckpt.export(src, tmp_path / "st")
    asyncckpt.export(src, tmp_path / "st", overwrite=True)
    assert sorted(os.listdir(tmp_path / "st")) == ["model.safetensors"]


# ---------------------------------------------------------------------------------------- many ranks
@pytest.mark.multirank
def test_fsdp2_checkpoint_of_two_ranks_exports_full_tensors(tmp_path):
    assert_all_ok(run_ranks(w.fsdp_save, 2, str(tmp_path), str(tmp_path), timeout=150, ctx=forkserver_context()))
    expected = torch.load(tmp_path / "expected_fsdp.pt")
    reader = asyncckpt.CheckpointReader(str(tmp_path), "fsdp")
    assert reader.world_size == 2 and any(rec.is_shard for recs in reader.records.values() for _, rec in recs)
    st = asyncckpt.export(str(tmp_path / "fsdp"), tmp_path / "st", model_only=True)
    got = load_file(st.files[0])
    assert set(got) == {k[2:] for k in expected if k.startswith("m/")}
    for k, v in got.items():
        assert torch.equal(v, expected[f"m/{k}"]), k
    asyncckpt.export(str(tmp_path / "fsdp"), tmp_path / "all.pt", to="torch")
    full = torch.load(tmp_path / "all.pt", weights_only=True)
    loaded = asyncckpt.load(str(tmp_path), "fsdp", rank=0)
    for k, v in full["module"].items():
        assert torch.equal(v, expected[f"m/{k}"]) and torch.equal(v, loaded["module"][k]), k
    for pid, st_ in full["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st_[name], expected[f"o/{pid}/{name}"]), (pid, name)


@pytest.mark.multirank
def test_ddp_checkpoint_of_two_ranks_exports_the_replicated_state(tmp_path):
    assert_all_ok(run_ranks(w.ddp_save_load, 2, str(tmp_path), str(tmp_path), ctx=forkserver_context()))
    expected = torch.load(tmp_path / "expected0.pt")
    reader = asyncckpt.CheckpointReader(str(tmp_path))
    owners = {rank for k, recs in reader.records.items() if k.startswith("module/") for rank, _ in recs}
    assert owners == {0, 1}  # the replicated model is split between the ranks
    for rank in (0, 1):
        result = asyncckpt.export(str(tmp_path), tmp_path / f"r{rank}.pt", to="torch", rank=rank)
        assert result.world_size == 2 and result.rank == rank
        full = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        assert len(full["module"]) == len([k for k in expected if k.startswith("m/")])
        for k, v in full["module"].items():  # DDP's state dict keys start with "module."
            assert torch.equal(v, expected[f"m/{k.removeprefix('module.')}"]), k
        assert full["client_state"] == {"rank": rank}  # rank-local state: the chosen rank's
    with pytest.raises(asyncckpt.ConfigError, match="rank"):
        asyncckpt.export(str(tmp_path), tmp_path / "r2.pt", to="torch", rank=2)


# ---------------------------------------------------------------------------------------- import
def test_import_torch_files_zip_and_legacy(tmp_path, same):
    od = collections.OrderedDict(a=torch.randn(3, dtype=torch.float64))
    od._metadata = {"": {"version": 2}}
    state = {"model": od, "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1}, "t": (1, "x"),
             "bf": torch.randn(4).bfloat16()}
    for legacy in (False, True):
        path = tmp_path / f"s{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        result = asyncckpt.import_checkpoint(path, str(tmp_path / "ck"), f"i{legacy}", config=FAST)
        assert result.kind == "torch" and result.tensors == 3
        same(asyncckpt.load(str(tmp_path / "ck"), f"i{legacy}"), torch.load(path, weights_only=True))
    assert asyncckpt.list_tags(str(tmp_path / "ck")) == ["iFalse", "iTrue"]


def test_import_safetensors_file_index_and_directory(tmp_path, same):
    g = torch.Generator().manual_seed(2)
    state = {f"w{i}": torch.randn(32, 8, generator=g) for i in range(5)}
    safetensors_torch.save_file(state, str(tmp_path / "one.safetensors"))
    src = publish(state, str(tmp_path / "orig"))
    asyncckpt.export(src, tmp_path / "sharded", max_shard_size=2048)
    assert len(os.listdir(tmp_path / "sharded")) > 2
    for i, source in enumerate((tmp_path / "one.safetensors", tmp_path / "sharded",
                                tmp_path / "sharded" / "model.safetensors.index.json")):
        result = asyncckpt.import_checkpoint(source, str(tmp_path / "ck"), f"s{i}", config=FAST)
        assert result.kind == "safetensors" and result.tensors == 5
        got = asyncckpt.load(str(tmp_path / "ck"), f"s{i}")
        same(dict(sorted(got.items())), state)


def test_import_as_module_starts_a_run(tmp_path, same):
    model = torch.nn.Linear(4, 3)
    safetensors_torch.save_file(dict(model.state_dict()), str(tmp_path / "m.safetensors"))
    asyncckpt.import_checkpoint(tmp_path / "m.safetensors", str(tmp_path / "ck"), "start", as_module=True, config=FAST)
    fresh = torch.nn.Linear(4, 3)
    with asyncckpt.AsyncCheckpointer(fresh, config=FAST) as saver:
        path, _ = saver.load_checkpoint(str(tmp_path / "ck"), load_module_only=True)
    assert path == str(tmp_path / "ck" / "start")
    same(dict(fresh.state_dict()), dict(model.state_dict()))
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(asyncckpt.StateMismatchError, match="list.pt"):
        asyncckpt.import_checkpoint(tmp_path / "list.pt", str(tmp_path / "ck"), "l", as_module=True)


class Custom:  # a class torch.load(weights_only=True) refuses
    def __init__(self):
        self.x = 1


def test_unreadable_sources_are_refused_naming_the_file(tmp_path):
    out = str(tmp_path / "ck")
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="missing.pt"):
        asyncckpt.import_checkpoint(tmp_path / "missing.pt", out, "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="empty"):
        asyncckpt.import_checkpoint(tmp_path / "empty", out, "a")
    torch.save({"c": Custom()}, tmp_path / "custom.pt")
    with pytest.raises(asyncckpt.UnsafeCheckpointError, match="custom.pt.*weights_only"):
        asyncckpt.import_checkpoint(tmp_path / "custom.pt", out, "a")
    (tmp_path / "junk.bin").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="junk.bin"):
        asyncckpt.import_checkpoint(tmp_path / "junk.bin", out, "a")
    torch.save({"w": torch.randn(100)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="cut.pt"):
        asyncckpt.import_checkpoint(tmp_path / "cut.pt", out, "a")
    safetensors_torch.save_file({"w": torch.randn(100)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-50])
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="cut.safetensors"):
        asyncckpt.import_checkpoint(tmp_path / "cut.safetensors", out, "a")
    index = {"metadata": {}, "weight_map": {"w": "gone.safetensors"}}
    (tmp_path / "gone.index.json").write_text(json.dumps(index))
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="gone.safetensors"):
        asyncckpt.import_checkpoint(tmp_path / "gone.index.json", out, "a")
    index["weight_map"]["w"] = "../cut.safetensors"
    (tmp_path / "escape.index.json").write_text(json.dumps(index))
    with pytest.raises(asyncckpt.UnsafeCheckpointError, match="escape.index.json.*'../cut.safetensors'"):
        asyncckpt.import_checkpoint(tmp_path / "escape.index.json", out, "a")
    safetensors_torch.save_file({"w": torch.randn(2)}, str(tmp_path / "one.safetensors"))
    index["weight_map"] = {"w": "one.safetensors", "v": "one.safetensors"}
    (tmp_path / "lying.index.json").write_text(json.dumps(index))
    with pytest.raises(asyncckpt.CorruptCheckpointError, match="'v'"):
        asyncckpt.import_checkpoint(tmp_path / "lying.index.json", out, "a")
    assert asyncckpt.list_tags(out) == []


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture
def ckpt(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with asyncckpt.AsyncCheckpointer(model, opt, config=FAST) as saver:
        saver.save_checkpoint(str(tmp_path / "ck"), tag="s1").result(60)
    return str(tmp_path / "ck"), model


def test_cli_export_and_import(tmp_path, ckpt, same):
    pytest.importorskip("tqdm")
    save_dir, model = ckpt
    r = run("export", save_dir, "--to", "safetensors", str(tmp_path / "st"), "--model-only")
    assert r.exit_code == 0, r.output
    assert "exported 4 tensors" in r.stdout and r.stderr == ""  # not a terminal: no progress bar
    same(load_file(tmp_path / "st" / "model.safetensors"), dict(model.state_dict()))
    r = run("export", f"{save_dir}/s1", "--to", "safetensors", str(tmp_path / "all"))
    assert r.exit_code == 0 and "non-tensor values were left out" in r.stdout
    r = run("export", save_dir, "--to", "torch", str(tmp_path / "m.pt"), "--model-only", "--dtype", "bf16", "--progress")
    assert r.exit_code == 0 and "export" in r.stderr  # the bar, forced on
    assert all(v.dtype == torch.bfloat16 for v in torch.load(tmp_path / "m.pt", weights_only=True).values())
    r = run("import", str(tmp_path / "st"), str(tmp_path / "imp"), "--tag", "x", "--as-module", "-q")
    assert r.exit_code == 0 and r.output == ""
    same(dict(asyncckpt.load(str(tmp_path / "imp"))["module"]), dict(model.state_dict()))
    r = run("verify", str(tmp_path / "imp"), "--progress")
    assert r.exit_code == 0 and "OK" in r.stdout and "verify x" in r.stderr


def test_cli_exit_statuses(tmp_path, ckpt):
    save_dir, _ = ckpt
    out = str(tmp_path / "o")
    assert run("export", str(tmp_path / "nowhere"), "--to", "torch", out).exit_code == 2
    assert run("export", f"{save_dir}/nope", "--to", "torch", out).exit_code == 2
    assert run("export", save_dir, "--to", "torch", out, "--dtype", "int8").exit_code == 2
    assert run("export", save_dir, "--to", "torch", out, "--rank", "3").exit_code == 2
    assert run("export", save_dir, "--to", "safetensors", out, "--max-shard-size", "lots").exit_code == 2
    assert run("export", save_dir, "--to", "torch", out).exit_code == 0
    r = run("export", save_dir, "--to", "torch", out)
    assert r.exit_code == 2 and "overwrite" in r.stderr
    assert run("export", save_dir, "--to", "torch", out, "--overwrite").exit_code == 0
    src = publish({"c": torch.zeros(2, dtype=torch.complex128)}, str(tmp_path / "cplx"))
    r = run("export", src, "--to", "safetensors", str(tmp_path / "c"))
    assert r.exit_code == 1 and "'c'" in r.stderr
    data = os.path.join(save_dir, "s1", "rank00000-0.bin")
    with open(data, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run("export", save_dir, "--to", "torch", str(tmp_path / "bad.pt"))
    assert r.exit_code == 1 and "CORRUPT" in r.stderr and "rank00000-0.bin" in r.stderr
    assert not os.path.exists(tmp_path / "bad.pt")
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    assert run("import", str(tmp_path / "nope.pt"), str(tmp_path / "i"), "--tag", "a").exit_code == 2
    (tmp_path / "junk").write_bytes(b"junk" * 10)
    r = run("import", str(tmp_path / "junk"), str(tmp_path / "i"), "--tag", "a")
    assert r.exit_code == 1 and "junk" in r.stderr
    assert run("import", out, str(tmp_path / "i"), "--tag", "bad/tag").exit_code == 2
    assert run("import", out, str(tmp_path / "i"), "--tag", "a").exit_code == 0
    assert run("import", out, str(tmp_path / "i"), "--tag", "a").exit_code == 2  # the tag exists


# ---------------------------------------------------------------------------------------- memory
MEMORY_CHILD = textwrap.dedent("""
    import gc, os, sys, threading
    import torch, asyncckpt

    root = sys.argv[1]
    state = {f"t{i}": torch.randn(1 << 20, generator=torch.Generator().manual_seed(i)) for i in range(32)}
    asyncckpt.save(state, root + "/ck", "a", config={"codec": {"compression": False}, "writer": {"fsync": False}}).result(120)
    asyncckpt.wait_all()
    del state

    def anon():  # resident private memory; pages of mapped files are cache the kernel may drop
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def peak_growth(fn):
        gc.collect()
        base = anon()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.001):
                peak[0] = max(peak[0], anon())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = fn()
        finally:
            stop.set()
            sampler.join()
        return peak[0] - base, result

    for to in ("safetensors", "torch"):
        growth, result = peak_growth(lambda: asyncckpt.export(root + "/ck", root + "/out-" + to, to=to))
        print(to, growth, result.nbytes)
    growth, _ = peak_growth(lambda: asyncckpt.load(root + "/ck"))  # the yardstick: everything at once
    print("load", growth, 128 << 20)
""")


def test_export_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """32 tensors of 4 MiB (128 MiB): the exporting process's private memory grows by two tensors (the one
    being written, the next one read) and a little, a tenth of the checkpoint, for both kinds of export; a
    load of the whole checkpoint (the yardstick: the measure sees tensor memory) grows by all of it. glibc's
    mmap threshold is fixed at 128 KiB in the child, so that freed buffers go back to the system at once and
    resident memory is live memory, not the allocator's cache."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(asyncckpt.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=110, env=env)
    assert out.returncode == 0, out.stderr
    growth = {kind: (int(g), int(total)) for kind, g, total in (line.split() for line in out.stdout.splitlines())}
    bound = 2 * (4 << 20) + (4 << 20)
    assert growth["load"][0] > 120 << 20, growth
    for kind in ("safetensors", "torch"):
        used, total = growth[kind]
        assert total == 128 << 20 and total >= 10 * bound
        assert used < bound, f"{kind}: private memory grew by {used / 2 ** 20:.1f} MiB exporting {total >> 20} MiB"


# ---------------------------------------------------------------------------------------- inspect --json
TAG_FIELDS = {"save_dir": str, "tag": str, "path": str, "latest": bool, "format": str, "format_version": int,
              "library_version": str, "created_unix": (int, float), "world_size": int, "node_local": bool,
              "ranks": list, "files": dict, "raw_bytes": int, "stored_bytes": int, "ratio": (float, type(None)),
              "tensors": list}
OPTIONAL_TAG_FIELDS = {"global_steps": int}
RANK_FIELDS = {"rank": int, "index": str, "bytes": (int, type(None)), "data_files": dict}
TENSOR_FIELDS = {"key": str, "rank": int, "dtype": str, "shape": list, "device": str, "raw_bytes": int,
                 "stored_bytes": int, "chunks": int, "codecs": dict}
TENSOR_KINDS = {"file": {"file": str}, "view": {"view_of": str, "byte_offset": int, "stride": list},
                "shard": {"global_shape": list, "global_offset": list}}
DIR_FIELDS = {"save_dir": str, "latest": (str, type(None)), "tags": list, "partial": list}
DIR_TAG_FIELDS = {"tag": str, "latest": bool, "world_size": int, "global_steps": (int, type(None)),
                  "created_unix": (int, float, type(None)), "raw_bytes": int, "stored_bytes": int,
                  "ratio": (float, type(None))}


def check_fields(obj: dict, required: dict, optional: dict = {}) -> None:  # noqa: B006 - read only
    assert set(required) <= set(obj) <= set(required) | set(optional), (sorted(obj), sorted(required))
    for k, v in obj.items():
        assert isinstance(v, {**required, **optional}[k]), (k, v)


def test_inspect_json_schema_is_pinned(tmp_path, ckpt):
    save_dir, _ = ckpt
    big = torch.arange(8.0)
    publish({"a": big, "v": big[2:6], "w": big[1:3]}, save_dir, "views")
    d = json.loads(run("inspect", save_dir, "--json").stdout)
    check_fields(d, DIR_FIELDS)
    for t in d["tags"]:
        check_fields(t, DIR_TAG_FIELDS)
    for tag in ("s1", "views"):
        d = json.loads(run("inspect", f"{save_dir}/{tag}", "--json").stdout)
        check_fields(d, TAG_FIELDS, OPTIONAL_TAG_FIELDS)
        for r in d["ranks"]:
            check_fields(r, RANK_FIELDS)
        for t in d["tensors"]:
            kind = "view" if "view_of" in t else "file"
            check_fields(t, {**TENSOR_FIELDS, **TENSOR_KINDS[kind]}, TENSOR_KINDS["shard"])
    assert {t["key"] for t in d["tensors"] if "view_of" in t} == {"a", "v", "w"}
