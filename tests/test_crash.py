"""Crash consistency: a real training process is SIGKILLed in every phase of a save, and after each kill the
checkpoint directory must still keep every promise.

tests/crash_child.py trains a tiny model and saves asynchronously; it announces each phase boundary before
the call (staging, partial directory, chunk encode/write, fsync, rank index, manifest, renames, ``latest``
replace, retention, leftover cleanup); given a target (phase, n) it stops at that announcement, so the
parent kills it exactly at the N-th announcement chosen by a seeded RNG. Other kills land at random times.

After each kill:
* no partial directory is listed as a tag, every listed tag is one the child planned, and each newly visible
  tag loads bit-exactly to the state the child saved under it;
* ``latest`` names a published tag, no older than the newest save whose future had resolved (a save the
  trainer was told is durable is never lost), and ``load_checkpoint`` of it restores exactly that state;
* the next run of the saver (the next child) removes the leftover partial directories, logging each one, and
  saves again.

Children come from a forkserver with torch and asyncckpt preloaded (a few milliseconds each) and save to
tmpfs when there is one (ASYNCCKPT_CRASH_DIR to choose): a SIGKILL does not lose the page cache, so what a
kill can break is the order of the file-system steps, which tmpfs keeps like any POSIX file system. Also
here: overwriting the tag ``latest`` names, killed at every publish step (with RENAME_EXCHANGE and with the
two-rename fallback), and two ranks of which one dies or hangs mid-save.

ASYNCCKPT_CRASH_KILLS=N runs N kills (default 50); ASYNCCKPT_CRASH_SEED picks the seed.
"""
from __future__ import annotations

import collections
import os
import pathlib
import random
import shutil
import signal
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener, wait

import pytest
import torch

import asyncckpt
import crash_child as cc
from asyncckpt.checkpointer import rng_state, set_rng_state
from asyncckpt.loader import read_latest
from asyncckpt.service.paths import pid_alive
from dist_helpers import forkserver_context, run_ranks
from reliability import record
from trainer import digest, mlp

SERVICE = cc.service_mode()  # the saves' steps after staging run in a writer service, killed there
# service mode starts a writer service per run (seconds: it imports torch): fewer runs, a longer time limit
KILLS = int(os.environ.get("ASYNCCKPT_CRASH_KILLS", "14" if SERVICE else "50"))
SEED = int(os.environ.get("ASYNCCKPT_CRASH_SEED", "20240611"))
RANDOM_TIME_SHARE = 0.2  # the rest of the kills target a phase announcement
CHILD_DEADLINE_S = 60.0
TIME_LIMIT = pytest.mark.timeout(900 if SERVICE else 120)
IN_A_SAVE = {"prepare", "cleanup", "encode", "write", "index", "manifest"}  # service phases before publication

PHASE_ORDER = ["startup", "stage", "cleanup", "prepare", "encode", "write", "fsync", "index", "fsync_dir", "manifest",
               "rename", "replace_old", "exchange", "latest", "latest_replace", "resolved", "retention_rename",
               "retention_remove", "done"]
CONFIGS = {
    "inflight1": dict(max_inflight=1, keep_last=0, saves=3),
    "inflight2-keep1": dict(max_inflight=2, keep_last=1, saves=3),
    "inflight1-keep2": dict(max_inflight=1, keep_last=2, saves=4),
    "inflight2-raw": dict(max_inflight=2, keep_last=0, saves=3, compression=False),
}
if SERVICE:
    CONFIGS = {k: CONFIGS[k] for k in ("inflight2-keep1", "inflight1-keep2")}


@dataclass
class Run:
    counts: collections.Counter
    killed_at: str | None  # the announcement the child was stopped at (None: it exited on its own)
    duration: float
    log: str
    first_seen: dict = field(default_factory=dict)  # phase: seconds until its first announcement
    victim: str | None = None  # "trainer" or "service" (service mode: which process was killed)
    handed: list = field(default_factory=list)  # service mode: tags handed over to the service
    failed: list = field(default_factory=list)  # service mode: tags whose future failed (the service died)


class Services:
    """Service mode: the listener the child's writer services connect to (crash_child.service_hooks), and
    their connections (each first says its pid)."""

    def __init__(self, root: str, cycle: int):
        self.address = os.path.join(root, f"announce{cycle:04d}.sock")
        self.authkey = os.urandom(16)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._new: queue.Queue = queue.Queue()
        self._closed = False
        self.conns: dict = {}  # connection -> the service's pid
        self.pids: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self._new.put(self._listener.accept())
            except Exception:  # noqa: BLE001 - closed, or a connection that failed its handshake
                if self._closed:
                    return

    def receive(self, trainer, timeout: float):
        """The next message of the trainer (source None; ``trainer`` None: services only) or of a service
        (source: its pid); None on timeout. EOFError when the trainer's connection ended."""
        deadline = time.monotonic() + timeout
        while True:
            while not self._new.empty():
                conn = self._new.get()
                kind, pid, _ = conn.recv()
                assert kind == "pid"
                self.conns[conn] = int(pid)
                self.pids.append(int(pid))
            ready = wait([c for c in (trainer, *self.conns) if c is not None],
                         timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            for conn in ready:
                if conn is trainer:
                    return None, trainer.recv()
                try:
                    return self.conns[conn], conn.recv()
                except EOFError:  # that service ended
                    del self.conns[conn]
            if time.monotonic() >= deadline:
                return None

    def answer(self, pid: int, message: str) -> None:
        for conn, p in self.conns.items():
            if p == pid:
                conn.send(message)

    def wait_exit(self, timeout: float) -> None:
        """Until every service that connected has exited (answering their announcements meanwhile: a service
        that reached the target again goes on)."""
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in self.pids):
            assert time.monotonic() < deadline, f"writer services {self.pids} still running after {timeout:g}s"
            got = self.receive(None, 0.1)
            if got is not None and got[1][0] == "stop":
                self.answer(got[0], "go")

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self.conns:
            conn.close()
        for pid in self.pids:  # a service this run left stopped (never answered) goes with it
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Series:
    """One save directory and everything known about it across kills."""

    name: str
    cfg: dict
    root: str
    verified: set = field(default_factory=set)
    leftovers: set = field(default_factory=set)
    logs: str = ""  # the logs of the runs since the leftovers were last checked
    calibration: collections.Counter = field(default_factory=collections.Counter)
    calib_window: tuple[float, float] = (0.0, 0.0)  # from the first staging to the last save resolved

    @property
    def save_dir(self) -> str:
        return os.path.join(self.root, "ckpt")


class Harness:
    def __init__(self, ctx, tmp_path):
        self.ctx = ctx
        self.tmp = tmp_path
        self.cycle = 0
        self.loader_model = mlp(999)
        self.loader_opt = torch.optim.Adam(self.loader_model.parameters(), lr=1e-2)
        self.loader = asyncckpt.AsyncCheckpointer(self.loader_model, self.loader_opt, config={"writer": {"threads_per_node": 1}})
        self.cleanups_checked = 0
        self.partials_removed = 0

    def close(self) -> None:
        self.loader.close()

    # ------------------------------------------------------------------------------------------ running
    def run(self, series: Series, *, target: tuple[str, int] | None = None, kill_after: float | None = None) -> Run:
        """Start a child on ``series``; kill it at the ``target`` announcement, after ``kill_after`` seconds,
        or (neither) let it finish and exit. In service mode the child's writer services announce too: the
        process that stopped at the target is killed (the service, or the trainer); after a trainer's death
        the services finish what it handed over before the checks, after a service's death the trainer is
        killed once it reported the failed save."""
        self.cycle += 1
        log = os.path.join(series.root, f"child{self.cycle:04d}.log")
        cfg = dict(series.cfg, cycle=self.cycle, target=target, log=log, save_dir=series.save_dir, side_dir=series.root)
        services = Services(series.root, self.cycle) if SERVICE else None
        if services is not None:
            cfg.update(announce=services.address, authkey=services.authkey.hex())
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=cc.child_main, args=(child, cfg), daemon=True)
        t0 = time.monotonic()
        proc.start()
        child.close()
        run = Run(collections.Counter(), None, 0.0, "")
        last = "startup"

        def kill(at: str, pid: int | None = None) -> None:
            os.kill(pid or proc.pid, signal.SIGKILL)
            run.killed_at, run.victim = at, "service" if pid else "trainer"

        def receive(timeout: float):
            """The next (source pid or None for the trainer, message); None on timeout."""
            if services is None:
                return (None, parent.recv()) if parent.poll(timeout) else None
            return services.receive(parent, timeout)

        try:
            while run.killed_at is None:
                now = time.monotonic() - t0
                if now > CHILD_DEADLINE_S:
                    kill("deadline")
                    pytest.fail(f"child {self.cycle} made no progress for {CHILD_DEADLINE_S}s (last phase {last})")
                wait = CHILD_DEADLINE_S - now
                if kill_after is not None:
                    wait = min(wait, kill_after - now)
                    if wait <= 0:
                        kill(last)
                        break
                try:
                    got = receive(wait)
                except EOFError:
                    proc.join(10)
                    pytest.fail(f"child {self.cycle} died on its own (exit code {proc.exitcode}) after {last}")
                if got is None:
                    continue
                source, (kind, phase, detail) = got
                if kind == "error":
                    pytest.fail(f"child {self.cycle} failed:\n{phase}")
                run.counts[phase] += 1
                last = phase
                run.first_seen.setdefault(phase, time.monotonic() - t0)
                if phase == "handed":
                    run.handed.append(detail)
                if kind == "stop":  # the process waits at the targeted step
                    kill(phase, source)
                    break
                if phase == "done":
                    if target is not None:  # the targeted announcement never came: kill it idle
                        kill("done")
                        break
                    if kill_after is None:
                        parent.send("exit")
                        break
            if services is not None:
                self._after_kill(run, services, proc, parent, receive)
        finally:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            parent.close()
            if services is not None:
                services.close()
        if run.killed_at is not None:
            assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        else:
            assert proc.exitcode == 0, proc.exitcode
        try:
            with open(log) as f:
                run.log = f.read()
        except FileNotFoundError:  # killed before it configured logging
            pass
        run.duration = time.monotonic() - t0
        return run

    def _after_kill(self, run: Run, services: "Services", proc, parent, receive) -> None:
        """Service mode, after the kill: a dead service's trainer must see its pending saves fail (then it is
        killed too); a dead trainer's services finish what it handed over and exit by themselves."""
        if run.victim == "service":
            deadline = time.monotonic() + CHILD_DEADLINE_S
            while proc.is_alive():
                assert time.monotonic() < deadline, f"child {self.cycle}: no failed save reported after the service died"
                try:
                    got = receive(1.0)
                except EOFError:
                    break
                if got is None:
                    continue
                source, (kind, phase, detail) = got
                if kind == "error":
                    pytest.fail(f"child {self.cycle} failed after its service was killed:\n{phase}")
                if source is not None and kind == "stop":  # a new service reached the target again: let it go
                    services.answer(source, "go")
                if source is None and phase == "failed":
                    run.failed.append(detail)
                if source is None and phase in ("failed", "done"):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        elif run.killed_at is None:
            return  # the trainer closed its saver: its service finished everything and exits on its own
        services.wait_exit(CHILD_DEADLINE_S)

    # ------------------------------------------------------------------------------------------ checking
    def check(self, series: Series, run: Run) -> None:
        """Every promise after a kill (or a clean exit) of ``run`` on ``series``."""
        save_dir = series.save_dir
        names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
        tags = asyncckpt.list_tags(save_dir)
        planned = {d["tag"]: d["digest"] for d in cc.read_lines(os.path.join(series.root, cc.SIDE_PLANNED))}
        resolved_lines = cc.read_lines(os.path.join(series.root, cc.SIDE_RESOLVED))
        assert all(planned[d["tag"]] == d["digest"] for d in resolved_lines)
        resolved = [d["tag"] for d in resolved_lines]
        # no partial directory is ever a tag, and every tag is one the trainer asked for
        assert not [t for t in tags if t.startswith(".") or t.endswith(".partial")], tags
        assert set(tags) <= set(planned), set(tags) - set(planned)
        # each newly visible tag is complete and bit-exact
        for tag in tags:
            if tag not in series.verified:
                assert digest(asyncckpt.load(save_dir, tag)) == planned[tag], f"{tag} differs from what was saved"
                series.verified.add(tag)
        # latest: published, never older than a save the trainer was told is durable, loads exactly
        latest = read_latest(save_dir)
        if resolved:
            assert latest is not None, "a save resolved but there is no latest"
            assert latest >= max(resolved), f"latest {latest} is older than resolved save {max(resolved)}"
        if latest is not None:
            assert latest in tags, f"latest names {latest!r}, which is not a published tag ({tags})"
            self.check_load_checkpoint(save_dir, latest, planned[latest])
        if SERVICE and run.victim == "trainer" and run.handed:  # what it handed over was finished without it
            assert latest is not None and latest >= max(run.handed), \
                f"save {max(run.handed)} was handed over before the trainer died, but latest is {latest}"
        if SERVICE and run.victim == "service" and run.killed_at in IN_A_SAVE:  # the save failed, not published
            assert run.failed, f"the service died at {run.killed_at}, but no pending save failed"
            assert not set(run.failed) & set(tags), f"saves {run.failed} failed, yet are published"
        # earlier kills' leftovers are gone, each removal logged, once a run got past its first prepare (a run
        # killed halfway through the cleanup logged what it removed before being killed)
        series.logs += run.log
        if series.leftovers and (run.counts["prepare"] or run.killed_at is None):
            for name in series.leftovers:
                assert name not in names, f"leftover {name} survived the next run of the saver"
                what = "partial checkpoint" if name.endswith(".partial") else "temporary file"
                line = f"removing leftover {what} {os.path.join(save_dir, name)}"
                assert line in series.logs, f"no log line for removing {name}:\n{series.logs}"
                self.partials_removed += 1
            self.cleanups_checked += 1
            series.leftovers = set()
        if not series.leftovers:
            series.logs = ""
        series.leftovers |= {n for n in names if n.startswith(".") and n.endswith((".partial", ".tmp"))}

    def check_load_checkpoint(self, save_dir: str, tag: str, expected: str) -> None:
        saved_rng = rng_state()
        try:
            path, client = self.loader.load_checkpoint(save_dir)
            assert path == os.path.join(save_dir, tag)
            got = digest(self.loader.state_dict(client))
        finally:
            set_rng_state(saved_rng)
        assert got == expected, f"load_checkpoint of latest ({tag}) does not restore the saved state"


@pytest.fixture(scope="module")
def ctx():
    return forkserver_context()


@pytest.fixture
def crash_dir(tmp_path):
    """Where the killed children save: tmpfs (/dev/shm) when there is one, so that fsync costs nothing and the
    run does not depend on how busy the disk is; set ASYNCCKPT_CRASH_DIR to use another file system. A
    SIGKILL does not lose the page cache, so on any file system what a kill can break is the order of the
    renames, which is the same on tmpfs."""
    base = os.environ.get("ASYNCCKPT_CRASH_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    if base is None:
        yield tmp_path
        return
    path = tempfile.mkdtemp(prefix="asyncckpt-crash-", dir=base)
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@TIME_LIMIT
def test_sigkill_in_every_phase(ctx, crash_dir):
    tmp_path = crash_dir
    rng = random.Random(SEED)
    harness = Harness(ctx, tmp_path)
    series: dict[str, Series] = {}
    tried: collections.Counter = collections.Counter()
    held: collections.Counter = collections.Counter()
    try:
        for name, cfg in CONFIGS.items():  # calibration: one clean run per configuration
            s = series[name] = Series(name, cfg, str(tmp_path / name))
            os.makedirs(s.root)
            run = harness.run(s)
            harness.check(s, run)
            s.calibration = run.counts
            timing = harness.run(s)  # timing of a resumed clean run
            s.calib_window = (timing.first_seen["stage"], timing.first_seen["done"])
        phases = sorted({p for s in series.values() for p in s.calibration} | {"cleanup"})
        n_random = round(KILLS * RANDOM_TIME_SHARE)
        plan = ["random"] * n_random + [phases[i % len(phases)] for i in range(KILLS - n_random)]
        rng.shuffle(plan)
        plan = collections.deque(plan)
        retries: collections.Counter = collections.Counter()
        kills = 0
        while kills < KILLS:
            phase = plan.popleft()
            leftovers = [n for n, s in series.items() if any(x.endswith(".partial") for x in s.leftovers)]
            if phase == "cleanup" and not leftovers and set(plan) - {"cleanup"}:
                plan.append(phase)  # nothing to clean yet: come back to it after another kill
                continue
            kills += 1
            if phase == "random":
                s = series[rng.choice(sorted(series))]
                # anywhere from the first save's staging to the last save's resolution (as timed in calibration)
                run = harness.run(s, kill_after=rng.uniform(*s.calib_window))
                case = f"random time (last announced: {run.killed_at})"
            else:
                if phase == "cleanup":  # only where an earlier kill left something to clean
                    candidates = leftovers
                    phase_count = {n: 1 for n in candidates}
                else:
                    phase_count = {n: s.calibration[phase] for n, s in series.items() if s.calibration[phase]}
                    candidates = sorted(phase_count)
                if not candidates:
                    phase = "stage"
                    candidates = sorted(series)
                    phase_count = {n: series[n].calibration["stage"] for n in candidates}
                s = series[rng.choice(candidates)]
                k = rng.randint(1, phase_count[s.name])
                run = harness.run(s, target=(phase, k))
                case = f"{cc.PHASE_GROUPS.get(run.killed_at, run.killed_at)}: before {run.killed_at}"
                if run.killed_at != phase and retries[phase] < 3:  # this run had fewer of them: aim again next
                    retries[phase] += 1
                    plan.appendleft(phase)
            tried[case] += 1
            harness.check(s, run)
            held[case] += 1
        for s in series.values():  # a last clean run per directory: cleans up, saves, exits normally
            run = harness.run(s)
            harness.check(s, run)
            assert not [n for n in os.listdir(s.save_dir) if n.endswith((".partial", ".tmp"))]
            assert read_latest(s.save_dir) == f"c{harness.cycle:04d}-s{s.cfg['saves'] - 1}"
    finally:
        harness.close()
        order = {p: i for i, p in enumerate(PHASE_ORDER)}
        for case in sorted(tried, key=lambda c: (c.startswith("random"), order.get(c.rsplit(" ", 1)[-1].strip(")"), 99), c)):
            record("Crash (SIGKILL)", case, tried[case], held[case],
                   note="save dir on tmpfs" if str(tmp_path).startswith("/dev/shm") else "")
    assert sum(tried.values()) == KILLS
    assert harness.cleanups_checked > 0 and harness.partials_removed > 0
    targeted = {c.split(": before ")[1] for c in tried if ": before " in c}
    expected = {"stage", "prepare", "encode", "write", "fsync", "index", "fsync_dir", "manifest", "rename",
                "latest", "latest_replace", "retention_rename", "retention_remove", "cleanup"}
    if KILLS >= 40:
        assert expected <= targeted, f"phases never hit: {expected - targeted}"


@TIME_LIMIT
@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_sigkill_while_overwriting_a_tag(ctx, crash_dir, atomic_exchange):
    """overwrite: true, the same tag saved again and again, killed at every step of publishing over it. With
    RENAME_EXCHANGE the tag is swapped in one step; without it (two renames) a kill between them leaves the
    old checkpoint under a ``.replaced`` name, which the loader reads from and the next run of the saver
    restores (logging it) instead of deleting it. Either way ``latest`` loads right after any kill, exactly a
    state that was saved, never older than the newest save that resolved."""
    harness = Harness(ctx, crash_dir)
    s = Series("overwrite", dict(max_inflight=1, overwrite=True, tag="same", saves=3, no_exchange=not atomic_exchange),
               str(crash_dir / "overwrite"))
    os.makedirs(s.root)
    steps = ["manifest", "fsync_dir", "exchange", "replace_old", "rename", "cleanup", "latest", "latest_replace"]
    tried = held = restored = 0
    try:
        harness.run(s)  # creates the tag
        calibration = harness.run(s).counts  # every save overwrites it
        assert calibration["exchange" if atomic_exchange else "replace_old"] == 3
        # service mode (a service start per run): the first of each step, every one of the renames
        targets = [(p, k) for p in steps for k in range(1, (calibration[p] if not SERVICE or p in ("rename", "replace_old")
                                                           else min(1, calibration[p])) + 1)]
        for target in targets:
            run = harness.run(s, target=target)
            assert run.killed_at == target[0]
            tried += 1
            planned = [d["digest"] for d in cc.read_lines(os.path.join(s.root, cc.SIDE_PLANNED))]
            resolved = [d["digest"] for d in cc.read_lines(os.path.join(s.root, cc.SIDE_RESOLVED))]
            got = digest(asyncckpt.load(s.save_dir))
            assert got in planned, "latest does not load any state that was saved"
            if resolved:
                assert planned.index(got) >= planned.index(resolved[-1]), "a resolved save was lost"
            if not os.path.isdir(os.path.join(s.save_dir, "same")):  # killed between the two renames
                assert not atomic_exchange and os.path.isdir(os.path.join(s.save_dir, ".same.replaced.partial"))
                assert asyncckpt.list_tags(s.save_dir) == []  # nothing half-done is listed as a tag
                after = harness.run(s)  # the next run of the saver puts it back, then saves again
                assert f"restoring checkpoint {os.path.join(s.save_dir, 'same')}" in after.log, after.log
                restored += 1
            assert asyncckpt.list_tags(s.save_dir) == ["same"]
            held += 1
    finally:
        harness.close()
        how = "rename-exchange" if atomic_exchange else "two renames, repaired by the next save"
        record("Crash (SIGKILL)", f"overwrite of the latest tag ({how}): killed at every publish step", tried, held,
               note=f"{restored} restored by the next run" if restored else "")
    if not atomic_exchange:
        assert restored > 0


@pytest.mark.thread_only("the victim rank kills or hangs itself from inside its own storage write (a Python callable "
                         "in a fault hook); in service mode a rank's writes run in the service, and a rank killed after "
                         "its hand-over does not fail the save (tests/test_service_ranks.py, test_service_nodes.py)")
@pytest.mark.multirank
@pytest.mark.parametrize("victim,where", [(1, "write"), (0, "manifest"), (1, "hang")])
def test_two_ranks_one_killed_mid_save(ctx, tmp_path, caplog, victim, where):
    """One rank dies (SIGKILL) or hangs (its writer blocks forever) in the middle of a save: the other's future fails with a
    CommitError within commit_timeout_s, and ``latest`` stays on the previous tag."""
    timeout_s = 3.0 if where == "hang" else 10.0
    save_dir = str(tmp_path / "ckpt")
    results = run_ranks(cc.two_rank_kill, 2, str(tmp_path), save_dir, victim, where, timeout_s, ctx=ctx,
                        pg_timeout=30.0, hung=victim if where == "hang" else None)
    dead, survivor = results[victim], results[1 - victim]
    ok = 0
    try:
        assert dead.exitcode == -signal.SIGKILL, (dead.exitcode, dead.error)
        assert survivor.ok, survivor.error
        v = survivor.value
        assert v["is_commit_error"], v
        assert v["elapsed"] < timeout_s + 5, f"the survivor's future failed only after {v['elapsed']:.1f}s"
        if where == "hang":  # nobody closed a connection: only the deadline can end the wait
            assert v["error"] == "CommitTimeoutError" and v["elapsed"] >= timeout_s * 0.9, v
        assert v["latest"] == "before"
        assert asyncckpt.list_tags(save_dir) == ["before"]
        assert read_latest(save_dir) == "before"
        rank = 1 - victim
        assert digest(asyncckpt.load(save_dir, rank=rank)) == v["before_digest"]  # bit-exact
        # a new run of the saver removes what the dead job left behind and saves again
        leftovers = [n for n in os.listdir(save_dir) if n.endswith(".partial")]
        model = mlp(3)
        with caplog.at_level("WARNING", logger="asyncckpt.commit"):
            with asyncckpt.AsyncCheckpointer(model, None, config=cc.saver_config({})) as saver:
                saver.save_checkpoint(save_dir, tag="restart").result(30)
        for name in leftovers:
            assert f"removing leftover partial checkpoint {os.path.join(save_dir, name)}" in caplog.text
        assert not [n for n in os.listdir(save_dir) if n.endswith(".partial")]
        assert read_latest(save_dir) == "restart"
        ok = 1
    finally:
        what = "hung while writing" if where == "hang" else f"killed at {where}"
        record("Crash (SIGKILL)", f"2 ranks: rank {victim} {what}; survivor fails in time, latest kept", 1, ok)
