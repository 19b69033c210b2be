"""Checkpoints written by earlier releases keep loading bit-exactly. tests/fixtures/v1/ holds checkpoints that
asyncckpt 0.1.0 wrote in format v1 (see tests/fixtures/v1/fixture_state.py); they are never regenerated."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

import asyncckpt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
sys.path.insert(0, FIXTURES)
import fixture_state  # noqa: E402


@pytest.fixture
def v1_dir(tmp_path):
    """A copy, so that no test can modify the stored fixtures."""
    out = str(tmp_path / "v1")
    shutil.copytree(FIXTURES, out, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return out


@pytest.mark.parametrize("tag", ["compressed", "raw"])
def test_v1_functional_checkpoints_load_bit_exactly(v1_dir, tag, same):
    reader = asyncckpt.CheckpointReader(v1_dir, tag)
    assert reader.manifest["format_version"] == 1
    reader.verify()
    same(asyncckpt.load(v1_dir, tag, map_location="cpu"), fixture_state.build_state())


def test_v1_latest_and_views_share_storage_again(v1_dir):
    state = asyncckpt.load(v1_dir)  # latest names "raw"
    assert state["row"].untyped_storage().data_ptr() == state["base"].untyped_storage().data_ptr()
    assert state["tied"][0] is state["tied"][1]


def test_v1_trainer_checkpoint_resumes(v1_dir, same):
    expected_model, expected_opt, expected_sched = fixture_state.build_trainer()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with asyncckpt.AsyncCheckpointer(model, opt, lr_scheduler=sched) as saver:
        path, client_state = saver.load_checkpoint(v1_dir, tag="trainer")
        assert saver.global_steps == 2
    assert path.endswith("trainer") and client_state == {"epoch": 1}
    same(model.state_dict(), expected_model.state_dict())
    same(opt.state_dict(), expected_opt.state_dict())
    same(sched.state_dict(), expected_sched.state_dict())
