"""The Hugging Face Trainer integration against the real transformers Trainer (tiny GPT-2 from a config, CPU)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.integrations.transformers import AsyncTrainer  # noqa: E402
from storage_faults import faults_fixture  # noqa: E402,F401 - the `faults` fixture


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):
    """Stops training after ``step`` optimizer steps (a run that is interrupted, after its save at that step)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def make_trainer(out, fast_config, seed=0, callbacks=(), config=None, **args):
    kw = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, save_steps=2, save_total_limit=2,
              logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2)
    kw.update(args)
    return AsyncTrainer(model=model(seed), args=TrainingArguments(**kw), train_dataset=Tokens(),
                        callbacks=list(callbacks), asyncckpt_config=fast_config(**(config or {})))


def losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def listing(out):
    return sorted(os.listdir(out))


def test_save_total_limit_and_exact_resume(tmp_path, fast_config):
    """Checkpoints are checkpoint-N/ directories (trainer_state.json + asyncckpt/); save_total_limit=2 keeps
    the newest two; an interrupted run resumed with resume_from_checkpoint=True from a model with other initial
    weights has the same loss curve and ends with bit-identical weights as an uninterrupted run."""
    ref = make_trainer(tmp_path / "ref", fast_config)
    ref.train()
    assert listing(tmp_path / "ref") == ["checkpoint-6", "checkpoint-8"]
    assert ref._ack_flatten_cache.replays >= 2  # the saves after the first matched the state, not walked it
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoint-8")) == ["asyncckpt", "trainer_state.json"]

    out = tmp_path / "run"
    first = make_trainer(out, fast_config, callbacks=[StopAt(4)])
    first.train()
    assert listing(out) == ["checkpoint-2", "checkpoint-4"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    second = make_trainer(out, fast_config, seed=99)
    second.train(resume_from_checkpoint=True)
    assert len(losses(ref)) == 8 and losses(second) == losses(ref)  # steps 1-4 from trainer_state.json
    assert second.state.global_step == 8
    ref_state, state = ref.model.state_dict(), second.model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert listing(out) == ["checkpoint-6", "checkpoint-8"]


def test_checkpoint_appears_only_when_durable(tmp_path, fast_config, faults):
    """_save_checkpoint returns while the writer is held: checkpoint-N does not exist yet, so
    get_last_checkpoint still names the previous, complete one; at the end of train() everything is drained."""
    out = tmp_path / "gated"
    gate = faults.gate("open_write", str(out))  # every save's data files (in the writer threads or the service)
    seen = []

    class Check(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                seen.append((gate.entered.wait(30), os.path.exists(os.path.join(args.output_dir, "checkpoint-4")),
                             get_last_checkpoint(args.output_dir)))
                gate.open()
            return control

    trainer = make_trainer(out, fast_config, callbacks=[Check()], max_steps=4, config={"max_inflight": 2})
    try:
        trainer.train()  # checkpoint-2 is held too; the gate opens at checkpoint-4's on_save
    finally:
        gate.open()
    assert seen == [(True, False, None)]  # neither checkpoint-2 nor checkpoint-4 was complete when save returned
    assert listing(out) == ["checkpoint-2", "checkpoint-4"]


def test_failed_save_surfaces_and_previous_stays(tmp_path, fast_config, faults):
    """A background write failure (a full disk while writing checkpoint-4) is raised out of train(); the failed
    checkpoint never appears (not even as a hidden leftover) and get_last_checkpoint names the previous one,
    which still loads."""
    out = tmp_path / "fail"
    faults.fail("open_write", str(out / ".checkpoint-4.incomplete"), OSError(28, "No space left on device"))
    trainer = make_trainer(out, fast_config)
    with pytest.raises(asyncckpt.WriteError, match="No space left"):
        trainer.train()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert not any(n.startswith(".") for n in os.listdir(out))
    state = asyncckpt.load(str(out / "checkpoint-2"), "asyncckpt")
    assert {"model", "optimizer", "lr_scheduler", "rng"} <= set(state)


def test_keep_last_is_refused(tmp_path):
    with pytest.raises(asyncckpt.ConfigError, match="save_total_limit"):
        AsyncTrainer(model=model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                     asyncckpt_config={"keep_last": 3})
