"""The Lightning plugin under ``strategy="ddp"`` with 2 gloo ranks started by run_ranks (Lightning does not
launch them: LOCAL_RANK is set, so it joins the process group they already have).

Two jobs: ``crash`` trains 4 steps with ModelCheckpoint(save_last=True) and the process writing rank 0's saves
(rank 0 is the only rank Lightning hands checkpoints to) is SIGKILLed during the background write of the second
and last ``last.ckpt``, its data written and its manifest not (:func:`storage_faults.killed`): in thread mode
that is rank 0 itself (rank 1 is killed with it), in service mode the node's writer service (rank 0's ``fit``
then raises the failure from its teardown; no later save could start a new service and publish in between). ``reference_and_resume``, in fresh processes, runs the uninterrupted reference and resumes
the crashed run with ``ckpt_path="last"``, which must find the previous ``last.ckpt`` (step 2) and continue bit
for bit."""
from __future__ import annotations

import os
import signal
import threading

import pytest

pytest.importorskip("lightning")

import asyncckpt  # noqa: E402
from dist_helpers import assert_all_ok, forkserver_context, run_ranks  # noqa: E402
from test_integration_lightning import Tiny, hidden, make_trainer, snapshot, visible  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(600)]

WORLD = 2
CONFIG = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 1, "nice": 0, "fsync": False}}
SERVICE = asyncckpt.Config.from_dict(CONFIG).writer.mode == "service"  # ASYNCCKPT_WRITER_MODE, as the ranks see it
ENV = {"OMP_NUM_THREADS": "1"}
NAMES = [f"epoch={e}-step={s}.ckpt" for e, s in ((0, 2), (1, 4), (2, 6), (3, 8))]  # 2 batches per rank and epoch


def _fit(d: str, seed: int, ckpt_path: str | None = None, max_steps: int = 8):
    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    trainer = make_trainer(AsyncCheckpointIO(CONFIG), d, max_steps, save_top_k=-1, strategy="ddp", devices=WORLD)
    model = Tiny(seed)
    trainer.fit(model, ckpt_path=ckpt_path)
    trainer.strategy.barrier()  # rank 0 drained its saves in teardown; the other ranks wait for it here
    return trainer, model


def crash(rank: int, world: int, root: str) -> dict:
    """4 steps; the process writing rank 0's saves dies at the manifest of the second last.ckpt, the run's last
    save (its data files are written); returns what fit raised, if rank 0 lives on. Rank 1 (whose fit fails in
    a collective rank 0 left, or waits in one) then waits to be SIGKILLed as run_ranks's ``hung`` rank: a result
    it wrote could be cut short by that kill."""
    import storage_faults

    d = os.path.join(root, "crash")
    with storage_faults.injected() as faults:
        if rank == 0:
            storage_faults.killed(faults, "write_durable", os.path.join(d, ".last.ckpt.partial", "manifest.json"),
                                  after=1)
        try:
            _fit(d, seed=0, max_steps=4)
        except Exception as exc:  # noqa: BLE001 - the failed save (or, on rank 1, a collective rank 0 left)
            if rank == 0:
                return {"error": type(exc).__name__, "message": str(exc)}
        if rank == 1:
            threading.Event().wait()
    raise AssertionError(f"rank {rank} finished training without its save failing")


def reference_and_resume(rank: int, world: int, root: str) -> dict:
    ref, ref_model = _fit(os.path.join(root, "ref"), seed=0)
    out = {"ref": snapshot(ref), "ref_losses": ref_model.losses, "ref_listing": visible(os.path.join(root, "ref"))}
    d = os.path.join(root, "crash")
    out["before"] = sorted(os.listdir(d))
    resumed, model = _fit(d, seed=5, ckpt_path="last")
    out.update(resumed=snapshot(resumed), losses=model.losses, listing=visible(d), hidden=hidden(d))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lightning_ddp"))
    ctx = forkserver_context()  # the ranks start with torch and asyncckpt imported
    crashed = run_ranks(crash, WORLD, str(tmp_path_factory.mktemp("crash_out")), root, timeout=200, env=ENV, hung=1,
                        ctx=ctx)
    d = os.path.join(root, "crash")  # as the crash left it: nothing wrote there since
    with open(os.path.join(d, "latest")) as f:
        at_crash = {"listing": sorted(os.listdir(d)), "latest": f.read().strip(),
                    "last_step": asyncckpt.load(d, "last.ckpt")["global_step"]}
    resumed = assert_all_ok(run_ranks(reference_and_resume, WORLD, str(tmp_path_factory.mktemp("resume_out")), root,
                                      timeout=300, env=ENV, ctx=ctx))
    return root, crashed, at_crash, resumed


def test_ddp_two_ranks_sigkill_during_last_write_resumes_previous_last(runs):
    """The writer of rank 0's saves was SIGKILLed at the manifest of step 4's last.ckpt: in thread mode rank 0
    itself; in service mode the writer service, and rank 0's fit raised a CommitError naming last.ckpt (the
    service ended before it reported the save). last.ckpt (published, step 2) was untouched and the new one only
    a hidden partial directory; `latest` names epoch=1-step=4.ckpt, published before it. ckpt_path="last" in
    fresh processes loaded step 2 on both ranks and the run ended identical to the uninterrupted one (weights,
    optimizer, scheduler, step, each rank's losses after step 2); the crash's partial directory was removed by
    the next save."""
    root, crashed, at_crash, resumed = runs
    if SERVICE:
        assert crashed[0].ok and crashed[0].value["error"] == "CommitError", (crashed[0].value, crashed[0].error)
        assert "checkpoint 'last.ckpt': the writer service" in crashed[0].value["message"]
        assert "ended before it reported the save" in crashed[0].value["message"]
    else:
        assert crashed[0].exitcode == -signal.SIGKILL, (crashed[0].exitcode, crashed[0].error)
    assert at_crash["last_step"] == 2 and at_crash["latest"] == NAMES[1]
    # the partial directory and its owner's lock file (docs/FORMAT.md), left by the killed writer
    assert at_crash["listing"] == sorted(NAMES[:2] + [".last.ckpt.partial", ".last.ckpt.partial.lock", "last.ckpt",
                                                      "latest"])
    for rank in range(WORLD):
        got = resumed[rank]
        assert got["ref_listing"] == NAMES + ["last.ckpt"]
        assert "last.ckpt" in got["before"] and NAMES[2] not in got["before"]
        assert got["resumed"]["global_step"] == 8
        assert_equal_state(got["resumed"], got["ref"])
        assert got["losses"] == got["ref_losses"][2:]
        # the crashed run had published epoch=1-step=4.ckpt: Lightning names its second save of step 4 -v1
        assert got["listing"] == sorted(NAMES + ["epoch=1-step=4-v1.ckpt", "last.ckpt"]) and got["hidden"] == []


def assert_equal_state(a, b):
    from test_integration_lightning import assert_same

    assert_same(a, b)
