"""Many nodes (simulated on this machine with torchrun's GROUP_RANK/LOCAL_RANK/LOCAL_WORLD_SIZE): every rank
resumes from the same checkpoint or none does; saves are paired by identity, not only by order (issue 13)."""
from __future__ import annotations

import os
import shutil

import pytest

import node_workers as nw
from dist_helpers import assert_all_ok, forkserver_context, run_ranks as _run_ranks

pytestmark = pytest.mark.multirank


def run_ranks(fn, world, out_dir, *args, **kw):
    return _run_ranks(fn, world, out_dir, *args, ctx=forkserver_context(), **kw)


def _dirs(root, *names):
    return [str(root / n) for n in names]


# ------------------------------------------------------------------------------------ 1. load agreement
def test_replacement_node_without_latest_refuses_on_every_rank(tmp_path):
    shared = str(tmp_path / "ckpt")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [shared, shared], ["t1"]))
    # rank 1 comes back on a fresh node: its directory is empty; rank 0 still sees the checkpoint
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [shared, fresh]))
    for r in out:
        assert "error" in r, out  # nobody resumes alone, nobody starts from scratch alone
        assert "rank 0: tag 't1'" in r["error"] and "rank 1: no 'latest' file" in r["error"], r["error"]
    assert out[0]["error"].split(" [this rank")[0] == out[1]["error"].split(" [this rank")[0]


def test_explicit_tag_missing_on_one_rank_refuses_on_every_rank(tmp_path):
    shared = str(tmp_path / "ckpt")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [shared, shared], ["t1"]))
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [shared, fresh], "t1"))
    for r in out:
        assert "rank 0: tag 't1'" in r["error"] and "rank 1: CheckpointNotFoundError" in r["error"], out


def test_no_latest_anywhere_loads_nothing_everywhere(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [empty, empty]))
    assert out == [{"path": None, "client": None}] * 2


def test_node_local_copies_of_different_saves_are_refused(tmp_path):
    """Two nodes hold a tag of the same name from different saves: not one checkpoint."""
    n0, n1, other = _dirs(tmp_path, "node0", "node1", "other0")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [n0, n1], ["x"], 1))
    # save "x" again: node 1's copy is replaced, node 0 writes this save elsewhere
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [other, n1], ["x"], 1, True))
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [n0, n1], None, 1))
    for r in out:
        assert "error" in r and "ranks do not agree" in r["error"] and "no tag" in r["error"], out


def test_node_local_latest_cut_short_on_one_node_loads_the_newest_common_tag(tmp_path):
    n0, n1 = _dirs(tmp_path, "node0", "node1")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [n0, n1], ["t1", "t2"], 1))
    # node 1's publish of t2 never happened (it crashed before its rename): its latest still names t1
    shutil.rmtree(os.path.join(n1, "t2"))
    with open(os.path.join(n1, "latest"), "w") as f:
        f.write("t1\n")
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [n0, n1], None, 1))
    assert [r.get("path") for r in out] == ["t1", "t1"], out
    assert [r["client"]["rank"] for r in out] == [0, 1]


# ------------------------------------------------------------------- 2. saves are paired by identity
@pytest.mark.parametrize("over,save_latest,key,values", [
    ([{}, {"keep_last": 2}], [True, True], "keep_last", ["rank 0: 0", "rank 1: 2"]),
    ([{}, {"overwrite": True}], [True, True], "overwrite", ["rank 0: False", "rank 1: True"]),
    ([{}, {"codec": {"level": 3, "chunk_mib": 0.25}}], [True, True], "codec", ["level=1", "level=3"]),
    ([{}, {}], [True, False], "save_latest", ["rank 0: True", "rank 1: False"]),
    ([{}, {}], None, "save_dir", ["rank 0: '", "rank 1: '"]),
])
def test_a_save_made_differently_on_one_rank_fails_on_every_rank(tmp_path, over, save_latest, key, values):
    dirs = [str(tmp_path / "ckpt"), str(tmp_path / ("other" if save_latest is None else "ckpt"))]
    out = assert_all_ok(run_ranks(nw.save_differently, 2, str(tmp_path), dirs, over, save_latest or [True, True]))
    for first, second in out:
        assert "not making the same save" in first and f"{key}: " in first, first
        assert all(v in first for v in values), first
        if over[1]:  # the configs still differ: the next save is refused alike
            assert second == first.replace("'s'", "'next'"), (first, second)
        else:
            assert second is None, second
    assert not os.path.exists(tmp_path / "ckpt" / "s") and not os.path.exists(tmp_path / "other" / "s")
    assert os.path.exists(tmp_path / "ckpt" / "next") == (not over[1])


def test_a_save_one_rank_never_calls_is_not_paired_with_its_next(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    r0, r1 = assert_all_ok(run_ranks(nw.skipped_save, 2, str(tmp_path), save_dir, timeout=120))
    # rank 0's step-1 save met rank 1's step-2 save: refused on both, naming the ranks and the steps
    for err in (r0[0], r1[0]):
        assert err.startswith("CommitError") and "manifest global_steps: rank 0: 0; rank 1: 1" in err, err
    assert r0[1].startswith(("CommitTimeoutError", "CommitError")), r0  # rank 0's second save has no partner
    assert not os.path.exists(os.path.join(save_dir, "a")) and not os.path.exists(os.path.join(save_dir, "b"))


# ---------------------------------------------------------------------------------------- 3. orphans
def _crash_before_latest(save_dir, published, latest):
    """What a crash between publishing ``published`` and updating ``latest`` leaves behind."""
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(latest + "\n")


def test_a_replayed_run_replaces_an_orphan_instead_of_crash_looping(tmp_path):
    import asyncckpt

    save_dir = str(tmp_path / "ckpt")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [save_dir] * 2, ["a", "b"]))
    _crash_before_latest(save_dir, "b", "a")
    # the restarted job resumes from "a" and reaches "b" again, on every rank
    assert assert_all_ok(run_ranks(nw.replay, 2, str(tmp_path), save_dir, "b", 2)) == ["b", "b"]
    assert open(os.path.join(save_dir, "latest")).read() == "b\n"
    assert asyncckpt.load(save_dir, rank=1)["client_state"] == {"run": 2}
    # the same with no latest at all (the crash came during the very first save)
    os.remove(os.path.join(save_dir, "latest"))
    assert assert_all_ok(run_ranks(nw.replay, 2, str(tmp_path), save_dir, "b", 3)) == ["b", "b"]
    assert asyncckpt.load(save_dir, rank=0)["client_state"] == {"run": 3}


@pytest.mark.parametrize("case", ["older than latest", "saved without save_latest"])
def test_a_tag_that_is_not_an_orphan_is_still_refused(tmp_path, case):
    save_dir = str(tmp_path / "ckpt")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [save_dir] * 2, ["a", "b"]))
    if case == "older than latest":
        tag = "a"  # latest names the newer "b"
    else:
        assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [save_dir] * 2, ["c"], 0, False, False))
        tag = "c"  # newer than "b", but never meant to be named by latest
    assert assert_all_ok(run_ranks(nw.replay, 2, str(tmp_path), save_dir, tag, 2)) == ["TagExistsError"] * 2
    assert open(os.path.join(save_dir, "latest")).read() == "b\n"


# ------------------------------------------------------------ 4. cross-node atomicity, precise errors
def test_node_local_publish_failing_on_one_node_is_published_nowhere(tmp_path):
    n0, n1 = _dirs(tmp_path, "node0", "node1")
    out = assert_all_ok(run_ranks(nw.publish_fails_on_one_node, 2, str(tmp_path), [n0, n1]))
    for d in (n0, n1):  # node 0 took its copy back: no node holds t2, every latest still names t1
        assert open(os.path.join(d, "latest")).read() == "t1\n"
        assert sorted(n for n in os.listdir(d) if not n.startswith(".")) == ["latest", "t1"], os.listdir(d)
    for err in out:
        assert "checkpoint 't2' was not published (the previous checkpoint is intact)" in err, err
        assert "rank 1: publishing failed: OSError" in err and "injected" in err, err


@pytest.mark.thread_only("patches the saver's gloo group in the training process; the service has its own exchange")
def test_an_error_after_publication_says_that_the_checkpoint_was_published(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    results = run_ranks(nw.peer_dies_after_publication, 2, str(tmp_path), save_dir, timeout=100, pg_timeout=20)
    assert results[1].exitcode == 17
    assert results[0].ok, results[0].error
    assert "this rank published it and latest names it" in results[0].value, results[0].value
    assert open(os.path.join(save_dir, "latest")).read() == "t2\n"


# -------------------------------------------------------------------------------- 5. node identity
def test_nodes_come_from_torchrun_variables_not_the_host_name(tmp_path):
    """Four ranks on one host, two per simulated node: two publishers, each node's copy in its directory."""
    dirs = _dirs(tmp_path, "n0", "n0", "n1", "n1")
    out = assert_all_ok(run_ranks(nw.node_local_dir, 4, str(tmp_path), dirs, 2))
    assert [o["error"] for o in out] == [""] * 4
    assert [o["node"] for o in out] == ["node0", "node0", "node1", "node1"]
    assert [o["local"] for o in out] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    for d in ("n0", "n1"):
        assert sorted(f for f in os.listdir(tmp_path / d / "n") if f.endswith(".json")) == [
            "manifest.json", "owners.json",
            *(["rank00000.json", "rank00001.json"] if d == "n0" else ["rank00002.json", "rank00003.json"])]
        assert not [f for f in os.listdir(tmp_path / d) if f.startswith(".asyncckpt-node")]  # probes removed


def test_node_local_storage_that_is_shared_fails_clearly(tmp_path):
    shared = str(tmp_path / "nfs")
    out = assert_all_ok(run_ranks(nw.node_local_dir, 2, str(tmp_path), [shared, shared], 1))
    for o in out:
        assert "use_node_local_storage is set, but" in o["error"] and "is shared with node(s)" in o["error"], o
    assert not os.path.exists(os.path.join(shared, "n"))


def test_inconsistent_node_variables_are_refused_on_every_rank(tmp_path):
    out = assert_all_ok(run_ranks(nw.inconsistent_nodes, 2, str(tmp_path)))
    assert all("node0 (GROUP_RANK) holds ranks [0, 1]" in o for o in out), out


# --------------------------------------------------------------------------------- 6. rank mapping
def test_another_world_size_never_gets_another_ranks_rng_state(tmp_path):
    shared = str(tmp_path / "ckpt")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [shared, shared], ["t1"]))
    out = assert_all_ok(run_ranks(nw.load, 3, str(tmp_path), [shared] * 3))
    for o in out:
        assert "StateMismatchError" in o["error"] and "load_rng_states=False" in o["error"], out
    out = assert_all_ok(run_ranks(nw.load, 3, str(tmp_path), [shared] * 3, None, 0, False))
    assert [o["client"]["rank"] for o in out] == [0, 0, 0]  # asked for: the lowest saved rank's client_state


def test_a_node_local_copy_of_another_node_never_gives_its_ranks_state(tmp_path):
    n0, n1 = _dirs(tmp_path, "node0", "node1")
    assert_all_ok(run_ranks(nw.save_tags, 2, str(tmp_path), [n0, n1], ["t1"], 1))
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [n1, n0], None, 1))  # the nodes swapped
    for o in out:
        assert "StateMismatchError" in o["error"] and "has no RNG state of its own" in o["error"], out
    out = assert_all_ok(run_ranks(nw.load, 2, str(tmp_path), [n0, n1], None, 1))
    assert [o["client"]["rank"] for o in out] == [0, 1]
