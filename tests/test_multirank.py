"""Many ranks, one atomic checkpoint: 2-4 gloo processes on 127.0.0.1 (issue 3)."""
from __future__ import annotations

import pytest
import torch

import asyncckpt
import multirank_workers as w
from dist_helpers import assert_all_ok, forkserver_context, run_ranks as _run_ranks

pytestmark = pytest.mark.multirank


def run_ranks(fn, world, out_dir, *args, **kw):
    """The ranks come from the preloaded forkserver (milliseconds each, not the seconds of a fresh interpreter)."""
    return _run_ranks(fn, world, out_dir, *args, ctx=forkserver_context(), **kw)


def test_ddp_replicated_written_once_and_loads_on_any_world_size(tmp_path):
    results = assert_all_ok(run_ranks(w.ddp_save_load, 2, str(tmp_path), str(tmp_path)))
    raw_one_copy = sum(r["raw"] for r in results)  # each rank staged only its share (+ its RNG state)
    model_bytes = sum(t.numel() * t.element_size() for t in torch.load(tmp_path / "expected0.pt").values())
    # replicated state is split across ranks: together they wrote about one copy, not two
    assert model_bytes <= raw_one_copy < model_bytes * 1.2, (raw_one_copy, model_bytes)
    shares = [r["raw"] for r in results]
    assert max(shares) < 0.75 * raw_one_copy, shares  # each rank wrote roughly half
    assert {r["tag"] for r in results} == {"global_step3"}
    assert set(results[0]["phases"]) >= {"stage", "write", "gather", "publish"}
    # world size 1 loads the 2-rank checkpoint (the functional API, no process group)
    state = asyncckpt.load(tmp_path, rank=0)
    expected = torch.load(tmp_path / "expected0.pt")
    for k, v in state["module"].items():
        assert torch.equal(v, expected[f"m/{k[len('module.'):]}"]), k


@pytest.mark.timeout(300)
def test_fsdp2_sharded_save_and_reshard(tmp_path):
    """Saved by 4 ranks; loaded by 2 (each needs 2 whole shards) and by 3 (each needs parts of 2 shards)."""
    assert_all_ok(run_ranks(w.fsdp_save, 4, str(tmp_path), str(tmp_path), timeout=150))
    for load_world in (2, 3):
        n = assert_all_ok(run_ranks(w.fsdp_load, load_world, str(tmp_path), str(tmp_path), timeout=150))
        assert n[0] > 10
    # one process without a mesh gets full tensors
    state = asyncckpt.load(tmp_path, "fsdp", rank=0)
    expected = torch.load(tmp_path / "expected_fsdp.pt")
    for k, v in state["module"].items():
        assert torch.equal(v, expected[f"m/{k}"]), k


def test_write_failure_on_one_rank_fails_every_rank(tmp_path):
    results = assert_all_ok(run_ranks(w.write_failure, 2, str(tmp_path), str(tmp_path)))
    assert [r["error"] for r in results] == ["CommitError", "WriteError"]  # README, "Errors"
    assert all("rank 1" in r["message"] for r in results)
    assert asyncckpt.load(tmp_path, rank=0)["global_steps"] == 1


def test_tag_mismatch_is_refused_on_every_rank(tmp_path):
    results = assert_all_ok(run_ranks(w.tag_mismatch, 2, str(tmp_path), str(tmp_path)))
    assert all("rank 0: 'tag0'" in r and "rank 1: 'tag1'" in r for r in results)
    assert asyncckpt.list_tags(str(tmp_path)) == ["same"]


@pytest.mark.thread_only("the rank exits from inside its own storage write (a Python callable in a fault hook); in service "
                         "mode its writes run in the service (tests/test_service_ranks.py kills a rank instead)")
def test_killed_rank_fails_the_others_within_timeout(tmp_path):
    results = run_ranks(w.killed_rank, 3, str(tmp_path), str(tmp_path), timeout=100, pg_timeout=20)
    assert results[2].exitcode == 17
    for r in results[:2]:
        assert r.ok, r.error
        assert r.value in ("CommitTimeoutError", "CommitError")
    assert open(tmp_path / "latest").read().strip() == "before"
    assert not (tmp_path / "after").exists()


def test_training_collectives_while_commits_run(tmp_path):
    counts = assert_all_ok(run_ranks(w.train_while_committing, 2, str(tmp_path), str(tmp_path)))
    assert counts == [5, 5]


def test_node_local_storage_each_node_publishes_its_copy(tmp_path):
    listing = assert_all_ok(run_ranks(w.node_local, 2, str(tmp_path), str(tmp_path),
                                      env={"GROUP_RANK": "{rank}", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}))
    tables = ["owners.json", "owners.tbl"]
    assert listing[0] == ["manifest.json", *tables, "rank00000-0.bin", "rank00000.json", "ranks.tbl"]
    assert listing[1] == ["manifest.json", *tables, "rank00001-0.bin", "rank00001.json", "ranks.tbl"]
    for node in ("node0", "node1"):
        assert (tmp_path / node / "latest").read_text().strip() == "n"


def test_a_save_one_rank_cannot_make_is_skipped_or_failed_everywhere(tmp_path):
    r0, r1 = assert_all_ok(run_ranks(w.one_rank_busy_or_failing, 2, str(tmp_path), str(tmp_path)))
    assert r0["busy"] and r1["busy"]  # rank 0 had a free slot, yet skipped with rank 1
    assert "client_state/obj" in r1["raised_here"]
    assert "rank 1" in r0["other_rank_error"] and "PickleNotAllowedError" in r0["other_rank_error"]
    assert r0["next"] and r1["next"]
    assert asyncckpt.list_tags(str(tmp_path)) == ["d"]
