"""The measurement protocol for one system on one workload (in one process, or on one rank).

Per repetition, on a fresh saver (``System.open``):

* the first save and ``warm_saves`` more, each waited for before the next one: **stall** (the save call),
  **time to durable** (save call → durable, from the system's completion callback), their results;
* **peak RSS** over the saves (Linux: VmHWM reset through ``/proc/self/clear_refs``), RSS before the saver
  existed, **staging bytes** the saver holds;
* **bytes on disk** of the last checkpoint, **load time** (restore model + optimizer in place);
* **loop overhead**: A/B pairs, K training steps without a save (A) and K steps with one issued after the
  first step (B), back to back, alternating which goes first from pair to pair; each pair gives B - A. K
  spans ``loop.span`` x the warm time to durable, so the writer's contention (GIL, cores, memory bandwidth)
  with the training steps is counted.

With ``first_save_after_s``, the first save of each repetition comes that many seconds after the saver was
built (``open``): what a saver built ahead of time allocates in the background is then ready, as in training,
where the first save comes long after the saver was built. With ``paired_memcpy``, the memcpy floor
(:func:`benchmarks.floors.memcpy_floor`, into a buffer allocated and faulted in before the repetitions) is timed
right before every save and recorded beside its stall (``memcpy_s``): on a shared machine whose speed drifts,
the stall and its floor are then measured under the same conditions.

Then, on one more fresh saver, **memory growth** over ``growth.saves`` consecutive saves (older checkpoints
deleted as it goes). Before all this, the library is warmed up on a tiny model (imports, lazy init, thread
pools), so the first-save figures are about the saver's own first save, not about the process's.
"""
from __future__ import annotations

import gc
import math
import os
import re
import resource
import statistics
import time
import traceback
from typing import Any, Callable

from .floors import memcpy_floor, stage_buffer
from .spec import RunSpec
from .systems import Ctx, Pending, System, disk_bytes, remove
from .workload import TINY, build

WAIT_S = 3600.0


# ---------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> tuple[int, str]:
    """(peak RSS, "since_reset" | "process_lifetime")."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024, "since_reset"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_lifetime"


# --------------------------------------------------------------------------------------------- protocol
class Measurer:
    def __init__(self, system_cls: type[System], wl, ctx: Ctx, run: RunSpec, workdir: str, *,
                 options: dict | None = None, round_index: int = 0, growth: bool = True,
                 log: Callable[[str], None] = print):
        self.cls = system_cls
        self.name = system_cls.name
        self.wl = wl
        self.ctx = ctx
        self.run = run
        self.workdir = workdir
        self.options = options or {}
        self.round = round_index
        self.growth = growth
        self.log = log if ctx.rank == 0 else (lambda _msg: None)
        self._memcpy_pairs: list | None = None  # paired_memcpy: (dst, src, offset, nbytes) of the floor's buffer

    def _dir(self, label: str) -> str:
        return os.path.join(self.workdir, f"{self.name}-{self.round}-{label}")

    def measure(self) -> dict:
        out: dict[str, Any] = {"system": self.name, "status": "ok", "rank": self.ctx.rank, "world": self.ctx.world,
                               "reps": [], "loop": [], "growth": None, "loadavg_before": _loadavg()}
        try:
            t0 = time.perf_counter()
            system = self.cls(self.wl, self.ctx, self.options)
            out["setup_s"] = time.perf_counter() - t0
            out["info"] = system.info()
            out["warmup_s"] = self._warmup() if self.run.warmup else None
            if self.run.paired_memcpy:  # allocated (and faulted in) before any RSS baseline is taken
                _, self._memcpy_pairs = stage_buffer(self.wl.state_tensors())
            t_step = self._step_time() if self._loop_enabled() else None
            out["step_s"] = t_step
            k = None
            for rep in range(self.run.reps):
                rec, loop = self._rep(system, rep, t_step, k)
                out["reps"].append(rec)
                if loop:
                    k = loop[0]["k"]
                    out["loop"].extend(loop)
            if self.ctx.world == 1 and self.growth and self.run.growth_for(self.name):
                out["growth"] = self._growth(system)
        except Exception as exc:  # noqa: BLE001 - a failing system is a result, not a crash of the benchmark
            out["status"] = "failed"
            out["reason"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            self.log(f"  {self.name}: FAILED: {out['reason']}")
        self._memcpy_pairs = None
        out["loadavg_after"] = _loadavg()
        return out

    # -------------------------------------------------------------------------------------------------
    def _warmup(self) -> float:
        """Run the system once on a tiny model: imports, lazy init and thread pools are paid here."""
        t0 = time.perf_counter()
        tiny = build(TINY, ddp=self.ctx.world > 1)
        s = self.cls(tiny, self.ctx, self.options)
        d = self._dir("warmup")
        try:
            s.open(d)
            for i in range(2):
                s.save(f"w{i}").wait(WAIT_S)
            self.ctx.barrier()
            s.load("w1")
            s.close()
        finally:
            self.ctx.barrier()
            if self.ctx.rank == 0:
                remove(d)
        return time.perf_counter() - t0

    def _loop_enabled(self) -> bool:
        return self.run.loop.enabled and self.ctx.world == 1

    def _step_time(self) -> float:
        self.wl.step()  # warm
        n = 3
        t0 = time.perf_counter()
        for _ in range(n):
            self.wl.step()
        return (time.perf_counter() - t0) / n

    def _save(self, system: System, tag: str) -> dict:
        floor = memcpy_floor(self._memcpy_pairs, 1)[0] if self._memcpy_pairs is not None else None
        self.ctx.barrier()
        t0 = time.perf_counter()
        pending = system.save(tag)
        stall = time.perf_counter() - t0
        result = pending.wait(WAIT_S)
        rec = {"tag": tag, "stall_s": stall, "ttd_s": pending.ttd_s}
        if floor is not None:
            rec["memcpy_s"] = floor
        if result:
            rec["result"] = result
        return rec

    def _rep(self, system: System, rep: int, t_step: float | None, k: int | None) -> tuple[dict, list]:
        try:
            return self._rep_body(system, rep, t_step, k)
        except BaseException:
            _close_quietly(system)  # stop a background writer before the failure is reported
            raise

    def _rep_body(self, system: System, rep: int, t_step: float | None, k: int | None) -> tuple[dict, list]:
        d = self._dir(f"r{rep}")
        self.ctx.barrier()
        gc.collect()
        rss0 = rss_bytes()
        reset_ok = reset_peak_rss()
        t0 = time.perf_counter()
        opened = system.open(d)
        open_s = time.perf_counter() - t0
        if self.run.first_save_after_s:
            time.sleep(max(0.0, self.run.first_save_after_s - open_s))
        first_after_s = time.perf_counter() - t0
        saves = [self._save(system, f"s{i}") for i in range(1 + self.run.warm_saves)]
        peak, peak_kind = peak_rss_bytes()
        rec: dict[str, Any] = {
            "rep": rep, "round": self.round, "open_s": open_s, "first_after_s": first_after_s, **opened,
            "first": saves[0], "warm": saves[1:],
            "rss_before": rss0, "peak_rss": peak, "peak_rss_kind": peak_kind if reset_ok else "process_lifetime",
            "staging_bytes": system.staging_bytes(), "allocations": system.allocations(),
        }
        last = saves[-1]["tag"]
        self.ctx.barrier()
        if self.ctx.rank == 0:
            rec["bytes_on_disk"] = disk_bytes(system.path(last))
        t0 = time.perf_counter()
        system.load(last)
        rec["load_s"] = time.perf_counter() - t0
        self.log(f"  {self.name} rep {rep}: first stall {saves[0]['stall_s']*1e3:.1f} ms, "
                 f"warm stall {_med([s['stall_s'] for s in saves[1:]], saves[0]['stall_s'])*1e3:.1f} ms, "
                 f"durable {_med([s['ttd_s'] for s in saves[1:]], saves[0]['ttd_s']):.3f} s, "
                 f"load {rec['load_s']:.3f} s")
        loop: list[dict] = []
        if t_step is not None:
            if k is None and self.run.loop.min_steps >= self.run.loop.max_steps:
                k = self.run.loop.max_steps
            if k is None:  # K from the time to durable *under training* (contention makes it longer than idle)
                ttd = _med([s["ttd_s"] for s in saves[1:]], saves[0]["ttd_s"])
                calib = self._steps(self._k_for(ttd, t_step), system, "calibrate")
                k = self._k_for(max(ttd, calib["ttd_s"]), t_step)
            loop_reps = max(1, self.run.loop.pairs)
            for j in range(loop_reps):
                loop.append(self._loop(system, k, rep * loop_reps + j))
        system.close()
        self.ctx.barrier()
        if self.ctx.rank == 0:
            remove(d)
        return rec, loop

    def _k_for(self, ttd: float, t_step: float) -> int:
        lp = self.run.loop
        return max(lp.min_steps, min(lp.max_steps, math.ceil(lp.span * ttd / max(t_step, 1e-6)) + 1))

    def _steps(self, k: int, system: System | None, tag: str) -> dict:
        pending: Pending | None = None
        stall = None
        steps = []
        t0 = time.perf_counter()
        for i in range(k):
            ts = time.perf_counter()
            self.wl.step()
            steps.append(time.perf_counter() - ts)
            if system is not None and i == 0:
                ts = time.perf_counter()
                pending = system.save(tag)
                stall = time.perf_counter() - ts
        t_end = time.perf_counter()
        out = {"total_s": t_end - t0, "steps_s": steps}
        if pending is not None:
            durable_in_loop = pending.done_at is not None and pending.done_at <= t_end
            pending.wait(WAIT_S)
            out.update(stall_s=stall, ttd_s=pending.ttd_s, durable_in_loop=durable_in_loop,
                       wait_after_loop_s=max(0.0, pending.done_at - t_end))
        return out

    def _loop(self, system: System, k: int, index: int) -> dict:
        """One A/B pair: K steps without a save (A) and K steps with one (B), run back to back in an order
        that alternates from pair to pair (even ``index``: A first), so slow drift of the machine's speed
        falls on both sides equally often. ``overhead_s`` = B - A; the report takes the median over every pair
        of every repetition, with its spread, and flags it as noise where the spread exceeds it."""
        first_without = index % 2 == 0
        before = self._steps(k, None, "") if first_without else None
        w = self._steps(k, system, f"loop{index}")
        without = before if before is not None else self._steps(k, None, "")
        return {"k": k, "order": "AB" if first_without else "BA", "with_s": w["total_s"],
                "without_s": without["total_s"], "overhead_s": w["total_s"] - without["total_s"],
                "steps_with_s": w["steps_s"], "steps_without_s": without["steps_s"],
                "stall_s": w["stall_s"], "ttd_s": w["ttd_s"],
                "durable_in_loop": w["durable_in_loop"], "wait_after_loop_s": w["wait_after_loop_s"]}

    def _growth(self, system: System) -> dict:
        n = self.run.growth.saves
        d = self._dir("growth")
        gc.collect()
        rss0 = rss_bytes()
        try:
            return self._growth_body(system, n, d, rss0)
        except BaseException:
            _close_quietly(system)
            raise

    def _growth_body(self, system: System, n: int, d: str, rss0: int) -> dict:
        system.open(d)
        rss, allocs, staging = [], [], []
        prev = None
        t0 = time.perf_counter()
        for i in range(n):
            tag = f"g{i}"
            system.save(tag).wait(WAIT_S)
            if prev is not None:
                system.delete(prev)
            prev = tag
            rss.append(rss_bytes())
            allocs.append(system.allocations())
            staging.append(system.staging_bytes())
        elapsed = time.perf_counter() - t0
        system.close()
        remove(d)
        base = rss[1] if len(rss) > 1 else rss[0]
        return {"saves": n, "rss_before": rss0, "rss": rss, "allocations": allocs, "staging_bytes": staging,
                "growth_bytes": rss[-1] - base, "max_over_base_bytes": max(rss[1:] or rss) - base,
                "elapsed_s": elapsed}


def _close_quietly(system: System) -> None:
    try:
        system.close()
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        pass


def _loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load averages: other work on a shared machine shows up here."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _med(values: list, default: Any) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else default
