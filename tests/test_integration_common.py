"""asyncckpt.integrations._common: the configuration rule and the one exit drain the integrations share."""
from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap

import pytest

import asyncckpt
from asyncckpt.integrations import _common


class Closable:
    def __init__(self, fail=False):
        self.calls = 0
        self.fail = fail

    def close(self):
        self.calls += 1
        if self.fail:
            raise asyncckpt.WriteError("disk gone")


def test_drain_calls_each_live_object_once_and_logs_failures(caplog):
    """Every registered object that is still alive is drained by its named method; a failure is logged (at exit
    nobody is left to raise to) and does not stop the others; a collected object is forgotten."""
    ok, bad, gone = Closable(), Closable(fail=True), Closable()
    for obj in (bad, ok, gone):
        _common.drain_at_exit(obj, "close")
    _common.drain_at_exit(ok, "close")  # registering again changes nothing
    del gone
    gc.collect()
    with caplog.at_level(logging.ERROR, logger="asyncckpt.integrations._common"):
        _common._drain()
    assert ok.calls == 1 and bad.calls == 1
    assert "Closable" in caplog.text and "disk gone" in caplog.text
    for obj in (ok, bad):
        _common._drains.pop(obj)


def test_drain_runs_at_interpreter_exit(tmp_path):
    """Registered in a script that then simply ends: the drain runs while the main thread finishes."""
    marker = tmp_path / "drained"
    script = textwrap.dedent(f"""
        from asyncckpt.integrations import _common

        class Obj:
            def finish(self):
                open({str(marker)!r}, "w").write("yes")

        keep = Obj()
        _common.drain_at_exit(keep, "finish")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert marker.read_text() == "yes"


@pytest.mark.parametrize("who,retention", [("AsyncCheckpointIO", "ModelCheckpoint(save_top_k=...)"),
                                           ("the Trainer integration", "TrainingArguments(save_total_limit=...)")])
def test_framework_config_refuses_keep_last(who, retention):
    with pytest.raises(asyncckpt.ConfigError, match=r"keep_last.*" + retention.replace("(", r"\(").replace(")", r"\)")):
        _common.framework_config({"keep_last": 2}, who, retention)
    assert _common.framework_config({"max_inflight": 2}, who, retention).max_inflight == 2
