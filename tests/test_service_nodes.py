"""writer.mode: service on a job of two nodes, simulated on this machine: 4 gloo ranks, ranks 0 and 1 on
"node 0" and ranks 2 and 3 on "node 1" (torchrun's GROUP_RANK/LOCAL_RANK/LOCAL_WORLD_SIZE, and a runtime
directory per node, so that each node starts its own writer service). The two services coordinate each commit
over their own gloo group (asyncckpt/service/link.py), with node-local storage on and off."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
import uuid

import pytest
import torch

import asyncckpt
from asyncckpt.loader import list_tags
from asyncckpt.service import paths
from asyncckpt.service.server import PAUSE_ENV
from dist_helpers import assert_all_ok, forkserver_context, run_ranks
from test_service import service_pids

pytestmark = pytest.mark.timeout(120)

WORLD, PER_NODE = 4, 2
TIMEOUT_S = 8  # commit_timeout_s: a missing part fails the save after this long
# eager: a save survives its trainer's death once handed over, and a lazy one is handed over only once copied
CFG = {"commit_timeout_s": TIMEOUT_S, "snapshot": "eager", "codec": {"chunk_mib": 1 / 16},
       "writer": {"mode": "service", "threads_per_node": 1, "nice": 0, "fsync": False}}
WAIT_S = 60  # the longest any future is waited for


@pytest.fixture
def base(monkeypatch):
    path = f"/dev/shm/asyncckpt-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path, 0o700)
    monkeypatch.setenv(paths.ID_ENV, uuid.uuid4().hex)  # one job: each node's service has the same key
    yield path
    for pid in service_pids(path):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", path], check=False, timeout=30)


def _as_node(rank: int, base: str, env: dict | None = None) -> int:
    """Put this rank on node ``rank // PER_NODE``, with that node's runtime directory; returns the node."""
    node = rank // PER_NODE
    os.environ.update({"GROUP_RANK": str(node), "LOCAL_RANK": str(rank % PER_NODE),
                       "LOCAL_WORLD_SIZE": str(PER_NODE), paths.RUNTIME_ENV: os.path.join(base, f"node{node}")})
    os.environ.update(env or {})
    return node


def _model(rank: int) -> torch.nn.Module:
    torch.manual_seed(100 + rank)  # every rank's state is its own (nothing replicated)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _dir(root: str, node: int, node_local: bool) -> str:
    return os.path.join(root, f"node{node}" if node_local else "shared", "ckpt")


def _cfg(node_local: bool) -> dict:
    return dict(CFG, use_node_local_storage=node_local)


def _latest(save_dir: str) -> str:
    return open(os.path.join(save_dir, "latest")).read().strip()


def round_trip(rank: int, world: int, base: str, root: str, node_local: bool) -> dict:
    node = _as_node(rank, base)
    save_dir = _dir(root, node, node_local)
    model = _model(rank)
    with asyncckpt.AsyncCheckpointer(model, None, config=_cfg(node_local)) as saver:
        results = [saver.save_checkpoint(save_dir, tag=f"t{i}", client_state={"rank": rank, "i": i}).result(WAIT_S)
                   for i in range(2)]
        pid = saver.engine.service.service_pid
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _model(rank + 50)
    with asyncckpt.AsyncCheckpointer(fresh, None, config=dict(_cfg(node_local), writer={"mode": "thread"})) as loader:
        _, client = loader.load_checkpoint(save_dir, tag="t1")
    assert client == {"rank": rank, "i": 1}, client
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    return {"pid": pid, "world": results[-1].world_size, "path": results[-1].path}


@pytest.mark.parametrize("node_local", [False, True])
def test_two_nodes_publish_once_and_load_bit_exact(base, tmp_path, node_local):
    out = assert_all_ok(run_ranks(round_trip, WORLD, str(tmp_path), base, str(tmp_path), node_local, timeout=100,
                                  ctx=forkserver_context()))
    pids = [o["pid"] for o in out]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2], pids  # one service per node
    assert {o["world"] for o in out} == {WORLD}
    for node in range(WORLD // PER_NODE) if node_local else [0]:
        save_dir = _dir(str(tmp_path), node, node_local)
        assert _latest(save_dir) == "t1"
        assert sorted(list_tags(save_dir)) == ["t0", "t1"]
        assert sorted(os.listdir(save_dir)) == ["latest", "t0", "t1"]  # no partial directory, no probe left
    if not node_local:
        assert not os.path.exists(os.path.join(str(tmp_path), "node1"))


def trainer_killed(rank: int, world: int, base: str, root: str, node_local: bool, killed: int) -> str:
    node = _as_node(rank, base)
    save_dir = _dir(root, node, node_local)
    saver = asyncckpt.AsyncCheckpointer(_model(rank), None, config=_cfg(node_local))
    saver.save_checkpoint(save_dir, tag="before").result(WAIT_S)
    fut = saver.save_checkpoint(save_dir, tag="after")
    if rank == killed:
        os.kill(os.getpid(), signal.SIGKILL)  # right after save_checkpoint returned
    result = fut.result(WAIT_S)
    saver.close(timeout=WAIT_S)
    return result.tag


@pytest.mark.parametrize("node_local,killed", [(False, 0), (True, 2)])
def test_a_trainer_killed_after_its_save_returned_still_publishes(base, tmp_path, node_local, killed):
    """The killed trainer is rank 0's (its coordinator decides and publishes; its process hosts the job's store)
    or rank 2's (node 1's publisher with node-local storage)."""
    results = run_ranks(trainer_killed, WORLD, str(tmp_path), base, str(tmp_path), node_local, killed, timeout=100,
                        ctx=forkserver_context())
    assert results[killed].exitcode == -signal.SIGKILL
    for r in results:
        assert r.rank == killed or (r.ok and r.value == "after"), (r.rank, r.error)
    for node in range(WORLD // PER_NODE) if node_local else [0]:
        save_dir = _dir(str(tmp_path), node, node_local)
        assert _latest(save_dir) == "after"
        assert sorted(list_tags(save_dir)) == ["after", "before"]


MISSING = 3  # never hands its part of "after" over (alive, stuck elsewhere)


def missing_part(rank: int, world: int, base: str, root: str, node_local: bool, how: str) -> str:
    node = _as_node(rank, base)
    save_dir = _dir(root, node, node_local)
    saver = asyncckpt.AsyncCheckpointer(_model(rank), None, config=_cfg(node_local))
    saver.save_checkpoint(save_dir, tag="before").result(WAIT_S)
    if rank == MISSING and how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == MISSING:
        time.sleep(3600)  # killed by run_ranks once the others are done
    err = saver.save_checkpoint(save_dir, tag="after").exception(timeout=WAIT_S)
    assert isinstance(err, asyncckpt.CommitError), repr(err)
    assert _latest(save_dir) == "before"
    try:
        saver.close(timeout=WAIT_S)
    except asyncckpt.CheckpointError:
        pass
    return str(err)


@pytest.mark.parametrize("node_local,how", [(False, "stuck"), (True, "stuck"), (True, "killed")])
def test_a_missing_part_publishes_nothing_and_fails_every_other_rank(base, tmp_path, node_local, how):
    """Rank 3 (node 1) does not hand its part of "after" over: its process is stuck elsewhere (the others fail
    after commit_timeout_s), or it was killed before (they fail as soon as its service saw it go)."""
    results = run_ranks(missing_part, WORLD, str(tmp_path), base, str(tmp_path), node_local, how, timeout=100,
                        ctx=forkserver_context(), hung=MISSING)
    why = (f"did not hand over their part within {TIMEOUT_S}s" if how == "stuck" else
           "detached from the writer service without handing over their part of this save")
    for r in results:
        if r.rank == MISSING:
            continue
        assert r.ok, (r.rank, r.error)
        assert f"rank(s) [{MISSING}] {why}" in r.value, (r.rank, r.value)
    for node in range(WORLD // PER_NODE) if node_local else [0]:
        save_dir = _dir(str(tmp_path), node, node_local)
        assert list_tags(save_dir) == ["before"]
        assert _latest(save_dir) == "before"


def service_killed(rank: int, world: int, base: str, root: str, node_local: bool) -> dict:
    node = _as_node(rank, base, {PAUSE_ENV: "write:t1"} if rank // PER_NODE == 1 else {})  # node 1's service pauses
    save_dir = _dir(root, node, node_local)
    saver = asyncckpt.AsyncCheckpointer(_model(rank), None, config=_cfg(node_local))
    saver.save_checkpoint(save_dir, tag="t0").result(WAIT_S)
    fut = saver.save_checkpoint(save_dir, tag="t1")
    if rank == 2:  # kill node 1's service while it writes t1
        pattern = os.path.join(base, "node1", "paused-write-*")
        deadline = time.monotonic() + WAIT_S
        while not glob.glob(pattern):
            assert time.monotonic() < deadline, "node 1's service never paused"
            time.sleep(0.05)
        os.kill(int(glob.glob(pattern)[0].rsplit("-", 1)[1]), signal.SIGKILL)
    err = fut.exception(timeout=WAIT_S)
    assert isinstance(err, asyncckpt.CommitError), repr(err)
    latest_after_failure = _latest(save_dir)
    for attempt in range(2):
        fut = saver.save_checkpoint(save_dir, tag="t2")
        if fut.exception(timeout=WAIT_S) is None:
            break
    result = fut.result(0)
    saver.close(timeout=WAIT_S)
    return {"error": str(err), "latest": latest_after_failure, "tag": result.tag, "attempts": attempt + 1}


@pytest.mark.parametrize("node_local", [False, True])
def test_a_killed_node_service_fails_every_pending_save_and_the_next_save_works(base, tmp_path, node_local):
    out = assert_all_ok(run_ranks(service_killed, WORLD, str(tmp_path), base, str(tmp_path), node_local,
                                  timeout=110, ctx=forkserver_context()))
    for rank, o in enumerate(out):
        assert o["latest"] == "t0", (rank, o)  # the previous checkpoint stayed the latest
        assert o["tag"] == "t2" and o["attempts"] == 1, (rank, o)
        if rank // PER_NODE == 1:
            assert "writer service" in o["error"] and "ended before it reported the save" in o["error"], o["error"]
        else:
            assert "writer services' group of the job's nodes failed" in o["error"], o["error"]
    for node in range(WORLD // PER_NODE) if node_local else [0]:
        save_dir = _dir(str(tmp_path), node, node_local)
        assert _latest(save_dir) == "t2"
        assert sorted(list_tags(save_dir)) == ["t0", "t2"]


def service_killed_idle(rank: int, world: int, base: str, root: str) -> list[str]:
    import torch.distributed as dist

    node = _as_node(rank, base)
    save_dir = _dir(root, node, False)
    saver = asyncckpt.AsyncCheckpointer(_model(rank), None, config=_cfg(False))
    saver.save_checkpoint(save_dir, tag="t0").result(WAIT_S)
    dist.barrier()
    if rank == 2:
        os.kill(saver.engine.service.service_pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while node == 1 and saver.engine.service.service_pid is not None:  # node 1's ranks saw their service end
        assert time.monotonic() < deadline, "the service's end went unnoticed"
        time.sleep(0.01)
    dist.barrier()
    errors = [saver.save_checkpoint(save_dir, tag=f"t{i}").exception(timeout=WAIT_S) for i in (1, 2)]
    saver.close(timeout=WAIT_S)
    return [str(e) if e is not None else "" for e in errors]


def test_a_node_service_killed_between_saves_fails_the_next_save_and_the_one_after_works(base, tmp_path):
    """Node 1's ranks start a new service and form a new group on save t1, while node 0's service learns of the
    death only in t1's first round over the old group: t1 fails on every rank, and node 1's service gives its
    group for t1 up as soon as node 0's forms one for t2, where both meet."""
    out = assert_all_ok(run_ranks(service_killed_idle, WORLD, str(tmp_path), base, str(tmp_path), timeout=110,
                                  ctx=forkserver_context()))
    for rank, (t1, t2) in enumerate(out):
        assert t1 and not t2, (rank, t1, t2)
        assert ("writer services' group of the job's nodes failed" if rank < PER_NODE else "gave save 1 up") in t1, t1
    save_dir = _dir(str(tmp_path), 0, False)
    assert _latest(save_dir) == "t2"
    assert sorted(list_tags(save_dir)) == ["t0", "t2"]
