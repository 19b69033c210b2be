"""The Lightning plugin under ``strategy="ddp"`` with 2 gloo ranks started by run_ranks (Lightning does not
launch them: LOCAL_RANK is set, so it joins the process group they already have).

Two jobs: ``crash`` trains with ModelCheckpoint(save_last=True) and rank 0 (the only rank Lightning hands
checkpoints to) SIGKILLs itself during the background write of the second ``last.ckpt``; rank 1 is killed
with it. ``reference_and_resume``, in fresh processes, runs the uninterrupted reference and resumes the crashed
run with ``ckpt_path="last"``, which must find the previous ``last.ckpt`` (step 2) and continue bit for bit."""
from __future__ import annotations

import os
import signal

import pytest
import torch

pytest.importorskip("lightning")

from dist_helpers import assert_all_ok, run_ranks  # noqa: E402
from test_integration_lightning import Tiny, hidden, make_trainer, snapshot, visible  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(600)]

WORLD = 2
CONFIG = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 1, "nice": 0, "fsync": False}}
ENV = {"OMP_NUM_THREADS": "1"}
NAMES = [f"epoch={e}-step={s}.ckpt" for e, s in ((0, 2), (1, 4), (2, 6), (3, 8))]  # 2 batches per rank and epoch


def _fit(d: str, seed: int, ckpt_path: str | None = None):
    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    trainer = make_trainer(AsyncCheckpointIO(CONFIG), d, 8, save_top_k=-1, strategy="ddp", devices=WORLD)
    model = Tiny(seed)
    trainer.fit(model, ckpt_path=ckpt_path)
    trainer.strategy.barrier()  # rank 0 drained its saves in teardown; the other ranks wait for it here
    return trainer, model


def crash(rank: int, world: int, root: str) -> None:
    import asyncckpt
    import asyncckpt.writer

    d = os.path.join(root, "crash")
    real = asyncckpt.writer.WriterPool.write_rank
    writes = []

    async def write_rank(pool, **kwargs):
        files = await real(pool, **kwargs)
        if os.path.basename(kwargs["directory"]) == ".last.ckpt.partial":
            writes.append(kwargs["directory"])
            if len(writes) == 2:  # this rank's data files are written; the manifest and the rename never come
                record = {"listing": sorted(os.listdir(d)), "latest": open(os.path.join(d, "latest")).read(),
                          "last_step": asyncckpt.load(d, "last.ckpt")["global_step"]}
                torch.save(record, os.path.join(root, "crash_rank0.pt"))
                os.kill(os.getpid(), signal.SIGKILL)
        return files

    if rank == 0:
        asyncckpt.writer.WriterPool.write_rank = write_rank
    _fit(d, seed=0)
    raise AssertionError("rank 0 finished training without dying")


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
    crashed = run_ranks(crash, WORLD, str(tmp_path_factory.mktemp("crash_out")), root, timeout=200, env=ENV, hung=1)
    resumed = assert_all_ok(run_ranks(reference_and_resume, WORLD, str(tmp_path_factory.mktemp("resume_out")), root,
                                      timeout=300, env=ENV))
    return root, crashed, resumed


def test_ddp_two_ranks_sigkill_during_last_write_resumes_previous_last(runs):
    """Rank 0 died while writing the last.ckpt of step 4: at that moment last.ckpt (published, step 2) was
    untouched and the new one only a hidden partial directory. ckpt_path="last" in fresh processes loaded
    step 2 on both ranks and the run ended identical to the uninterrupted one (weights, optimizer, scheduler,
    step, each rank's losses after step 2); the crash's partial directory was removed by the next save."""
    root, crashed, resumed = runs
    assert crashed[0].exitcode == -signal.SIGKILL, (crashed[0].exitcode, crashed[0].error)
    at_kill = torch.load(os.path.join(root, "crash_rank0.pt"), weights_only=False)
    assert at_kill["last_step"] == 2 and at_kill["latest"].strip() == NAMES[1]
    assert ".last.ckpt.partial" in at_kill["listing"] and "last.ckpt" in at_kill["listing"]
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
