"""keep_last is derived from the directory (tags of earlier runs too), and never races a publish."""
from __future__ import annotations

import fcntl
import logging
import os

import pytest

import asyncckpt


def _tags(save_dir):
    return sorted(asyncckpt.list_tags(save_dir))


def test_keep_last_removes_tags_of_earlier_runs_but_never_latest_nor_an_unreadable_tag(
        save_dir, make_trainer, make_saver, caplog):
    trainer = make_trainer(0)
    earlier = make_saver(trainer)  # an earlier run: keeps everything
    for tag in ("r1", "r2", "r3"):
        earlier.save_checkpoint(save_dir, tag=tag).result(60)
    earlier.close(60)
    os.makedirs(os.path.join(save_dir, "bad"))
    with open(os.path.join(save_dir, "bad", "manifest.json"), "w") as f:
        f.write("{not json")  # listed as a tag, but its age cannot be known: never removed
    saver = make_saver(trainer, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        saver.save_checkpoint(save_dir, tag="r4").result(60)  # latest names r4 from now on
        saver.save_checkpoint(save_dir, tag="r5", save_latest=False).result(60)
        saver.save_checkpoint(save_dir, tag="r6", save_latest=False).result(60)
        saver.close(60)  # joins the retention thread
    assert _tags(save_dir) == ["bad", "r4", "r5", "r6"]
    assert asyncckpt.loader.read_latest(save_dir) == "r4"
    assert any("keeping" in r.getMessage() and "bad" in r.getMessage() for r in caplog.records)
    assert not [n for n in os.listdir(save_dir) if n.startswith(".")]  # no lock or leftover files


def test_a_publish_waits_for_the_directory_lock(save_dir, make_trainer, make_saver):
    saver = make_saver(make_trainer(0), commit_timeout_s=0.3)
    os.makedirs(save_dir)
    fd = os.open(save_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(asyncckpt.CheckpointError, match="stayed locked"):
            saver.save_checkpoint(save_dir, tag="a").result(60)
    finally:
        os.close(fd)
    assert _tags(save_dir) == [] and not os.path.exists(os.path.join(save_dir, "latest"))
    saver.save_checkpoint(save_dir, tag="a").result(60)
    assert _tags(save_dir) == ["a"]
