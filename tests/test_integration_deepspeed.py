"""asyncckpt.integrations.deepspeed against a real DeepSpeed engine: 2 gloo ranks on CPU, ZeRO stages 0-3.

One module fixture runs two jobs (tests/deepspeed_workers.py): the first trains, saves through the asyncckpt
engine, records the reference and SIGKILLs itself while a gated background write holds a second save before
its commit; the second, in fresh processes, resumes every case with DeepSpeed's own ``load_checkpoint``."""
import os
import signal

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_workers as W  # noqa: E402
from dist_helpers import assert_all_ok, run_ranks  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.integrations.deepspeed import STUB_MARK, load_file  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("deepspeed"))
    first = run_ranks(W.save_run, WORLD, str(tmp_path_factory.mktemp("save_out")), root, timeout=240)
    for r in first:  # each rank kills itself once its gated save returned: nothing else may end it
        assert r.exitcode == -signal.SIGKILL and r.error is None, f"rank {r.rank} exit={r.exitcode}:\n{r.error}"
    saved = [torch.load(os.path.join(root, f"save_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    crash = [torch.load(os.path.join(root, f"crash_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    resumed = assert_all_ok(run_ranks(W.resume_run, WORLD, str(tmp_path_factory.mktemp("resume_out")), root,
                                      timeout=240))
    return root, saved, crash, resumed


def _assert_same_params(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def _deepspeed_files(stage: int) -> set[str]:
    if stage == 0:
        return {"mp_rank_00_model_states.pt"}
    optim = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)}
    if stage == 3:
        return optim | {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(WORLD)}
    return optim | {"mp_rank_00_model_states.pt"}


@pytest.mark.parametrize("stage", W.STAGES)
def test_deepspeed_load_checkpoint_resumes_bit_exactly(runs, stage):
    root, saved, _, resumed = runs
    for rank in range(WORLD):
        want, got = saved[rank][stage], resumed[rank][stage]
        assert "error" not in got, got.get("error")
        assert os.path.dirname(got["path"]) == os.path.join(root, f"stage{stage}", "s2")
        assert got["client_state"]["epoch"] == 7 and got["client_state"]["note"] == "async"
        assert got["global_steps"] == W.SAVE_STEP
        _assert_same_params(got["params"], want["params"])
        assert got["losses"] == want["losses"]  # model, ZeRO partitions and Adam moments all restored


@pytest.mark.parametrize("stage", W.STAGES)
def test_every_deepspeed_file_is_an_entry_of_one_commit(runs, stage):
    """One asyncckpt checkpoint per tag holds every rank's files; DeepSpeed's names are stubs written
    before `latest`, which asyncckpt replaced (with the newline DeepSpeed's own write lacks)."""
    root, saved, _, _ = runs
    d = os.path.join(root, f"stage{stage}")
    names = _deepspeed_files(stage)
    assert names <= set(saved[0][stage]["files"])
    assert saved[0][stage]["latest"] == "s2\n"
    reader = asyncckpt.CheckpointReader(d, "s2")
    assert reader.world_size == WORLD and sorted(reader.indices) == [0, 1]
    reader.verify()  # the stubs next to the checkpoint files do not disturb it
    entries = {name for doc in reader.indices.values() for name in doc["skeleton"]}
    assert entries == names
    for name in names:
        with open(os.path.join(d, "s2", name), "rb") as f:
            assert f.read().startswith(STUB_MARK)
        assert isinstance(load_file(os.path.join(d, "s2", name), map_location="cpu"), dict)


def test_tag_written_by_deepspeeds_default_engine_still_loads(runs):
    _, saved, _, resumed = runs
    for rank in range(WORLD):
        assert "error" not in resumed[rank][1], resumed[rank][1].get("error")
        _assert_same_params(resumed[rank][1]["torch_engine_params"], saved[rank][1]["params"])


def test_unwrapped_save_checkpoint_commits_before_deepspeed_writes_latest(runs):
    _, saved, _, _ = runs
    for rank in range(WORLD):
        assert saved[rank][0]["unwrapped_durable"]
    assert saved[0][0]["unwrapped_latest"] == "raw"  # DeepSpeed's own write, after the durable commit


def test_save_16bit_model_is_a_plain_torch_file(runs):
    _, saved, _, _ = runs
    model16 = saved[0][0]["model16"]
    assert set(model16) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(isinstance(t, torch.Tensor) for t in model16.values())


def test_sigkill_before_commit_resumes_previous_tag(runs):
    """save_checkpoint returned while the write was still gated; the kill landed before the commit; DeepSpeed's
    loader in fresh processes follows `latest` to the previous tag and continues bit for bit."""
    root, _, crash, resumed = runs
    d = os.path.join(root, "crash")
    for rank in range(WORLD):
        assert crash[rank]["pending_after_return"]
        assert crash[rank]["latest_before_kill"] == "A\n"
        assert ".B.partial" in crash[rank]["entries_before_kill"] and "B" not in crash[rank]["entries_before_kill"]
        got = resumed[rank]["crash"]
        assert "error" not in got, got.get("error")
        assert got["latest"] == "A\n" and got["tags"] == ["A"] and "B" not in got["entries"]
        assert os.path.dirname(got["path"]) == os.path.join(d, "A")
        assert got["losses"] == crash[rank]["losses"]
