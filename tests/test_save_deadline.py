"""save_deadline_s: a whole-save deadline, separate from the per-collective commit_timeout_s, decided on
every rank alike at the commit (from the slowest rank's elapsed time); the saver stays usable afterwards."""
from __future__ import annotations

import math

import pytest

import asyncckpt
import deadline_workers as dw
from asyncckpt.config import Config
from dist_helpers import assert_all_ok, forkserver_context, run_ranks


@pytest.mark.multirank
@pytest.mark.parametrize("late_rank", [0, 1])
def test_a_save_past_its_deadline_on_one_rank_fails_on_every_rank_and_the_next_save_runs(tmp_path, late_rank):
    save_dir = str(tmp_path / "ckpt")
    out = assert_all_ok(run_ranks(dw.late_rank_then_next_save, 2, str(tmp_path), save_dir, late_rank,
                                  ctx=forkserver_context()))
    for r in out:
        kind, text, failures = r["error"]
        assert kind == "CommitTimeoutError", r
        assert f"rank {late_rank} (the slowest)" in text and "save_deadline_s=50" in text, text
        assert list(failures) == [late_rank]
        assert not r["t1_exists"]  # published nowhere
        assert r["t2"].endswith("t2") and r["latest"] == "t2"  # no new group needed: the same saver goes on
    assert asyncckpt.list_tags(save_dir) == ["t2"]


def test_a_single_rank_save_past_its_deadline_is_not_published(tmp_path):
    import time

    import torch

    with asyncckpt.AsyncCheckpointer(torch.nn.Linear(2, 2), config={"save_deadline_s": 5}) as saver:
        fut = saver.engine.save(lambda: saver._flatten(saver.state_dict()), str(tmp_path), "late",
                                t0=time.perf_counter() - 10)
        assert isinstance(fut.exception(60), asyncckpt.CommitTimeoutError)
        assert saver.save_checkpoint(str(tmp_path), tag="ok").result(60).tag == "ok"
    assert asyncckpt.list_tags(str(tmp_path)) == ["ok"]


@pytest.mark.parametrize("value", [-1, -0.5, 1e8, math.inf, math.nan])
def test_save_deadline_s_is_validated(value):
    with pytest.raises(asyncckpt.ConfigError, match="save_deadline_s"):
        Config.from_dict({"save_deadline_s": value})


def test_save_deadline_s_defaults_to_none():
    assert Config().save_deadline_s == 0.0 and Config.from_dict({"save_deadline_s": 0}).save_deadline_s == 0.0
