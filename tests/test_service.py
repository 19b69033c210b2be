"""writer.mode: service on one process: the config key, round trips through the node's writer service, its
lifecycle (idle exit, restart after a kill at every phase, leftovers), two jobs, and no fd or shared-memory
leak over many saves. Every wait has a deadline."""
from __future__ import annotations

import glob
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

import asyncckpt
import asyncckpt.codec
import asyncckpt.commit
import asyncckpt.writer
from asyncckpt import CommitError, Config, ConfigError, StateMismatchError, WriterConfig
from asyncckpt.engine import SaveEngine
from asyncckpt.loader import list_tags
from asyncckpt.service import paths
from asyncckpt.state import MAX_DEPTH, flatten
from conftest import merge
from test_state_values import KINDS, _nest
from test_snapshot_lazy import hold, state_of

pytestmark = pytest.mark.timeout(240)

SERVICE = {"commit_timeout_s": 30, "codec": {"chunk_mib": 1 / 64},
           "writer": {"mode": "service", "threads_per_node": 2, "nice": 0, "fsync": False}}


def wait_until(check, timeout: float, what: str):
    """Poll ``check()`` (an external process's effect) until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def service_pids(runtime: str) -> list[int]:
    """The writer services this test started (their command line names the test's runtime directory, or one
    under it: simulated nodes have one each)."""
    pids = []
    for entry in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(entry, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        pid = int(entry.split("/")[2])
        if b"asyncckpt.service" in cmd and any(a.startswith(runtime.encode()) for a in cmd) and paths.pid_alive(pid):
            pids.append(pid)
    return pids


@pytest.fixture
def runtime(monkeypatch):
    """A private runtime directory and service id for this test; its services are killed at teardown."""
    path = f"/dev/shm/asyncckpt-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path, 0o700)
    monkeypatch.setenv(paths.RUNTIME_ENV, path)
    monkeypatch.setenv(paths.ID_ENV, uuid.uuid4().hex)
    yield path
    for pid in service_pids(path):
        os.kill(pid, signal.SIGKILL)
    for log in glob.glob(os.path.join(path, "*.log")):  # what a service that did not exit cleanly said
        print(f"--- {log}\n{open(log, errors='replace').read()}")
    subprocess.run(["rm", "-rf", path], check=False, timeout=30)


@pytest.fixture
def engines():
    made = []

    def make(**over) -> SaveEngine:
        cfg = dict(SERVICE)
        cfg.update(over)
        e = SaveEngine(Config.from_dict(cfg))
        made.append(e)
        return e

    yield make
    for e in made:
        try:
            e.close(timeout=60)
        except Exception:  # noqa: BLE001 - a test that killed the service already saw the failure
            pass


def state(seed: int, big: int = 1000) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, 16, generator=g)
    return {
        "f32": torch.randn(big, generator=g), "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-2**40, 2**40, (17,), generator=g), "bool": torch.rand(9, generator=g) > 0.5,
        "empty": torch.empty(0, 3), "scalar": torch.tensor(3.5), "base": base, "view": base[2:5],
        "transposed": base.t(), "small": [torch.full((i,), float(i)) for i in range(1, 40)],
        "meta": {"step": seed, "name": "x", "nested": [1, 2.5, None, True]},
    }


def save(engine: SaveEngine, st: dict, save_dir: str, tag: str):
    return engine.save(lambda: flatten(st, allow_pickle=False), save_dir, tag)


def test_writer_mode_is_a_strict_key(monkeypatch):
    monkeypatch.delenv("ASYNCCKPT_WRITER_MODE", raising=False)
    assert Config().writer.mode == "thread"
    assert Config.from_dict({"writer": {"mode": "service"}}).writer.mode == "service"
    for bad in ("threads", "Service", "", 1, True, None):
        with pytest.raises(ConfigError, match="'writer.mode'"):
            Config.from_dict({"writer": {"mode": bad}})
    with pytest.raises(ConfigError, match="'writer.mode'"):
        WriterConfig(mode="process")


def test_the_default_mode_comes_from_the_environment(monkeypatch):
    """``ASYNCCKPT_WRITER_MODE`` is the default of writer.mode (how the suite runs in service mode); a config
    that names a mode wins; a bad value is refused naming the key and the variable."""
    monkeypatch.setenv("ASYNCCKPT_WRITER_MODE", "service")
    assert Config().writer.mode == Config.from_dict({}).writer.mode == "service"
    assert Config.from_dict({"writer": {"mode": "thread"}}).writer.mode == "thread"
    monkeypatch.setenv("ASYNCCKPT_WRITER_MODE", "threads")
    with pytest.raises(ConfigError, match=r"'writer.mode'.*\$ASYNCCKPT_WRITER_MODE"):
        Config()


def test_round_trip_bit_exact_and_nothing_written_by_the_trainer(runtime, engines, save_dir, same, monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("the training process encoded or wrote a save")

    for cls, name in ((asyncckpt.writer.WriterPool, "write_rank"), (asyncckpt.codec.ChunkCodec, "encode"),
                      (asyncckpt.commit.CommitCoordinator, "commit")):
        monkeypatch.setattr(cls, name, not_here)  # in this process only: the service has its own
    e = engines()
    states = {f"t{i}": state(i) for i in range(3)}
    for tag, st in states.items():
        res = save(e, st, save_dir, tag).result(timeout=120)
        assert res.path == os.path.join(save_dir, tag) and "handover" in res.phases and res.raw_bytes > 0
        assert res.staging_peak_bytes == e.pool.staging_bytes >= res.raw_bytes  # the shared-memory slot held
    assert open(os.path.join(save_dir, "latest")).read().strip() == "t2"
    for tag, st in states.items():
        same(asyncckpt.load(save_dir, tag), st)
    assert e.service.service_pid not in (None, os.getpid())
    assert e.pool.allocations == 1  # the shared-memory slot is reused


def test_a_save_error_comes_back_as_the_thread_mode_error(runtime, engines, tmp_path):
    """The same failing save in both modes raises the same class, chaining the same OS error (class, errno,
    file name); the saver stays usable."""
    e = engines()
    thread = SaveEngine(Config.from_dict({**SERVICE, "writer": {**SERVICE["writer"], "mode": "thread"}}))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    try:
        for target in (str(blocked), str(blocked / "sub"), "/proc/asyncckpt-denied"):
            want = save(thread, state(0), target, "t").exception(timeout=120)
            err = save(e, state(0), target, "t").exception(timeout=120)
            assert type(err) is type(want) and str(target) in str(err), (repr(err), repr(want))
            assert isinstance(want.__cause__, OSError), repr(want.__cause__)
            got_cause, want_cause = err.__cause__, want.__cause__
            assert (type(got_cause), got_cause.errno, got_cause.filename) == \
                   (type(want_cause), want_cause.errno, want_cause.filename), (got_cause, want_cause)
    finally:
        thread.close(timeout=60)
    assert save(e, state(0), str(tmp_path / "ok"), "t").result(timeout=120).tag == "t"  # still usable


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_nested_max_depth_deep_is_handed_over(runtime, engines, save_dir, kind):
    """The deepest state flatten accepts (MAX_DEPTH containers of every kind) goes over the socket and round
    trips, as in thread mode."""
    e = engines()
    nested = _nest(kind, MAX_DEPTH, torch.arange(3.0))
    e.save(lambda: flatten(nested, allow_pickle=False), save_dir, "deep").result(timeout=120)
    out = asyncckpt.load(save_dir, "deep")
    for _ in range(MAX_DEPTH):
        out = out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))
    assert torch.equal(out, torch.arange(3.0))


def test_close_returns_once_the_services_keep_last_removals_are_done(runtime, engines, save_dir):
    """As thread mode's close joins its retention thread: once close returned, keep_last holds. (The removal
    after the last result is quick here, so this passes by luck without the close handshake too; with 100
    saves, test_faults.py's test_back_to_back_saves_on_a_slow_disk in service mode caught the race.)"""
    e = engines(keep_last=1, max_inflight=2)
    futs = [save(e, state(i, 20000), save_dir, f"t{i}") for i in range(6)]
    assert [f.result(timeout=120).tag for f in futs] == [f"t{i}" for i in range(6)]
    e.close(timeout=60)
    assert list_tags(save_dir) == ["t5"]


def test_service_exits_when_idle_and_the_next_saver_starts_a_new_one(runtime, engines, save_dir):
    e = engines()
    save(e, state(0), save_dir, "a").result(timeout=120)
    first = e.service.service_pid
    e.close(timeout=60)
    wait_until(lambda: not paths.pid_alive(first), 60, "the idle service to exit")
    assert not glob.glob(os.path.join(runtime, "*.sock")) and not glob.glob(os.path.join(runtime, "*.log"))
    e2 = engines()
    save(e2, state(1), save_dir, "b").result(timeout=120)
    assert e2.service.service_pid not in (None, first)


@pytest.mark.parametrize("phase", ["prepare", "write", "publish"])
def test_service_killed_at_each_phase(runtime, engines, save_dir, monkeypatch, phase, leftovers, same):
    monkeypatch.setenv("ASYNCCKPT_SERVICE_PAUSE_AT", f"{phase}:after")  # inherited by the service
    e = engines()
    save(e, state(0), save_dir, "before").result(timeout=120)
    victim = e.service.service_pid
    fut = save(e, state(1), save_dir, "after")
    marker = os.path.join(runtime, f"paused-{phase}-{victim}")
    wait_until(lambda: os.path.exists(marker), 120, f"the service to reach {phase}")
    os.kill(victim, signal.SIGKILL)
    err = fut.exception(timeout=60)
    assert isinstance(err, CommitError) and "writer service" in str(err) and "'after'" in str(err), repr(err)
    assert open(os.path.join(save_dir, "latest")).read().strip() == "before"
    assert list_tags(save_dir) == ["before"]
    monkeypatch.delenv("ASYNCCKPT_SERVICE_PAUSE_AT")
    res = save(e, state(2), save_dir, "again").result(timeout=120)  # a new service
    assert res.tag == "again" and e.service.service_pid not in (None, victim)
    assert open(os.path.join(save_dir, "latest")).read().strip() == "again"
    assert sorted(list_tags(save_dir)) == ["again", "before"] and not leftovers(save_dir)
    same(asyncckpt.load(save_dir, "again"), state(2))


def test_two_jobs_on_one_node_get_two_services(runtime, engines, save_dir, monkeypatch):
    monkeypatch.setenv(paths.ID_ENV, "job-a")
    a = engines()
    monkeypatch.setenv(paths.ID_ENV, "job-b")
    b = engines()
    fa, fb = save(a, state(0), save_dir + "a", "x"), save(b, state(1), save_dir + "b", "x")
    assert fa.result(timeout=120).tag == fb.result(timeout=120).tag == "x"
    assert None not in (a.service.service_pid, b.service.service_pid)
    assert a.service.service_pid != b.service.service_pid
    assert len(glob.glob(os.path.join(runtime, "*.sock"))) == 2


def test_savers_of_one_job_share_the_nodes_encode_threads(runtime, engines, save_dir, same, caplog):
    """Two savers of one job on a node (a model's and an EMA's, say): one service, one set of encode threads (the
    node's budget, set by the first saver); a saver asking for another budget is told so; both round-trip."""
    from benchmarks.service_budget import role, threads_of

    first = engines()  # writer.threads_per_node: 2
    saves = [save(first, state(0), save_dir + "a", "x")]
    with caplog.at_level("WARNING", logger="asyncckpt.service.client"):
        second = engines(writer={**SERVICE["writer"], "threads_per_node": 3})
        saves.append(save(second, state(1), save_dir + "b", "x"))
        for f in saves:
            assert f.result(timeout=120).tag == "x"
    assert first.service.service_pid == second.service.service_pid
    roles = [role(name) for name, _, _ in threads_of(first.service.service_pid).values()]
    assert roles.count("acs-encode") == 2 and roles.count("acs-io") == 2, roles  # 2 groups, one budget
    assert any("asks for 3 encode threads" in r.getMessage() and "runs 2" in r.getMessage() for r in caplog.records)
    same(asyncckpt.load(save_dir + "a", "x"), state(0))
    same(asyncckpt.load(save_dir + "b", "x"), state(1))
    first.close(timeout=60)
    second.close(timeout=60)
    third = engines(writer={**SERVICE["writer"], "threads_per_node": 3})  # no saver holds the old budget now
    save(third, state(2), save_dir + "c", "x").result(timeout=120)
    roles = [role(name) for name, _, _ in threads_of(third.service.service_pid).values()]
    assert roles.count("acs-encode") == 3, roles


def _session_autogroup(pid: int | str = "self") -> tuple[str, int] | None:
    """The autogroup a process is scheduled in and its niceness, as ``("/autogroup-N", nice)``; None where it is
    in none: not Linux, autogroup scheduling disabled, or the process sits in a cgroup of its own (containers),
    where the kernel prints nothing and CPU time is shared by cgroups instead."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) != 3 or fields[1] != "nice":
        return None
    return fields[0], int(fields[2])


def test_the_service_lowers_its_sessions_priority_not_only_its_own(runtime, engines, save_dir):
    """The service runs in a session of its own; with autogroup scheduling, CPU time is shared between sessions
    before niceness acts, so the service sets its session's autogroup niceness to writer.nice too (else it
    would take as much CPU as the whole training session)."""
    e = engines(writer={**SERVICE["writer"], "nice": 7})
    save(e, state(0), save_dir, "x").result(timeout=120)
    pid = e.service.service_pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    group, mine = _session_autogroup(pid), _session_autogroup()
    if group is None or mine is None:  # e.g. a container's cgroup: the kernel schedules no autogroup here
        pytest.skip(f"no autogroup scheduling for these processes ({group}, {mine})")
    assert group[0] != mine[0], (group, mine)  # a session (autogroup) of its own
    assert group[1] == 7, group


def test_leftover_shared_memory_of_dead_processes_is_removed_at_start(runtime, engines, save_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    stale = os.path.join(runtime, f"{paths.BUFFER_PREFIX}{dead.pid}-0123")
    mine = os.path.join(runtime, f"{paths.BUFFER_PREFIX}{os.getpid()}-4567")
    for p in (stale, mine):
        open(p, "wb").close()
    e = engines()
    save(e, state(0), save_dir, "a").result(timeout=120)
    assert not os.path.exists(stale) and os.path.exists(mine)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shm_mappings(runtime: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(runtime in line for line in f)


def test_no_fd_or_shared_memory_leak_over_1000_saves(runtime, engines, save_dir):
    """1,000 saves of a tiny state, up to 4 in flight on 3 slots, the state growing now and then (the slots'
    buffers are replaced): the training process and the service end with the descriptors they began with, and
    only the current buffers are mapped."""
    e = engines(max_inflight=3, keep_last=2)
    sizes = [16, 600, 40, 2000, 8]  # bytes grow at each step up: the slots are reallocated
    st = lambda i: {"w": torch.full((sizes[i * len(sizes) // 1000] + i % 3,), float(i)), "i": i}  # noqa: E731
    e.pool.prepare(flatten(st(0), allow_pickle=False).items)  # every slot holds its buffer (and its descriptor)
    warm = [e.save(lambda: flatten(st(0), allow_pickle=False), save_dir, f"warm{i}") for i in range(3)]
    for f in warm:
        f.result(timeout=120)
    warm_allocations = e.pool.allocations
    assert warm_allocations == 3
    svc = e.service.service_pid
    gc.collect()  # descriptors earlier tests left to garbage collection (readers' finalizers) are closed now
    before = (_fds(), len(os.listdir(runtime)), len(os.listdir(f"/proc/{svc}/fd")))
    futs = []
    for i in range(1000):
        futs.append(e.save(lambda i=i: flatten(st(i), allow_pickle=False), save_dir, f"s{i}"))
        if len(futs) > 4:
            futs.pop(0).result(timeout=120)
    for f in futs:
        f.result(timeout=120)
    e.wait(timeout=120)
    assert e.service.service_pid == svc
    assert e.pool.allocations > warm_allocations  # buffers were replaced as the state grew
    gc.collect()
    assert (_fds(), len(os.listdir(runtime))) == before[:2]
    # the service's keep_last removal runs after each result: its fds settle once the last one finished
    wait_until(lambda: len(os.listdir(f"/proc/{svc}/fd")) == before[2], 60, f"the service's fds back to {before}")
    assert _shm_mappings(runtime) <= 3  # one buffer per slot; the replaced ones are unmapped
    assert open(os.path.join(save_dir, "latest")).read().strip() == "s999"
    assert sorted(list_tags(save_dir)) == ["s998", "s999"]


KILLED_TRAINER = textwrap.dedent("""
    import os, signal, sys, torch
    from asyncckpt import Config
    from asyncckpt.engine import SaveEngine
    from asyncckpt.state import flatten
    cfg = Config.from_dict({"writer": {"mode": "service", "threads_per_node": 1, "nice": 0},
                            "codec": {"compression": False}})
    e = SaveEngine(cfg)
    st = {"w": torch.randn(4 << 20, generator=torch.Generator().manual_seed(7))}  # 16 MiB, fsync on
    e.save(lambda: flatten(st, allow_pickle=False), sys.argv[1], "t1").result(timeout=120)
    e.save(lambda: flatten(st, allow_pickle=False), sys.argv[1], "t2")
    os.kill(os.getpid(), signal.SIGKILL)  # right after save returned
""")


def test_trainer_killed_right_after_save_returned_the_save_still_completes(runtime, save_dir):
    child = subprocess.run([sys.executable, "-c", KILLED_TRAINER, save_dir], timeout=200,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == -signal.SIGKILL
    wait_until(lambda: asyncckpt.loader.read_latest(save_dir) == "t2", 120, "the service to publish t2")
    got = asyncckpt.load(save_dir, "t2")
    assert torch.equal(got["w"], torch.randn(4 << 20, generator=torch.Generator().manual_seed(7)))
    wait_until(lambda: not service_pids(runtime), 60, "the service to exit once the save is done")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_staged_into_registered_shared_memory(runtime, engines, save_dir, same):
    e = engines(pin_memory="always")
    st = {"w": torch.randn(1 << 16, device="cuda"), "b": torch.arange(7, device="cuda"), "cpu": torch.ones(3)}
    save(e, st, save_dir, "c").result(timeout=120)
    buf = e.pool.slots[0].buffer
    assert e.service.allocate.handle(buf) and buf.is_pinned()  # cudaHostRegister'ed: CUDA sees it as pinned
    same(asyncckpt.load(save_dir, "c"), st)  # restored to the devices it was saved from


def service_saver(make_saver, trainer, **over):
    """An AsyncCheckpointer of ``trainer`` in service mode (the test's runtime directory)."""
    return make_saver(trainer, **merge(SERVICE, over))


def test_lazy_snapshot_is_copied_before_the_handover_and_bit_exact(runtime, save_dir, make_trainer, make_saver,
                                                                   same):
    """snapshot: lazy: save returns before the copy (held by the test); the descriptor goes only once the copy
    is complete, so the next step's changes are not in the checkpoint, which holds the state of the call."""
    t = make_trainer()
    t.train(1)
    saver = service_saver(make_saver, t, snapshot="lazy")
    copier = hold(saver)
    expected = state_of(t.model, t.optimizer)
    fut = saver.save_checkpoint(save_dir, tag="a")
    assert copier.log == [] and not fut.done()
    copier.release()
    t.step()  # waits for the copy (the optimizer's pre-hook), then changes every parameter
    res = fut.result(timeout=120)
    assert res.tag == "a" and saver.engine.service.service_pid not in (None, os.getpid())
    same(expected, {k: v for k, v in asyncckpt.load(save_dir, "a").items() if k in expected})


@pytest.mark.parametrize("noticed_by", ["background", "step", "wait_snapshot"])
def test_torn_lazy_snapshot_fails_the_save_naming_the_tensor(runtime, save_dir, make_trainer, make_saver, latest,
                                                             leftovers, noticed_by):
    """A parameter changed in place (no hook sees it) before the lazy copy is complete: the rank's future
    raises the StateMismatchError naming that tensor (as in thread mode), nothing is published, and the saver
    goes on."""
    t = make_trainer()
    t.train(1)
    saver = service_saver(make_saver, t, snapshot="lazy")
    saver.save_checkpoint(save_dir, tag="good").result(timeout=120)
    copier = hold(saver)
    fut = saver.save_checkpoint(save_dir, tag="torn")
    with torch.no_grad():
        t.model.hidden.weight.add_(1.0)
    copier.release()
    if noticed_by == "step":
        t.step()
    elif noticed_by == "wait_snapshot":
        saver.wait_snapshot(timeout=30)
    with pytest.raises(StateMismatchError, match=r"'module/hidden\.weight'") as ei:
        fut.result(timeout=120)
    assert "'module/out.weight'" not in str(ei.value)
    assert isinstance(ei.value.__cause__, CommitError) and "rank 0" in str(ei.value.__cause__)
    assert latest(save_dir) == "good" and list_tags(save_dir) == ["good"] and leftovers(save_dir) == []
    saver.save_checkpoint(save_dir, tag="after").result(timeout=120)
    assert latest(save_dir) == "after"
