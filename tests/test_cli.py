"""The ``asyncckpt`` command line (inspect, verify, exit statuses) and the example YAML config."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from click.testing import CliRunner

import asyncckpt
from asyncckpt.cli import main
from asyncckpt.owners import restamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 2, "nice": 0}}  # several chunks per tensor


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A save_dir with two tags written by AsyncCheckpointer; `latest` names the second."""
    root = tmp_path_factory.mktemp("cli")
    save_dir = str(root / "ckpts")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    opt = torch.optim.AdamW(model.parameters())
    with asyncckpt.AsyncCheckpointer(model, opt, config=CONFIG) as saver:
        for _ in range(2):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            saver.save_checkpoint(save_dir, client_state={"note": "cli"}).result(timeout=60)
    return save_dir


@pytest.fixture
def copy(ckpts, tmp_path):
    """A private copy of the checkpoints, to damage."""
    import shutil

    dst = str(tmp_path / "ckpts")
    shutil.copytree(ckpts, dst)
    return dst


def data_file(save_dir: str, tag: str) -> str:
    return os.path.join(save_dir, tag, "rank00000-0.bin")


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_dir_lists_tags_and_latest(ckpts):
    r = run("inspect", ckpts)
    assert r.exit_code == 0, r.output
    assert "latest -> global_step2" in r.output
    rows = {line.split()[1] if line.lstrip().startswith("*") else line.split()[0]: line
            for line in r.output.splitlines()[2:] if "global_step" in line}
    assert set(rows) == {"global_step1", "global_step2"}
    assert rows["global_step2"].lstrip().startswith("*") and not rows["global_step1"].lstrip().startswith("*")
    assert re.search(r"\d\.\d\dx", rows["global_step1"])  # a compression ratio


def test_inspect_dir_json(ckpts):
    r = run("inspect", ckpts, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["latest"] == "global_step2"
    assert [t["tag"] for t in d["tags"]] == ["global_step1", "global_step2"]
    assert [t["latest"] for t in d["tags"]] == [False, True]
    for t in d["tags"]:
        assert t["world_size"] == 1 and t["raw_bytes"] > 0 and t["stored_bytes"] > 0
        assert t["ratio"] == pytest.approx(t["raw_bytes"] / t["stored_bytes"], rel=1e-3)
    assert d["partial"] == []


def test_inspect_tag_text(ckpts):
    path = os.path.join(ckpts, "global_step1")
    r = run("inspect", path)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "world size" in out and "ratio" in out
    for name in ("manifest.json", "rank00000.json", "rank00000-0.bin"):
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("module/0.weight "))
    cols = line.split()
    assert cols[1] == "float32" and "[128, 64]" in line and "cpu" in cols
    assert int(cols[cols.index("cpu") + 1]) == 2  # 32 KiB in 16 KiB chunks
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("KEY"))
    assert header.index("DTYPE") == line.index("float32")  # aligned columns


def test_inspect_tag_json_matches_the_reader(ckpts):
    r = run("inspect", os.path.join(ckpts, "global_step2"), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    reader = asyncckpt.CheckpointReader(ckpts, "global_step2")
    assert d["tag"] == "global_step2" and d["latest"] is True and d["world_size"] == 1
    assert d["format_version"] == 3 and d["global_steps"] == 2
    assert d["raw_bytes"] == reader.raw_bytes and d["stored_bytes"] == reader.stored_bytes
    assert d["files"] == {n: os.path.getsize(os.path.join(reader.path, n)) for n in os.listdir(reader.path)}
    tensors = {t["key"]: t for t in d["tensors"]}
    assert set(tensors) == set(reader.records)
    w = tensors["module/0.weight"]
    assert (w["dtype"], w["shape"], w["device"], w["chunks"], w["raw_bytes"]) == ("float32", [128, 64], "cpu", 2, 128 * 64 * 4)
    assert sum(w["codecs"].values()) == 2
    assert all(re.fullmatch(r"raw|zstd|shuffle\[[zr]+\]", c) for t in d["tensors"] for c in t["codecs"])
    assert w["stored_bytes"] == sum(c.length for c in reader.records["module/0.weight"][0][1].chunks)


def test_inspect_missing_dir_is_a_usage_error(tmp_path):
    r = run("inspect", str(tmp_path / "nothing"))
    assert r.exit_code == 2
    assert "no such file or directory" in r.output


def test_inspect_missing_tag_lists_tags(ckpts):
    r = run("inspect", os.path.join(ckpts, "global_step9"))
    assert r.exit_code == 2
    assert "global_step9" in r.output and "global_step1, global_step2" in r.output


# ----------------------------------------------------------------------------------------------- verify
def test_verify_ok(ckpts):
    r = run("verify", ckpts)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("OK ") and "global_step2" in r.output
    r = run("verify", os.path.join(ckpts, "global_step1"))
    assert r.exit_code == 0, r.output
    r = run("verify", ckpts, "--all")
    assert r.exit_code == 0, r.output
    assert "2 of 2 checkpoints OK" in r.output


def test_verify_flipped_byte_names_file_chunk_and_tensor(copy):
    path = data_file(copy, "global_step2")
    reader = asyncckpt.CheckpointReader(copy, "global_step2")
    rec = reader.records["module/0.weight"][0][1]
    at = rec.chunks[1].offset + rec.chunks[1].length // 2  # inside the second chunk of that tensor
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    r = run("verify", os.path.join(copy, "global_step2"))
    assert r.exit_code == 1, r.output
    assert "CORRUPT" in r.output
    assert "rank00000-0.bin" in r.output and "chunk 1" in r.output and "'module/0.weight'" in r.output
    # the other tag is still fine; --all reports both and fails
    r = run("verify", copy, "--all")
    assert r.exit_code == 1
    assert "OK " in r.output and "1 of 2 checkpoints OK, 1 CORRUPT" in r.output


def test_verify_truncated_data_file(copy):
    path = data_file(copy, "global_step1")
    os.truncate(path, os.path.getsize(path) - 100)
    r = run("verify", os.path.join(copy, "global_step1"))
    assert r.exit_code == 1, r.output
    assert "rank00000-0.bin" in r.output and "truncated" in r.output


def test_verify_missing_rank_index(copy):
    os.unlink(os.path.join(copy, "global_step1", "rank00000.json"))
    r = run("verify", os.path.join(copy, "global_step1"))
    assert r.exit_code == 1, r.output
    assert "rank00000.json" in r.output


def test_verify_missing_tag_lists_tags(ckpts):
    r = run("verify", os.path.join(ckpts, "nope"))
    assert r.exit_code == 2
    assert "'nope'" in r.output and "published tags: global_step1, global_step2" in r.output


def test_verify_incomplete_tag_says_so(copy):
    os.rename(os.path.join(copy, "global_step1"), os.path.join(copy, ".global_step7.partial"))
    r = run("verify", os.path.join(copy, "global_step7"))
    assert r.exit_code == 2
    assert "never completed" in r.output and "global_step2" in r.output
    r = run("inspect", copy)
    assert r.exit_code == 0 and ".global_step7.partial" in r.output


def test_verify_dir_without_latest(tmp_path):
    asyncckpt.save({"x": torch.arange(10)}, str(tmp_path), "t1", save_latest=False).result(timeout=60)
    r = run("verify", str(tmp_path))
    assert r.exit_code == 2
    assert "no 'latest' file" in r.output and "t1" in r.output
    assert run("verify", str(tmp_path), "--all").exit_code == 0


def test_verify_all_with_a_tag_is_a_usage_error(ckpts):
    r = run("verify", os.path.join(ckpts, "global_step1"), "--all")
    assert r.exit_code == 2


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "asyncckpt"]
    assert eps and eps[0].value == "asyncckpt.cli:main"


def test_inspect_shows_views_of_shared_storage(tmp_path):
    t = torch.arange(100, dtype=torch.float32)
    asyncckpt.save({"a": t, "b": t[10:20].view(2, 5), "e": torch.zeros(0)}, str(tmp_path), "v1").result(timeout=60)
    r = run("inspect", str(tmp_path / "v1"))
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("b "))
    assert "[2, 5]" in line and "view of ~s/a at byte 40" in line
    d = json.loads(run("inspect", str(tmp_path / "v1"), "--json").output)
    b = next(t for t in d["tensors"] if t["key"] == "b")
    assert (b["view_of"], b["byte_offset"], b["stride"], b["chunks"]) == ("~s/a", 40, [5, 1], 0)
    assert run("verify", str(tmp_path / "v1")).exit_code == 0


def test_mixed_dtype_views_of_one_storage_round_trip(tmp_path):
    """Regression: a uint8 view at an odd offset and a float32 view of one storage used to save a float32
    view offset that was not a multiple of 4, which every load then refused."""
    t = torch.arange(16, dtype=torch.float32)
    state = {"u": t.view(torch.uint8)[1:9], "f": t[2:6], "c": t.view(torch.complex128)[1:2]}
    asyncckpt.save(state, str(tmp_path), "x").result(timeout=60)
    assert run("verify", str(tmp_path / "x")).exit_code == 0
    loaded = asyncckpt.load(str(tmp_path), "x")
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert loaded["u"].untyped_storage().data_ptr() == loaded["f"].untyped_storage().data_ptr()


def test_verify_refuses_a_zstd_bomb_without_allocating_it(tmp_path):
    """A chunk whose zstd frame declares far more bytes than its record must fail before decompression
    (python-zstandard's max_output_size does not bound a frame that declares its size)."""
    import zstandard

    from asyncckpt.format import seal, unseal

    asyncckpt.save({"z": torch.zeros(1 << 16, dtype=torch.uint8)}, str(tmp_path), "b").result(timeout=60)
    tag = tmp_path / "b"
    index = unseal((tag / "rank00000.json").read_bytes(), "index")
    chunk = index["tensors"]["z"]["chunks"][0]
    assert chunk["codec"] == "zstd"
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(1 << 28))  # 256 MiB of zeros in ~8 KiB
    (tag / "rank00000-0.bin").write_bytes(bomb)
    chunk.update(off=0, len=len(bomb))
    index["files"] = {"rank00000-0.bin": len(bomb)}
    data = seal(index)
    (tag / "rank00000.json").write_bytes(data)
    restamp(str(tag))
    r = run("verify", str(tag))
    assert r.exit_code == 1, r.output
    assert "declares 268435456 bytes, expected 65536" in r.output and "'z'" in r.output


# ------------------------------------------------------------------------------------ hostile manifests
def _reseal_manifest(tag_dir: str, **fields) -> None:
    from asyncckpt.format import seal, unseal

    path = os.path.join(tag_dir, "manifest.json")
    with open(path, "rb") as f:
        doc = unseal(f.read(), path)
    doc.update(fields)
    with open(path, "wb") as f:
        f.write(seal(doc))


@pytest.mark.parametrize("created", [1e300, -1e300, -1e18, 1e18, 10 ** 30, -(10 ** 30), "nan", "NaN", "inf", "1e300",
                                     True, False, None, [1], {"t": 1}, ""])
def test_inspect_survives_a_forged_created_unix(copy, created):
    tag_dir = os.path.join(copy, "global_step1")
    _reseal_manifest(tag_dir, created_unix=created)
    r = run("inspect", tag_dir)
    assert r.exit_code == 0, r.output
    assert re.search(r"^created\s+-$", r.output, re.M), r.output
    r = run("inspect", copy)
    assert r.exit_code == 0, r.output
    rows = {name: next(ln for ln in r.output.splitlines()[1:] if f" {name} " in ln)
            for name in ("global_step1", "global_step2")}
    assert rows["global_step1"].rstrip().endswith("-"), r.output
    assert rows["global_step2"].rstrip().endswith("UTC"), r.output
    assert json.loads(run("inspect", copy, "--json").output)["tags"][0]["created_unix"] == created
    assert run("verify", tag_dir).exit_code == 0


def test_one_bad_tag_does_not_hide_the_others(copy, tmp_path):
    """A directory with one good tag and bad ones of every kind: inspect DIR and verify --all report each bad
    tag with its error, still report the good ones, and exit 1."""
    import shutil

    from asyncckpt.format import seal, unseal

    good = os.path.join(copy, "global_step2")
    bad: dict[str, str] = {}  # tag -> text its report must contain

    def clone(name: str) -> str:
        shutil.copytree(good, os.path.join(copy, name))
        return os.path.join(copy, name)

    with open(os.path.join(clone("bad_manifest_byte"), "manifest.json"), "r+b") as f:
        f.seek(30)
        b = f.read(1)
        f.seek(30)
        f.write(bytes([b[0] ^ 0x04]))
    bad["bad_manifest_byte"] = "manifest.json"
    os.unlink(os.path.join(clone("bad_fifo_manifest"), "manifest.json"))
    os.mkfifo(os.path.join(copy, "bad_fifo_manifest", "manifest.json"))
    bad["bad_fifo_manifest"] = "a FIFO"
    elsewhere = str(tmp_path / "elsewhere")
    shutil.copytree(good, elsewhere)
    os.symlink(elsewhere, os.path.join(copy, "bad_symlink"))
    bad["bad_symlink"] = "symbolic link"
    os.unlink(os.path.join(clone("bad_missing_index"), "rank00000.json"))
    bad["bad_missing_index"] = "rank00000.json"
    _reseal_manifest(clone("odd_created"), created_unix=1e300)  # readable: shown with "-", not an error
    # a dangling view base, re-sealed: inspect can read it, verify must refuse it
    tag = clone("bad_view")
    with open(os.path.join(tag, "rank00000.json"), "rb") as f:
        index = unseal(f.read(), "index")
    index["tensors"]["extra_view"] = {"dtype": "float32", "shape": [2], "device": "cpu",
                                           "base": "#storage/none", "byte_offset": 0, "stride": [1]}
    data = seal(index)
    with open(os.path.join(tag, "rank00000.json"), "wb") as f:
        f.write(data)
    restamp(tag)
    with open(os.path.join(data_file(copy, "global_step1")), "r+b") as f:  # a flipped data byte: verify only
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x01]))

    r = run("inspect", copy)
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    for name, why in bad.items():
        row = next((ln for ln in lines if f" {name} " in ln), None)
        assert row is not None and ("unreadable" in row or "refused" in row), (name, r.output)
        assert why in row, (name, row)
    for name in ("global_step1", "global_step2", "odd_created", "bad_view"):
        row = next(ln for ln in lines if f" {name} " in ln)
        assert re.search(r"\d\.\d\dx", row), row
    assert "bad_symlink" in r.output.splitlines()[-1] and "bad_manifest_byte" in r.output.splitlines()[-1]

    r = run("verify", copy, "--all")
    assert r.exit_code == 1, r.output
    oks = [ln for ln in r.output.splitlines() if ln.startswith("OK ")]
    assert sorted(os.path.basename(ln.split()[1].rstrip(":")) for ln in oks) == ["global_step2", "odd_created"], r.output
    assert "REFUSED" in r.output and "bad_symlink" in r.output
    assert "no rank index holds" in r.output and "global_step1" in r.output and "checksum mismatch" in r.output
    total = len(bad) + 4
    assert f"2 of {total} checkpoints OK, {total - 2} CORRUPT" in r.output
