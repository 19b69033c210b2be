"""A reader is pinned to the version of a tag it started with (#13.9): an overwrite of the tag (the publisher's
exchange of directories) or its removal (retention) while a load runs never makes it read the other version's
files; and a reader leaks no file descriptor."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import asyncckpt
import simulated_ranks
from asyncckpt import CheckpointError, CheckpointReader

OVERWRITE = {"overwrite": True, "writer": {"threads_per_node": 1}}


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g),
            "ids": torch.randint(0, 1 << 30, (300,), generator=g), "step": seed,
            "big": torch.randn(40_000, generator=g)}  # several chunks, a data file of its own size


def save(d: str, seed: int, tag: str = "t") -> None:
    asyncckpt.save(state(seed), d, tag, config=OVERWRITE).result(timeout=60)


def same(got: dict, want: dict) -> bool:
    return got["step"] == want["step"] and all(
        torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in ("w", "b", "ids", "big"))


@pytest.fixture
def saved(tmp_path) -> str:
    d = str(tmp_path / "ckpt")
    save(d, 1)
    return d


def test_an_overwrite_after_the_load_opened_its_files_loads_the_old_version_bit_exactly(saved):
    """The load has read the manifest and the index and opened its data files; the tag is then overwritten by
    another save (exchange + removal of the old directory): the load returns the old values."""
    overwritten = []

    def overwrite() -> None:
        save(saved, 2)
        overwritten.append(True)

    reader = CheckpointReader(saved, "t", on_pinned=overwrite)
    got = reader.load_state()
    assert overwritten and same(got, state(1))
    assert same(asyncckpt.load(saved, "t"), state(2))  # a new reader sees the new version


@pytest.mark.parametrize("when", ["after construction", "between two loads"])
def test_an_overwrite_before_the_load_opened_its_files_never_mixes_versions(saved, when):
    """The reader parsed the old manifest, then the tag was overwritten: the load reads the old version's files
    (through the directory it opened, now renamed away) or fails naming what is gone, never the new files."""
    reader = CheckpointReader(saved, "t")
    if when == "between two loads":
        assert same(reader.load_state(), state(1))
    save(saved, 2)
    try:
        got = reader.load_state()
    except CheckpointError as exc:  # the old directory was removed: a clear failure, naming the file
        assert reader.path in str(exc) and "missing" in str(exc), str(exc)
    else:
        assert same(got, state(1))
    reader.close()


@pytest.mark.parametrize("remove", ["rmtree", "retention"])
def test_a_tag_removed_during_a_load_still_loads(saved, remove):
    """Retention (rename to a .deleting directory, then rmtree) or a plain rmtree after the load opened its
    files: the load completes with the values that were saved."""
    def gone() -> None:
        path = os.path.join(saved, "t")
        if remove == "retention":
            moved = os.path.join(saved, ".t.deleting.partial")
            os.rename(path, moved)
            path = moved
        shutil.rmtree(path)

    with CheckpointReader(saved, "t", on_pinned=gone) as reader:
        got = reader.load_state()
    assert not os.path.exists(os.path.join(saved, "t")) and same(got, state(1))


def test_a_load_of_other_ranks_shards_pins_their_files_too(tmp_path):
    """A load that needs other ranks' files (each sharded tensor whole, from the shards of both ranks; the
    replicated table rank 0 wrote) opens them all before it reads data: a removal after that point does not
    affect it."""
    d = str(tmp_path / "ckpt")
    simulated_ranks.write_checkpoint(d, 2)
    removed = []
    with CheckpointReader(d, "t", on_pinned=lambda: removed.append(shutil.rmtree(os.path.join(d, "t")))) as reader:
        got = reader.load_state(rank=1)
    assert removed
    for key in simulated_ranks.KEYS:
        part, name = key.split("/", 1)
        assert torch.equal(got[part][name], simulated_ranks.full(key, 2))
    assert torch.equal(got["rng"], simulated_ranks.rank_local(1)) and torch.equal(got["table"], simulated_ranks.TABLE)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def refuse(device: str):
    raise CheckpointError("no device for you")


def test_loads_leak_no_descriptor(saved):
    """50 loads, each way a reader is used (the function, a context manager, a reader left to the garbage
    collector, a reader closed twice, verify and read_region): the process holds as many descriptors after as
    before."""
    asyncckpt.load(saved, "t")  # warm up whatever the first load opens once for the process
    before = fd_count()
    for i in range(50):
        if i % 5 == 0:
            asyncckpt.load(saved, "t")
        elif i % 5 == 1:
            with CheckpointReader(saved, "t") as reader:
                reader.load_state()
        elif i % 5 == 2:
            CheckpointReader(saved, "t").load_state()  # closed when collected
        elif i % 5 == 3:
            reader = CheckpointReader(saved, "t")
            reader.verify()
            reader.read_region("w", (8, 64), (8, 0))
            reader.close()
            reader.close()
        else:
            with pytest.raises(CheckpointError), CheckpointReader(saved, "t") as reader:
                reader.load_state(map_location=refuse)  # fails half way, after opening its files
        assert fd_count() == before, f"load {i}"
    assert fd_count() == before


def test_a_closed_reader_says_so(saved):
    reader = CheckpointReader(saved, "t")
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader.load_state()
