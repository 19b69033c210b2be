"""The Hugging Face Trainer integration on 2 gloo ranks: DDP through the Trainer's own torch.distributed support
(``TrainingArguments(use_cpu=True, ddp_backend="gloo")``, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from run_ranks).

One module fixture runs two jobs of 2 ranks each (the rank functions below, importable by the children, which
a forkserver with torch and asyncckpt imported starts: tests/dist_helpers.py):

* ``crash``: the process writing rank 1's saves is SIGKILLed during the background write of checkpoint-4, once
  both ranks' data files are written: rank 1 itself in thread mode, the node's writer service in service mode.
* ``reference_and_resumes``, in fresh processes: ``reference_and_resume``, an uninterrupted 8-step run; a run
  stopped after its save at step 4, whose rank 1 holds its background write of checkpoint-4 until rank 0 has
  looked at the directory; a run resumed from it with ``resume_from_checkpoint=True``, from a model with other
  initial weights. Then ``resume_after_crash``: these processes resume the crashed run.

Faults are storage rules (tests/storage_faults.py): each rank makes its own, which apply to its own files, in its
writer threads or in the writer service alike.

Each rank draws its own torch RNG stream (dropout masks differ per rank), so a resumed run matches the
reference only if every rank gets its own RNG state back."""
from __future__ import annotations

import hashlib
import os
import signal
import threading

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
from transformers import TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import asyncckpt  # noqa: E402
from dist_helpers import assert_all_ok, forkserver_context, run_ranks  # noqa: E402
from test_integration_transformers import StopAt, Tokens, losses, model  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(900)]

WORLD = 2
CONFIG = {"codec": {"chunk_mib": 1 / 64}, "writer": {"threads_per_node": 1, "nice": 0, "fsync": False},
          "commit_timeout_s": 30}
SERVICE = asyncckpt.Config.from_dict(CONFIG).writer.mode == "service"  # ASYNCCKPT_WRITER_MODE, as the ranks see it
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ rank side
def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class PerRank(TrainerCallback):
    """Seeds this rank's torch RNG with its own seed when training begins (a resumed run then gets the
    checkpoint's state back), and records the RNG state after every step."""

    def __init__(self, rank: int):
        self.rank = rank
        self.rng: dict[int, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        torch.manual_seed(1000 + self.rank)

    def on_step_end(self, args, state, control, **kwargs):
        self.rng[state.global_step] = _digest(torch.get_rng_state())


def _index(out: str, step: int, rank: int) -> str:
    """The index file a rank writes once its data files of checkpoint-``step`` are written."""
    return os.path.join(out, f".checkpoint-{step}.incomplete", ".asyncckpt.partial", f"rank{rank:05d}.json")


def _trainer(out: str, rank: int, seed: int = 0, callbacks=(), **over):
    from asyncckpt.integrations.transformers import AsyncTrainer

    kw = dict(output_dir=out, max_steps=8, per_device_train_batch_size=4, save_steps=2, save_total_limit=2,
              logging_steps=1, report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True,
              learning_rate=1e-2, dataloader_num_workers=0)
    kw.update(over)
    per_rank = PerRank(rank)
    trainer = AsyncTrainer(model=model(seed), args=TrainingArguments(**kw), train_dataset=Tokens(),
                           callbacks=[per_rank, *callbacks], asyncckpt_config=CONFIG)
    return trainer, per_rank


def _visible(out: str) -> list[str]:
    return sorted(os.listdir(out))


def _outcome(trainer, per_rank) -> dict:
    return {"losses": losses(trainer), "rng": per_rank.rng, "step": trainer.state.global_step,
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "listing": _visible(trainer.args.output_dir)}


def reference_and_resume(rank: int, world: int, root: str) -> dict:
    import storage_faults
    import torch.distributed as dist

    signal_group = dist.new_group(backend="gloo")  # the test's own rendezvous, apart from training's
    out: dict = {}

    # 1. Uninterrupted. Rank 0 renames checkpoint-8 only after a pause: every rank must still see it on return.
    ref, per_rank = _trainer(os.path.join(root, "ref"), rank)
    if rank == 0:
        finalize = ref._ack_finalize

        def late_finalize(finished, staging, final, *args):
            if final.endswith("checkpoint-8"):
                finished.wait(60)
                threading.Event().wait(2.0)  # rank 1 returning now would find no checkpoint-8
            return finalize(finished, staging, final, *args)

        ref._ack_finalize = late_finalize
    ref.train()
    out["ref"] = _outcome(ref, per_rank)
    out["ref"]["hidden"] = [n for n in out["ref"]["listing"] if n.startswith(".")]

    # 2. Stopped after the save at step 4; rank 1's data files of checkpoint-4 are held until rank 0 looked, once
    #    rank 0's are written (rank 0 holds its index file until then).
    run = os.path.join(root, "run")
    seen: dict = {}

    class Look(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                first.wait_for_checkpoints(60)
                seen["after_wait"] = _visible(run)
            elif state.global_step == 4:
                seen["returned_pending"] = first._ack_engine.in_flight() > 0
                seen["held"] = gate.entered.wait(60)
                if rank == 0:
                    seen["listing"] = _visible(run)
                    seen["last"] = get_last_checkpoint(run)
                dist.barrier(group=signal_group)
                gate.open()
            return control

    with storage_faults.injected() as faults:
        if rank == 1:
            gate = faults.gate("open_write", os.path.join(run, ".checkpoint-4.incomplete", ""))
        else:
            gate = faults.gate("write_durable", _index(run, 4, rank))
        first, per_rank = _trainer(run, rank, callbacks=[StopAt(4), Look()])
        try:
            first.train()
        finally:
            gate.open()
    out["first"] = {**_outcome(first, per_rank), "seen": seen}

    # 3. Resumed from checkpoint-4, with other initial weights.
    second, per_rank = _trainer(run, rank, seed=99)
    second.train(resume_from_checkpoint=True)
    out["resumed"] = _outcome(second, per_rank)
    return out


def crash(rank: int, world: int, root: str) -> dict:
    """The process writing rank 1's saves dies during its background write of checkpoint-4, once both ranks'
    data files are written (each rank holds its index file until then): in thread mode rank 1 (rank 0 is left
    waiting for its vote), in service mode the writer service (both ranks' saves fail). A rank that lives reports
    what its train() raised."""
    import storage_faults
    import torch.distributed as dist

    signal_group = dist.new_group(backend="gloo")
    out = os.path.join(root, "crash")

    with storage_faults.injected() as faults:
        written = faults.gate("write_durable", _index(out, 4, rank))  # this rank's data files are written
        if rank == 1:
            storage_faults.killed(faults, "write_durable", _index(out, 4, rank))  # once the gate let it through

        def both_written() -> None:
            if written.entered.wait(120):
                dist.barrier(group=signal_group)
                written.open()

        threading.Thread(target=both_written, name="test-both-written", daemon=True).start()
        trainer, _ = _trainer(out, rank, callbacks=[StopAt(4)])
        try:
            trainer.train()
        except Exception as exc:  # noqa: BLE001 - the commit (CommitError) or a collective of training saw rank 1 die
            return {"error": type(exc).__name__, "checkpoint_error": isinstance(exc, asyncckpt.CheckpointError),
                    "message": str(exc), "listing": _visible(out)}
        finally:
            written.open()
    return {"error": None, "listing": _visible(out)}


def resume_after_crash(rank: int, world: int, root: str) -> dict:
    out = os.path.join(root, "crash")
    last = get_last_checkpoint(out)
    before = _visible(out)
    trainer, per_rank = _trainer(out, rank, seed=99)
    trainer.train(resume_from_checkpoint=True)
    return {"last": last, "before": before, **_outcome(trainer, per_rank)}


def reference_and_resumes(rank: int, world: int, root: str) -> dict:
    return {"main": reference_and_resume(rank, world, root), "resumed": resume_after_crash(rank, world, root)}


# ------------------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_ddp"))
    ctx = forkserver_context()
    crashed = run_ranks(crash, WORLD, str(tmp_path_factory.mktemp("crash_out")), root, timeout=200, env=ENV,
                        ctx=ctx)
    both = assert_all_ok(run_ranks(reference_and_resumes, WORLD, str(tmp_path_factory.mktemp("main_out")), root,
                                   timeout=700, env=ENV, ctx=ctx))
    return root, [b["main"] for b in both], crashed, [b["resumed"] for b in both]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_both_ranks_train_and_keep_save_total_limit(runs):
    """The uninterrupted run on 2 ranks: save_total_limit=2 keeps checkpoint-6 and -8 with nothing hidden
    left over, and every rank sees checkpoint-8 when train() returns (even when rank 0 renames it late)."""
    _, main, _, _ = runs
    for rank in range(WORLD):
        ref = main[rank]["ref"]
        assert ref["listing"] == ["checkpoint-6", "checkpoint-8"] and ref["hidden"] == []
        assert ref["step"] == 8 and len(ref["losses"]) == 8
    assert _same_weights(main[0]["ref"]["weights"], main[1]["ref"]["weights"])  # DDP kept them in step
    assert main[0]["ref"]["rng"][8] != main[1]["ref"]["rng"][8]  # each rank has its own RNG stream


def test_checkpoint_published_only_when_both_ranks_wrote(runs):
    """_save_checkpoint returned on both ranks while the save was in flight; with rank 0's data written and
    rank 1's write held, checkpoint-4 did not exist and get_last_checkpoint named checkpoint-2; once rank 1
    wrote, checkpoint-4 appeared with both ranks' data."""
    root, main, _, _ = runs
    for rank in range(WORLD):
        seen = main[rank]["first"]["seen"]
        assert seen["after_wait"] == ["checkpoint-2"]
        assert seen["returned_pending"]
    assert main[1]["first"]["seen"]["held"]  # rank 1's write was held at the gate
    seen = main[0]["first"]["seen"]
    assert seen["held"]  # rank 0's data files were written
    assert [n for n in seen["listing"] if not n.startswith(".")] == ["checkpoint-2"]
    assert seen["last"] == os.path.join(root, "run", "checkpoint-2")
    assert main[0]["first"]["listing"] == ["checkpoint-2", "checkpoint-4"]


def test_resume_is_exact_on_two_ranks(runs):
    """resume_from_checkpoint=True from checkpoint-4 on 2 ranks, starting from other weights: the same losses,
    the same RNG state on each rank after every step, and bit-identical weights as the uninterrupted run."""
    _, main, _, _ = runs
    for rank in range(WORLD):
        ref, resumed = main[rank]["ref"], main[rank]["resumed"]
        assert resumed["losses"] == ref["losses"]
        assert {s: resumed["rng"][s] for s in range(5, 9)} == {s: ref["rng"][s] for s in range(5, 9)}
        assert _same_weights(resumed["weights"], ref["weights"])
        assert resumed["listing"] == ["checkpoint-6", "checkpoint-8"]


def test_sigkill_of_one_rank_during_write_resumes_previous(runs):
    """The writer of rank 1's saves died during the background write of checkpoint-4 with both ranks' data
    written: in thread mode rank 1 itself, and rank 0's train() raised a CheckpointError; in service mode the
    writer service, and both ranks' train() raised a CommitError (the service ended before it reported the
    save). checkpoint-4 never appeared, fresh processes resumed from checkpoint-2 and ended identical to the
    uninterrupted run."""
    root, main, crashed, resumed = runs
    out = os.path.join(root, "crash")
    if SERVICE:
        for r in crashed:
            assert r.ok and r.value["error"] == "CommitError", (r.value, r.error)
            assert "the writer service" in r.value["message"] and "ended before it reported" in r.value["message"]
    else:
        assert crashed[1].exitcode == -signal.SIGKILL, (crashed[1].exitcode, crashed[1].error)
    assert crashed[0].ok, crashed[0].error
    assert crashed[0].value["checkpoint_error"], crashed[0].value
    assert [n for n in crashed[0].value["listing"] if not n.startswith(".")] == ["checkpoint-2"]
    for rank in range(WORLD):
        got, ref = resumed[rank], main[rank]["ref"]
        assert got["last"] == os.path.join(out, "checkpoint-2")
        assert got["losses"] == ref["losses"]
        assert {s: got["rng"][s] for s in range(3, 9)} == {s: ref["rng"][s] for s in range(3, 9)}
        assert _same_weights(got["weights"], ref["weights"])
        assert got["listing"] == ["checkpoint-6", "checkpoint-8"]
