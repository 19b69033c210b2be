"""writer.mode: service with several ranks on one node (gloo, tests/dist_helpers.run_ranks): one service
for all local ranks, bit-exact round trips, and a rank that dies before handing its part over."""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest
import torch

import asyncckpt
from asyncckpt.loader import list_tags
from asyncckpt.service import paths
from dist_helpers import assert_all_ok, forkserver_context, run_ranks as _run_ranks

pytestmark = pytest.mark.timeout(300)

CFG = {"commit_timeout_s": 20, "codec": {"chunk_mib": 1 / 16},
       "writer": {"mode": "service", "threads_per_node": 2, "nice": 0, "fsync": False}}


@pytest.fixture
def runtime():
    """A private runtime directory and job id, set in every rank (and inherited by the service they start)."""
    path = f"/dev/shm/asyncckpt-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path, 0o700)
    yield {paths.RUNTIME_ENV: path, paths.ID_ENV: uuid.uuid4().hex}
    from test_service import service_pids

    for pid in service_pids(path):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", path], check=False, timeout=30)


def run_ranks(fn, world, out_dir, *args, env, **kw):
    """The ranks come from the preloaded forkserver (milliseconds each, not the seconds of a fresh interpreter),
    which does not see this process's environment: ``env`` (the runtime fixture) is set in each rank."""
    return _run_ranks(fn, world, out_dir, *args, env=env, ctx=forkserver_context(), **kw)


def _model(rank: int) -> torch.nn.Module:
    torch.manual_seed(100 + rank)  # every rank's state is its own (nothing replicated)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def round_trip(rank: int, world: int, save_dir: str) -> dict:
    model = _model(rank)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    with asyncckpt.AsyncCheckpointer(model, opt, config=CFG) as saver:
        results = [saver.save_checkpoint(save_dir, tag=f"t{i}", client_state={"rank": rank, "i": i}).result(120)
                   for i in range(2)]
        pid = saver.engine.service.service_pid
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _model(rank + 50)
    with asyncckpt.AsyncCheckpointer(fresh, torch.optim.Adam(fresh.parameters()),
                                     config={"writer": {"mode": "thread"}}) as loader:
        _, client = loader.load_checkpoint(save_dir, tag="t1")
    assert client == {"rank": rank, "i": 1}, client
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    return {"pid": pid, "world": results[-1].world_size, "total": results[-1].total_bytes_written}


@pytest.mark.parametrize("world", [1, 4])
def test_ranks_share_one_service_and_round_trip_bit_exact(runtime, tmp_path, world):
    out = assert_all_ok(run_ranks(round_trip, world, str(tmp_path), str(tmp_path / "ckpt"), timeout=240, env=runtime))
    assert len({o["pid"] for o in out}) == 1 and out[0]["pid"] not in (None, os.getpid())
    assert {o["world"] for o in out} == {world}
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "t1"
    assert sorted(list_tags(str(tmp_path / "ckpt"))) == ["t0", "t1"]


def missing_part(rank: int, world: int, save_dir: str) -> str:
    model = _model(rank)
    saver = asyncckpt.AsyncCheckpointer(model, None, config=CFG)
    saver.save_checkpoint(save_dir, tag="before").result(120)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before handing its part of "after" over
    err = saver.save_checkpoint(save_dir, tag="after").exception(timeout=CFG["commit_timeout_s"] + 60)
    assert isinstance(err, asyncckpt.CommitError), repr(err)
    assert open(os.path.join(save_dir, "latest")).read().strip() == "before"
    try:
        saver.close(timeout=60)
    except asyncckpt.CheckpointError:
        pass
    return str(err)


def test_a_missing_part_publishes_nothing_and_fails_the_other_rank(runtime, tmp_path):
    results = run_ranks(missing_part, 2, str(tmp_path), str(tmp_path / "ckpt"), timeout=240, env=runtime)
    assert results[1].exitcode == -signal.SIGKILL
    assert results[0].ok, results[0].error
    assert "rank(s) [1]" in results[0].value, results[0].value
    assert list_tags(str(tmp_path / "ckpt")) == ["before"]


def perturbed_in_service(rank: int, world: int, save_dir: str) -> list:
    """tests/test_replicated_verify.py's save of diverged then agreed replicated copies, in service mode."""
    import test_replicated_verify

    test_replicated_verify.CFG = {**test_replicated_verify.CFG, "writer": {**CFG["writer"]}}
    return test_replicated_verify.perturbed_save(rank, world, save_dir, True)


def test_verify_replicated_compares_the_ranks_checksums_at_the_services_commit(runtime, tmp_path):
    """verify_replicated: each rank checksums its copy of the replicated tensors before its hand-over; the
    checksums travel with the descriptor to the service's commit, which fails the save on every rank naming
    the tensors that differ (as in thread mode); the next save, with identical copies, is published."""
    out = assert_all_ok(run_ranks(perturbed_in_service, 2, str(tmp_path), str(tmp_path / "ckpt"), timeout=240, env=runtime))
    assert out[0] == out[1], out
    text, later = out[0]
    assert text.startswith("CommitError: checkpoint 'diverged' was not published"), text
    for key in ("0.weight", "2.bias"):
        assert f"'module/{key}' on rank 1" in text, text
    assert "running_mean" not in text and text.count("' on rank 1") == 2, text
    assert later is None
    assert list_tags(str(tmp_path / "ckpt")) == ["agreed"]


def thread_roles(rank: int, world: int, save_dir: str) -> dict:
    """After a save of every rank: the OS names of this training process's threads and of the service's."""
    from benchmarks.service_budget import role, threads_of

    model = _model(rank)
    with asyncckpt.AsyncCheckpointer(model, None, config=CFG) as saver:
        saver.save_checkpoint(save_dir, tag="t").result(120)
        pid = saver.engine.service.service_pid
        return {"pid": pid, "service": sorted(role(n) for n, _, _ in threads_of(pid).values()),
                "trainer": sorted(role(n) for n, _, _ in threads_of(os.getpid()).values())}


@pytest.mark.parametrize("world", [2, 3])
def test_local_ranks_share_the_nodes_thread_budget_in_one_service(runtime, tmp_path, world):
    """Several local ranks: one service, whose encode threads are the node's budget (writer.threads_per_node: 2),
    whatever the number of ranks; the training processes run no encode or file threads of their own."""
    out = assert_all_ok(run_ranks(thread_roles, world, str(tmp_path), str(tmp_path / "ckpt"), timeout=240, env=runtime))
    assert len({o["pid"] for o in out}) == 1
    service = out[0]["service"]
    assert service.count("acs-encode") == CFG["writer"]["threads_per_node"], service
    assert service.count("acs-io") == 1, service  # one group (writer, event loop) serves the saver's ranks
    for o in out:
        assert not {"ac-encode", "ac-file", "ac-retain"} & set(o["trainer"]), o["trainer"]
        assert {"ac-handover", "ac-replies"} <= set(o["trainer"]), o["trainer"]
