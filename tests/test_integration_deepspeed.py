"""asyncckpt.integrations.deepspeed against a real DeepSpeed engine: 2 gloo ranks on CPU, ZeRO stages 0-3.

One module fixture runs two jobs (tests/deepspeed_workers.py): the first trains, saves through the asyncckpt
engine, records the reference and crashes while a storage gate holds a second save at its commit marker (every
rank's files written): the ranks SIGKILL themselves, or in service mode the writer service dies there (a rank
killed after handing a save over would not lose it: the service publishes it); the second, in fresh processes,
resumes every case with DeepSpeed's own ``load_checkpoint``."""
import os
import signal

import pytest
import torch

pytest.importorskip("deepspeed")

import deepspeed_workers as W  # noqa: E402
from dist_helpers import assert_all_ok, forkserver_context, run_ranks  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.format import MANIFEST, rank_index_name  # noqa: E402
from asyncckpt.integrations.deepspeed import STUB_MARK, load_file  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # the module fixture's two 2-rank jobs take minutes on a loaded machine

WORLD = 2
SERVICE = asyncckpt.Config.coerce(W.CONFIG).writer.mode == "service"  # ASYNCCKPT_WRITER_MODE=service


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("deepspeed"))
    ctx = forkserver_context()  # the ranks start with torch and asyncckpt imported
    first = run_ranks(W.save_run, WORLD, str(tmp_path_factory.mktemp("save_out")), root, timeout=240, ctx=ctx)
    # thread mode: each rank kills itself once its held save returned; service mode: each rank's save failed
    # because the writer service died at the held commit, and the rank exits with SERVICE_DIED. Nothing else.
    crashed = W.SERVICE_DIED if SERVICE else -signal.SIGKILL
    for r in first:
        assert r.exitcode == crashed and r.error is None, f"rank {r.rank} exit={r.exitcode}:\n{r.error}"
    saved = [torch.load(os.path.join(root, f"save_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    crash = [torch.load(os.path.join(root, f"crash_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    resumed = assert_all_ok(run_ranks(W.resume_run, WORLD, str(tmp_path_factory.mktemp("resume_out")), root,
                                      timeout=240, ctx=ctx))
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
    """save_checkpoint returned while the save was pending; every rank's files were written and the commit
    marker was not; the process performing the commit (the ranks, or the writer service: its death failed both
    ranks' saves with a CommitError naming it) was SIGKILLed there; DeepSpeed's loader in fresh processes follows
    `latest` to the previous tag and continues bit for bit."""
    root, _, crash, resumed = runs
    d = os.path.join(root, "crash")
    for rank in range(WORLD):
        assert crash[rank]["pending_after_return"]
        assert crash[rank]["latest_before_kill"] == "A\n"
        assert ".B.partial" in crash[rank]["entries_before_kill"] and "B" not in crash[rank]["entries_before_kill"]
        partial = crash[rank]["partial_before_kill"]
        assert all(rank_index_name(r) in partial for r in range(WORLD)) and MANIFEST not in partial, partial
        if SERVICE:
            assert "checkpoint 'B': the writer service" in crash[rank]["error"], crash[rank]["error"]
        else:
            assert "error" not in crash[rank]
        got = resumed[rank]["crash"]
        assert "error" not in got, got.get("error")
        assert got["latest"] == "A\n" and got["tags"] == ["A"] and "B" not in got["entries"]
        assert os.path.dirname(got["path"]) == os.path.join(d, "A")
        assert got["losses"] == crash[rank]["losses"]


# ------------------------------------------------------------------- the engine alone, in this process
def _info(save_dir, tag, save_latest=False):
    from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo

    return CheckpointCommitInfo(tag=tag, save_dir=save_dir, save_latest=save_latest)


@pytest.fixture
def engine():
    from asyncckpt.integrations.deepspeed import AsyncCheckpointEngine

    eng = AsyncCheckpointEngine({"writer": {"threads_per_node": 1}})
    yield eng
    eng.close()


def test_files_of_a_tag_become_entries_of_one_checkpoint(engine, tmp_path):
    """The calls DeepSpeed makes, in its order: the tag directory is left to the commit's rename, each file is
    an entry (Python objects such as DeepSpeed's records are pickled), a file outside the tag is a plain
    torch.save written at once, and `latest` is not touched when DeepSpeed was asked not to write it."""
    import collections

    from deepspeed.utils.tensor_fragment import fragment_address

    d = str(tmp_path / "ckpts")
    engine.makedirs(d, exist_ok=True)
    info = _info(d, "t1")
    engine.create(info)
    engine.makedirs(os.path.join(d, "t1"), exist_ok=True)
    assert os.listdir(d) == []
    model = {"module": collections.OrderedDict(w=torch.arange(6.0).view(2, 3)), "global_steps": 3,
             "slices": {"w": fragment_address(numel=6, start=0)}}
    optim = {"optimizer_state_dict": {"fp32": [torch.ones(3)]}}
    engine.save(model, os.path.join(d, "t1", "mp_rank_00_model_states.pt"))
    engine.save(optim, os.path.join(d, "t1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    engine.save({"w": torch.ones(2)}, os.path.join(d, "model16.bin"))
    assert torch.equal(torch.load(os.path.join(d, "model16.bin"), weights_only=True)["w"], torch.ones(2))
    engine.commit(info)
    (result,) = engine.wait(timeout=60)
    assert result.tag == "t1" and not os.path.exists(os.path.join(d, "latest"))
    got = engine.load(os.path.join(d, "t1", "mp_rank_00_model_states.pt"), map_location=lambda s, loc: s)
    assert type(got["module"]) is collections.OrderedDict and torch.equal(got["module"]["w"], model["module"]["w"])
    assert got["global_steps"] == 3 and got["slices"]["w"] == fragment_address(numel=6, start=0)
    assert torch.equal(engine.load(os.path.join(d, "t1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
                       ["optimizer_state_dict"]["fp32"][0], torch.ones(3))
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="mp_rank_00_model_states.pt"):
        engine.load(os.path.join(d, "t1", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "manifest.json", "rank00000.json",
                                  "rank00000-0.bin", ".hidden.pt"])
def test_an_entry_cannot_take_a_saved_name_or_a_checkpoint_file_name(engine, tmp_path, name):
    info = _info(str(tmp_path), "t1")
    engine.create(info)
    engine.save({"x": 1}, str(tmp_path / "t1" / "mp_rank_00_model_states.pt"))
    with pytest.raises(asyncckpt.KeyCollisionError, match=name):
        engine.save({"x": 2}, str(tmp_path / "t1" / name))


def test_commit_of_an_unwrapped_save_latest_returns_only_when_durable(engine, tmp_path):
    """DeepSpeed writes `latest` itself right after commit when save_latest reaches it: commit must block."""
    info = _info(str(tmp_path), "t1", save_latest=True)
    engine.create(info)
    engine.makedirs(str(tmp_path / "t1"), exist_ok=True)
    engine.save({"w": torch.zeros(4)}, str(tmp_path / "t1" / "mp_rank_00_model_states.pt"))
    engine.commit(info)
    assert engine.last_future.done() and engine.last_future.result().tag == "t1"
    with open(tmp_path / "t1" / "mp_rank_00_model_states.pt", "rb") as f:
        assert f.read().startswith(STUB_MARK)
