"""Run a benchmark configuration: launch the measurement processes (one per system, or one for all with
``isolate: false``; ``world`` processes on gloo with several ranks), enforce deadlines, collect their raw
results into one document, and hand it to the report.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

from .spec import RunSpec

RANK_EXIT_GRACE_S = 120.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, job_dir: str, world: int, timeout_s: float, log: Callable[[str], None]) -> list[dict]:
    """Run one job on ``world`` ranks (processes); returns each rank's result document. A rank that dies,
    fails or outlives the deadline yields an error document instead (and its peers are killed)."""
    os.makedirs(job_dir, exist_ok=True)
    job_path = os.path.join(job_dir, "job.json")
    job = {**job, "result": os.path.join(job_dir, "rank{rank}.json")}
    for r in range(world):
        try:
            os.remove(job["result"].format(rank=r))
        except FileNotFoundError:
            pass
    with open(job_path, "w") as f:
        json.dump(job, f)
    port = free_port()
    env_base = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1"}
    procs = []
    for r in range(world):
        env = dict(env_base)
        if job["dist"]:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                       LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.worker", job_path], cwd=ROOT, env=env,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if world > 1 and any(p.poll() is not None for p in procs):
                # a rank is gone (ranks finish together, after a final barrier): the others get a grace
                # period, then they are stopped rather than left waiting in a collective until the gloo timeout
                deadline = min(deadline, time.monotonic() + RANK_EXIT_GRACE_S)
            time.sleep(0.2)
    finally:  # also on Ctrl-C / SIGTERM: the workers run in their own sessions and would outlive us
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
    out = []
    for r, p in enumerate(procs):
        path = job["result"].format(rank=r)
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            why = (f"timed out after {timeout_s:.0f} s (killed)" if timed_out and p.returncode in (-9, None)
                   else f"process exited with code {p.returncode} without a result"
                   + (" (killed by a signal: out of memory?)" if (p.returncode or 0) < 0 else ""))
            log(f"  rank {r}: {why}")
            out.append({"rank": r, "world": world, "status": "failed", "reason": why, "tasks": []})
    return out


def environment(workdir: str) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    fs = None
    try:
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if os.path.abspath(workdir).startswith(mnt) and len(mnt) > len(best):
                    best, fs = mnt, f"{kind} on {mnt} ({dev})"
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    status = git("status", "--porcelain", "--", "asyncckpt")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "memory_bytes": mem, "workdir_fs": fs,
        "versions": {p: version(p) for p in ("torch", "deepspeed", "asyncckpt", "zstandard", "numpy")},
        "asyncckpt_commit": git("rev-parse", "--short", "HEAD"),
        "asyncckpt_dirty": bool(status) if status is not None else None,
    }


def _merge_ranks(docs: list[dict], name: str, round_index: int) -> dict:
    """One system result out of every rank's: times are the slowest rank's (a save is done when every rank
    is), memory is summed over the ranks (node totals), bytes on disk come from rank 0."""
    per_rank = []
    for d in docs:
        task = next((t for t in d.get("tasks", []) if t.get("name") == name and t.get("round") == round_index), None)
        per_rank.append(task["result"] if task else {"status": "failed", "reason": d.get("reason", "no result")})
    bad = [r for r in per_rank if r.get("status") != "ok"]
    if bad:
        # the rank that raised explains more than a peer that was killed while waiting for it
        res = dict(sorted(bad, key=lambda r: "traceback" not in r)[0])
        res["ranks"] = [{k: r.get(k) for k in ("status", "reason")} for r in per_rank]
        return res
    if len(per_rank) == 1:
        return per_rank[0]
    base = json.loads(json.dumps(per_rank[0]))
    for i, rep in enumerate(base["reps"]):
        reps = [r["reps"][i] for r in per_rank]
        for which in ("first",):
            rep[which] = _merge_save([r[which] for r in reps])
        rep["warm"] = [_merge_save([r["warm"][j] for r in reps]) for j in range(len(rep["warm"]))]
        for key in ("load_s", "open_s", "prepare_s"):
            if key in rep:
                rep[key] = max(r.get(key) or 0.0 for r in reps)
        for key in ("staging_bytes", "rss_before", "peak_rss"):
            vals = [r.get(key) for r in reps]
            rep[key] = sum(vals) if all(v is not None for v in vals) else None
    base["ranks"] = per_rank
    return base


def _merge_save(saves: list[dict]) -> dict:
    out = {"tag": saves[0]["tag"], "stall_s": max(s["stall_s"] for s in saves),
           "ttd_s": max(s["ttd_s"] for s in saves if s["ttd_s"] is not None),
           "ranks": [{k: v for k, v in s.items() if k != "tag"} for s in saves]}
    return out


def _merge_rounds(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return results[0]
    base = dict(ok[0])
    base["reps"] = [rep for r in ok for rep in r.get("reps", [])]
    base["loop"] = [lp for r in ok for lp in r.get("loop", [])]
    base["growth"] = next((r["growth"] for r in ok if r.get("growth")), None)
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        base["failed_rounds"] = [{k: r.get(k) for k in ("status", "reason")} for r in failed]
    return base


def run(spec: RunSpec, out_dir: str, *, log: Callable[[str], None] = print, keep_workdir: bool = False) -> dict:
    workdir = os.path.join(out_dir, "tmp", spec.name)
    job_root = os.path.join(workdir, "jobs")
    os.makedirs(workdir, exist_ok=True)
    doc: dict[str, Any] = {"name": spec.name, "environment": environment(workdir), "config": spec.to_dict(),
                           "runs": []}
    t_start = time.perf_counter()
    try:
        _run_all(spec, doc, workdir, job_root, log)
    finally:  # checkpoints can be gigabytes: removed even when the run is interrupted
        doc["elapsed_s"] = time.perf_counter() - t_start
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                os.rmdir(os.path.join(out_dir, "tmp"))
            except OSError:
                pass
    return doc


def _run_all(spec: RunSpec, doc: dict, workdir: str, job_root: str, log: Callable[[str], None]) -> None:
    for wl in spec.workloads:
        for world in spec.world_sizes:
            rec: dict[str, Any] = {"workload": wl.name, "world": world, "floors": None, "systems": {},
                                   "workload_info": None}
            dist = spec.distributed
            tasks: list[dict] = []
            if spec.floors.enabled and world == 1:
                tasks.append({"kind": "floors"})
            for r in range(spec.rounds):
                tasks.extend({"kind": "system", "name": s, "round": r} for s in spec.systems)
            if spec.isolate or world > 1:
                groups = [[t] for t in tasks]
            else:
                groups = [tasks]
            by_system: dict[str, list[dict]] = {}
            for gi, group in enumerate(groups):
                job = {"run": spec.to_dict(), "workload": wl.name, "world": world, "dist": dist,
                       "tasks": group, "workdir": os.path.join(workdir, "ckpt"),
                       "pg_timeout_s": min(spec.timeout_s, 1800)}
                docs = launch(job, os.path.join(job_root, f"{wl.name}-ws{world}-{gi}"), world,
                              spec.timeout_s * (1 if spec.isolate else max(1, len(group))), log)
                if rec["workload_info"] is None and docs and docs[0].get("workload"):
                    rec["workload_info"] = docs[0]["workload"]
                for t in group:
                    if t["kind"] == "floors":
                        task = next((x for x in docs[0].get("tasks", []) if x["kind"] == "floors"), None)
                        rec["floors"] = task["result"] if task else {"error": docs[0].get("reason", "no result")}
                        continue
                    by_system.setdefault(t["name"], []).append(_merge_ranks(docs, t["name"], t["round"]))
            for name in spec.systems:
                rec["systems"][name] = _merge_rounds(by_system.get(name, [{"status": "failed", "reason": "not run"}]))
            doc["runs"].append(rec)
