"""A saver's life around the training script: saves accepted before the interpreter exits are finished (real
subprocesses that end without close()); two savers sharing one save_dir never delete each other's partial
directory, while a truly abandoned one is still cleaned up; an interrupt during staging leaves no slot
behind (one rank and two); a relative save_dir is resolved when save is called; the reported stall is what
the caller waited, flatten included."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import asyncckpt
from asyncckpt.engine import SaveEngine
from asyncckpt.io_types import FlatState, StageItem
from conftest import FAST, merge
from dist_helpers import assert_all_ok, forkserver_context, run_ranks
from storage_faults import faults_fixture  # noqa: F401 - the `faults` fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAIN_LINE = "waiting for {n} checkpoint save(s) in flight before exit"


# ------------------------------------------------------------------------------------ exit without close()
# Every script holds its save until the drain at exit has begun (a filter on logging's last-resort handler sees
# the drain's warning and opens the gate), so that the save is certainly still in flight when the script ends.
PRELUDE = """
import json, logging, os, sys, threading, time
import torch, asyncckpt
from asyncckpt.storage import add_wrapper
from asyncckpt.storage.faults import Faults
SAVE_DIR = sys.argv[1]
CONFIG = json.loads(sys.argv[2])
DRAINING = threading.Event()

class OpenAtDrain(logging.Filter):
    def filter(self, record):
        if record.getMessage().startswith("waiting for"):
            DRAINING.set()
        return True

logging.lastResort.addFilter(OpenAtDrain())

class SlowDisk:
    '''From now on, the storage operations `op` of every save wait for the drain at exit, then take `delay`
    seconds each (a slow disk): a storage wrapper (asyncckpt.storage.faults), no patched private name.'''
    def __init__(self, op, delay=0.0):
        self.delay = delay
        self.entered = threading.Event()
        add_wrapper(Faults().on(op, self.hold).wrap)
    def hold(self, op, path):
        self.entered.set()
        if not DRAINING.wait(30):
            raise TimeoutError("the drain at exit never began")
        time.sleep(self.delay)

def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 32)
"""

SCRIPTS = {
    "functional save": """
        SlowDisk("open_write")
        asyncckpt.save({"w": torch.arange(5000, dtype=torch.float32), "step": 1}, SAVE_DIR, "t1", config=CONFIG)
    """,
    "saver": """
        SlowDisk("open_write")
        saver = asyncckpt.AsyncCheckpointer(model(1), config=CONFIG)
        saver.save_checkpoint(SAVE_DIR, tag="t1")
    """,
    "saver, 3 saves in flight": """
        SlowDisk("open_write")
        saver = asyncckpt.AsyncCheckpointer(model(1), config=dict(CONFIG, max_inflight=3))
        for i in (1, 2, 3):
            saver.module.load_state_dict(model(i).state_dict())
            saver.save_checkpoint(SAVE_DIR, tag=f"t{i}")
    """,
    "saver, slow writer": """
        saver = asyncckpt.AsyncCheckpointer(model(1), config=CONFIG)
        SlowDisk("write", 0.05)
        saver.save_checkpoint(SAVE_DIR, tag="t1")
    """,
}
EXPECTED = {"functional save": (1, ["t1"]), "saver": (1, ["t1"]), "saver, 3 saves in flight": (3, ["t1", "t2", "t3"]),
            "saver, slow writer": (1, ["t1"])}


def run_script(body: str, save_dir: str, config: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, save_dir, json.dumps(config)], env=env, timeout=timeout,
                          capture_output=True, text=True)


def leftovers(save_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(save_dir) if n.startswith("."))


def expected_module(seed: int) -> dict:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 32).state_dict()


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_saves_in_flight_are_finished_at_exit(tmp_path, case):
    """The script saves and ends (no close(), no wait()): the drain logs one line, every accepted save is
    published, `latest` names the last one and loads, nothing partial is left, the exit code is 0."""
    save_dir = str(tmp_path / "ckpt")
    proc = run_script(SCRIPTS[case], save_dir, merge(FAST, {"writer": {"fsync": True}}))
    n, tags = EXPECTED[case]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(DRAIN_LINE.format(n=n)) == 1, proc.stderr
    assert "Error" not in proc.stderr and "failed" not in proc.stderr, proc.stderr
    assert asyncckpt.list_tags(save_dir) == tags
    assert open(os.path.join(save_dir, "latest")).read() == tags[-1] + "\n"
    assert leftovers(save_dir) == []
    for i, tag in enumerate(tags, 1):
        state = asyncckpt.load(save_dir, tag)
        if case == "functional save":
            assert torch.equal(state["w"], torch.arange(5000, dtype=torch.float32)) and state["step"] == 1
        else:
            for k, v in expected_module(i).items():
                assert torch.equal(state["module"][k], v), (tag, k)


@pytest.mark.thread_only("the script's slow disk is a Python callable in its own process; in service mode a save handed "
                         "over does not hold the trainer's exit (tests/test_service.py)")
def test_exit_waits_at_most_commit_timeout_then_the_next_save_cleans_up(tmp_path, caplog):
    """A save that cannot finish within commit_timeout_s does not hold the exit forever: the process exits
    (code 0) with an error line naming the deadline, the previous checkpoint stays latest, and the partial
    directory left behind (its owner is dead) is removed by the next save to that directory."""
    save_dir = str(tmp_path / "ckpt")
    body = """
        saver = asyncckpt.AsyncCheckpointer(model(1), config=dict(CONFIG, commit_timeout_s=1))
        saver.save_checkpoint(SAVE_DIR, tag="before").result(30)
        SlowDisk("write", 0.2)  # 1024 chunks: ~100 s for this save
        saver.save_checkpoint(SAVE_DIR, tag="never", client_state={"big": torch.zeros(1 << 22)})
    """
    proc = run_script(body, save_dir, merge(FAST, {"codec": {"compression": False}}), timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert DRAIN_LINE.format(n=1) in proc.stderr
    assert "1 checkpoint save(s) did not finish within commit_timeout_s=1s" in proc.stderr, proc.stderr
    assert asyncckpt.list_tags(save_dir) == ["before"]
    assert open(os.path.join(save_dir, "latest")).read() == "before\n"
    assert ".never.partial" in leftovers(save_dir)
    with caplog.at_level(logging.WARNING, logger="asyncckpt.commit"):
        asyncckpt.save({"x": torch.ones(3)}, save_dir, "next", config=merge(FAST, {"codec": {"level": 4}})).result(30)
    assert f"removing leftover partial checkpoint {os.path.join(save_dir, '.never.partial')}" in caplog.text
    assert leftovers(save_dir) == []
    assert asyncckpt.list_tags(save_dir) == ["before", "next"]


def test_close_at_exit_of_a_closed_saver_is_silent(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    body = """
        with asyncckpt.AsyncCheckpointer(model(1), config=CONFIG) as saver:
            saver.save_checkpoint(SAVE_DIR, tag="t1")
        asyncckpt.save({"w": torch.ones(3)}, SAVE_DIR, "t2", config=CONFIG).result(30)
    """
    proc = run_script(body, save_dir, FAST)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert asyncckpt.list_tags(save_dir) == ["t1", "t2"]


# ------------------------------------------------------------------------------- two savers, one save_dir
@pytest.mark.thread_only("holds a save mid-write (partial directory made); the service-mode gate holds the hand-over")
@pytest.mark.parametrize("second", ["saver", "functional"])
def test_second_saver_leaves_the_first_ones_partial_alone(save_dir, make_trainer, make_saver, writer_gate, fast_config,
                                                          caplog, second):
    """A main saver's save is held mid-write (its partial directory exists) while a second saver (an EMA saver,
    or asyncckpt.save) makes its first save to the same directory, which cleans up leftovers: the first
    save's partial directory is in use and stays; both checkpoints are published and load."""
    t = make_trainer()
    main = make_saver(t)
    gate = writer_gate(main.engine)
    fut_main = main.save_checkpoint(save_dir, tag="main")
    assert gate.entered.wait(30)
    assert os.path.isdir(os.path.join(save_dir, ".main.partial"))
    ema_state = {"ema": {k: v.clone() * 0.5 for k, v in t.model.state_dict().items()}}
    with caplog.at_level(logging.INFO, logger="asyncckpt.commit"):
        if second == "saver":
            ema = make_saver(make_trainer(seed=1))
            res = ema.save_checkpoint(save_dir, tag="ema").result(timeout=30)
        else:
            res = asyncckpt.save(ema_state, save_dir, "ema", config=fast_config(codec={"level": 3})).result(timeout=30)
    assert res.tag == "ema"
    assert f"leaving partial checkpoint {os.path.join(save_dir, '.main.partial')} alone: pid {os.getpid()}" in caplog.text
    assert "removing leftover" not in caplog.text
    assert os.path.isdir(os.path.join(save_dir, ".main.partial"))
    gate.open()
    assert fut_main.result(timeout=30).tag == "main"
    assert asyncckpt.list_tags(save_dir) == ["ema", "main"]
    assert leftovers(save_dir) == []
    assert torch.equal(asyncckpt.load(save_dir, "main")["module"]["out.weight"], t.model.out.weight)
    if second == "functional":
        assert torch.equal(asyncckpt.load(save_dir, "ema")["ema"]["out.weight"], ema_state["ema"]["out.weight"])


@pytest.mark.thread_only("holds a save mid-write (partial directory made); the service-mode gate holds the hand-over")
def test_same_tag_from_two_savers_is_refused(save_dir, make_trainer, make_saver, writer_gate):
    """A second saver asking for a tag the first one is writing right now fails with WriteError naming the
    owner; the first save is untouched and publishes."""
    t = make_trainer()
    first, second = make_saver(t), make_saver(t)
    gate = writer_gate(first.engine)
    fut = first.save_checkpoint(save_dir, tag="same")
    assert gate.entered.wait(30)
    err = second.save_checkpoint(save_dir, tag="same").exception(timeout=30)
    assert isinstance(err, asyncckpt.WriteError), repr(err)
    assert "being written by another saver" in str(err) and f"pid {os.getpid()}" in str(err)
    gate.open()
    assert fut.result(timeout=30).tag == "same"
    assert asyncckpt.list_tags(save_dir) == ["same"] and leftovers(save_dir) == []


KILLED_OWNER = """
    saver = asyncckpt.AsyncCheckpointer(model(1), config=CONFIG)
    disk = SlowDisk("write")
    saver.save_checkpoint(SAVE_DIR, tag="dead")
    assert disk.entered.wait(30)  # the partial directory exists and is being written
    if sys.argv[3] == "forked":  # a child inherits the lock's descriptor and outlives its parent
        child = os.fork()
        if child == 0:  # off the pipes the test reads to the end
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
    os.kill(os.getpid(), 9)
"""


@pytest.mark.thread_only("the partial's owner is the script, killed mid-write; in service mode the owner is the "
                         "service (tests/test_crash.py and tests/test_service.py kill it mid-write)")
@pytest.mark.parametrize("how", ["killed", "forked"])
def test_abandoned_partial_is_still_cleaned(tmp_path, make_trainer, make_saver, caplog, how):
    """The owner of a partial directory was SIGKILLed mid-write: its lock is free (or, with a forked child
    still holding the inherited lock, its pid is dead on this host), so the next saver removes the directory
    and its lock file, logging it. A partial directory with no owner record is left alone, with a warning."""
    save_dir = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(KILLED_OWNER), save_dir, json.dumps(FAST), how],
                          env=env, timeout=120, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout) if how == "forked" else None
    try:
        assert set(leftovers(save_dir)) == {".dead.partial", ".dead.partial.lock"}
        os.makedirs(os.path.join(save_dir, ".unknown.partial"))
        with caplog.at_level(logging.INFO, logger="asyncckpt.commit"):
            make_saver(make_trainer()).save_checkpoint(save_dir, tag="next").result(timeout=30)
        assert f"removing leftover partial checkpoint {os.path.join(save_dir, '.dead.partial')}" in caplog.text
        assert f"leaving partial checkpoint {os.path.join(save_dir, '.unknown.partial')} alone: it has no owner" \
               in caplog.text
        assert leftovers(save_dir) == [".unknown.partial"]
        assert asyncckpt.list_tags(save_dir) == ["next"]
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_latest_temp_file_in_use_is_left_alone(save_dir, make_trainer, make_saver, caplog):
    """A ``.latest.*.tmp`` another saver is writing (locked) stays; an abandoned one (lock free) goes."""
    os.makedirs(save_dir)
    busy, dead = (os.path.join(save_dir, f".latest.{n}.tmp") for n in ("busy", "dead"))
    for p in (busy, dead):
        with open(p, "w") as f:
            f.write("x\n")
    with open(busy) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with caplog.at_level(logging.WARNING, logger="asyncckpt.commit"):
            make_saver(make_trainer()).save_checkpoint(save_dir, tag="t").result(timeout=30)
        assert os.path.exists(busy) and not os.path.exists(dead)
        assert f"removing leftover temporary file {dead}" in caplog.text and busy not in caplog.text


# ------------------------------------------------------------------------------- interrupted while staging
class InterruptingTensor(torch.Tensor):
    """A tensor whose copy into the host buffer is interrupted (Ctrl-C in the middle of staging)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def interrupting_state() -> FlatState:
    src = torch.ones(16).as_subclass(InterruptingTensor)
    return FlatState({"__t": "tensor", "key": "w"}, [StageItem("w", src, torch.float32, (16,), "cpu")])


@pytest.mark.parametrize("on_busy", ["error", "wait"])
def test_interrupt_while_staging_releases_the_slot(save_dir, make_trainer, make_saver, on_busy):
    """KeyboardInterrupt while copying into the only staging slot propagates, and the slot is free again: the
    next save neither reports the saver busy nor waits for commit_timeout_s; wait() returns at once."""
    saver = make_saver(make_trainer(), on_busy=on_busy, max_inflight=1, commit_timeout_s=5)
    with pytest.raises(KeyboardInterrupt):
        saver.engine.save(interrupting_state(), save_dir, "interrupted")
    assert saver.save_checkpoint(save_dir, tag="after").result(timeout=30).tag == "after"
    assert [r.tag for r in saver.wait(timeout=30)] == ["after"]
    assert asyncckpt.list_tags(save_dir) == ["after"] and leftovers(save_dir) == []


def interrupted_rank(rank: int, world: int, save_dir: str, where: str) -> dict:
    """Rank 1 is interrupted (while collecting or while staging); rank 0 saves normally."""
    cfg = asyncckpt.Config.from_dict(merge(FAST, {"on_busy": "error", "commit_timeout_s": 20}))
    engine = SaveEngine(cfg)
    good = lambda: asyncckpt.state.flatten({"w": torch.full((8,), float(rank))})  # noqa: E731
    out: dict = {}
    try:
        if rank == 1:
            def collect():
                raise KeyboardInterrupt

            try:
                engine.save(collect if where == "collect" else interrupting_state(), save_dir, "x")
            except KeyboardInterrupt:
                out["interrupted"] = True
        else:
            err = engine.save(good, save_dir, "x").exception(timeout=60)
            out["error"] = f"{type(err).__name__}: {err}"
        out["after"] = engine.save(good, save_dir, "y").result(timeout=60).tag
    finally:
        engine.close(timeout=60)
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("where", ["collect", "stage"])
def test_interrupt_on_one_rank_keeps_ranks_in_step(tmp_path, where):
    """With two ranks, rank 1 interrupted mid-save still takes part in that save's coordination: rank 0's save
    fails (naming rank 1 and the interrupt) instead of hanging, and the next save succeeds on both."""
    save_dir = str(tmp_path / "ckpt")
    r0, r1 = assert_all_ok(run_ranks(interrupted_rank, 2, str(tmp_path), save_dir, where, timeout=120,
                                       ctx=forkserver_context()))
    assert r1 == {"interrupted": True, "after": "y"}
    assert r0["after"] == "y"
    assert r0["error"].startswith("CommitError") and "rank 1: KeyboardInterrupt" in r0["error"], r0
    assert asyncckpt.list_tags(save_dir) == ["y"]


# ----------------------------------------------------------------------------------- relative save_dir
@pytest.mark.parametrize("api", ["saver", "functional"])
def test_relative_save_dir_is_resolved_at_call_time(tmp_path, monkeypatch, make_trainer, make_saver, fast_config, api,
                                                    faults):
    """A save to a relative directory lands where the current directory was when save was called, even when
    the script changes directory while the save is still queued behind another."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    gate = faults.gate("open_write", ".first.partial")  # holds the first save, the second one queues behind it
    monkeypatch.chdir(here)
    if api == "saver":
        saver = make_saver(make_trainer(), max_inflight=2)
        first = saver.save_checkpoint(str(tmp_path / "abs"), tag="first")
        fut = saver.save_checkpoint("ckpt", tag="rel")
    else:
        cfg = fast_config(max_inflight=2, codec={"level": 5})
        first = asyncckpt.save({"a": torch.ones(3)}, tmp_path / "abs", "first", config=cfg)
        fut = asyncckpt.save({"a": torch.zeros(3)}, "ckpt", "rel", config=cfg)
    assert gate.entered.wait(30)
    os.chdir(elsewhere)
    gate.open()
    assert first.result(timeout=30).tag == "first"
    res = fut.result(timeout=30)
    assert res.path == str(here / "ckpt" / "rel")
    assert asyncckpt.list_tags(str(here / "ckpt")) == ["rel"]
    assert os.listdir(elsewhere) == []


# -------------------------------------------------------------------------------------------------- stall
def test_functional_stall_includes_flatten(save_dir, fast_config):
    """asyncckpt.save of a state whose flatten dominates (tens of thousands of small JSON entries): the stall
    it reports is the time the call took, not only the copy into host buffers."""
    state = {"w": torch.ones(4), "log": [{"step": i, "note": f"entry {i}"} for i in range(30000)]}
    cfg = fast_config(codec={"level": 6})
    t = time.perf_counter()
    fut = asyncckpt.save(state, save_dir, "big", config=cfg)
    took = time.perf_counter() - t
    res = fut.result(timeout=60)
    assert res.stall_s >= 0.9 * took, (res.stall_s, took)
    assert res.stall_s <= took


# ---------------------------------------------------------------------------------------------------- tags
@pytest.mark.parametrize("tag", [100, 0])
def test_an_int_tag_means_its_decimal_string_on_save_and_load(save_dir, fast_config, make_trainer, make_saver, tag):
    result = asyncckpt.save({"w": torch.arange(4)}, save_dir, tag, config=fast_config()).result(60)
    assert result.tag == str(tag) and os.path.isdir(os.path.join(save_dir, str(tag)))
    assert torch.equal(asyncckpt.load(save_dir, tag)["w"], torch.arange(4))
    trainer = make_trainer(0)
    saver = make_saver(trainer)
    saver.save_checkpoint(save_dir + "-saver", tag=tag).result(60)
    path, _ = saver.load_checkpoint(save_dir + "-saver", tag=tag)
    assert path == os.path.join(save_dir + "-saver", str(tag))


@pytest.mark.parametrize("tag", [True, -1, 1.5, "step1\n", None])
def test_bad_tags_are_refused_at_once_by_the_functional_save(save_dir, fast_config, tag):
    with pytest.raises(asyncckpt.InvalidTagError):
        asyncckpt.save({"w": torch.arange(4)}, save_dir, tag, config=fast_config())
    assert not os.path.exists(save_dir) or not os.listdir(save_dir)


def test_keep_last_never_follows_a_latest_that_is_not_a_regular_file(save_dir, make_trainer, make_saver, caplog):
    trainer = make_trainer(0)
    saver = make_saver(trainer, keep_last=1)
    saver.save_checkpoint(save_dir, tag="a").result(60)
    saver.wait(60)
    os.unlink(os.path.join(save_dir, "latest"))
    os.mkfifo(os.path.join(save_dir, "latest"))  # a reader that followed it would block forever
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        saver.save_checkpoint(save_dir, tag="b", save_latest=False).result(60)
        saver.close(60)  # joins the retention thread: it must not hang, and must remove nothing
    assert sorted(asyncckpt.list_tags(save_dir)) == ["a", "b"]
    assert any("keep_last: not removing anything" in r.getMessage() for r in caplog.records)
