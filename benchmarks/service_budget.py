"""Several local ranks, one writer service, the node's thread budget (issue 11), measured:

``torchrun --standalone --nproc-per-node 2 -m benchmarks.service_budget [--mib 128] [--threads 2] [--saves 3]
[--out FILE]`` (``make bench-service``).

Every rank saves its own state (``--mib`` per rank) through ``writer.mode: service`` with
``writer.threads_per_node: --threads``, all ranks at once, ``--saves`` times after one warm-up save. Rank 0
samples, every 5 ms while the saves run, the node's writer service and every training process through
``/proc`` (threads are told apart by their OS names, :func:`asyncckpt.threads.os_thread_name`:
``acs-encode_N`` are the service's encode threads, the budget; ``acs-file_N`` its file threads, ``ac-*`` the
training process's own asyncckpt threads):

* the writer service each rank used (the node should have one);
* the service's threads by role, and the most encode threads running (state R) at one sample;
* CPU time by role over the saves' wall time (cores used on average), in the service and in the training
  processes (whose asyncckpt threads should only stage and hand over: no encoding, no writing).

The budget is honoured when the service runs ``--threads`` encode threads whatever the number of ranks, no
sample sees more running, and its encode threads use at most ``--threads`` cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from asyncckpt import Config
from asyncckpt.engine import SaveEngine
from asyncckpt.state import flatten
from asyncckpt.threads import start_thread

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_ROLE = re.compile(r"_\d+$")


def threads_of(pid: int) -> dict[int, tuple[str, str, float]]:
    """Each thread of ``pid``: tid -> (OS name, state letter, CPU seconds so far)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(tid)] = (name, fields[0], (int(fields[11]) + int(fields[12])) * TICK_S)
    return out


def role(name: str) -> str:
    return _ROLE.sub("", name)


class Sampler:
    """Samples the threads of some processes until stopped: CPU seconds by (process label, role) over the
    window, threads by role, and the most threads of one role running at once."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.005):
        self.pids, self.period_s = pids, period_s
        self.first = {label: threads_of(pid) for label, pid in pids.items()}
        self.last = dict(self.first)
        self.running_max: dict[tuple[str, str], int] = defaultdict(int)
        self.samples = 0
        self._stop = threading.Event()
        self.t0 = time.perf_counter()
        self._thread = start_thread(self._run, "bench-sampler")  # its own OS name: not counted as training's

    def _run(self) -> None:
        while not self._stop.is_set():
            for label, pid in self.pids.items():
                now = threads_of(pid)
                if now:
                    self.last[label] = {**self.last[label], **now}
                running: dict[str, int] = defaultdict(int)
                for name, state, _ in now.values():
                    if state == "R":
                        running[role(name)] += 1
                for r, n in running.items():
                    key = (label, r)
                    self.running_max[key] = max(self.running_max[key], n)
            self.samples += 1
            self._stop.wait(self.period_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=30)
        wall = time.perf_counter() - self.t0
        out: dict = {"wall_s": wall, "samples": self.samples, "processes": {}}
        for label in self.pids:
            cpu: dict[str, float] = defaultdict(float)
            count: dict[str, int] = defaultdict(int)
            for tid, (name, _, seconds) in self.last[label].items():
                before = self.first[label].get(tid, (name, "", 0.0))[2]
                cpu[role(name)] += seconds - before
                count[role(name)] += 1
            out["processes"][label] = {
                r: {"threads": count[r], "cpu_s": cpu[r], "cores": cpu[r] / wall,
                    "running_max": self.running_max.get((label, r), 0)} for r in sorted(count)}
        return out


def _state(rank: int, mib: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    n = mib * (1 << 20) // 4 // 8
    return {f"layer{i}.weight": torch.randn(n, generator=g) * 0.02 for i in range(8)}


def run(args: argparse.Namespace, root: str) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    state = _state(rank, args.mib)
    config = Config.from_dict({"writer": {"mode": "service", "threads_per_node": args.threads}})
    engine = SaveEngine(config)
    try:
        engine.save(lambda: flatten(state, allow_pickle=False), root, "warm").result(timeout=600)
        pids = [None] * world
        dist.all_gather_object(pids, {"trainer": os.getpid(), "service": engine.service.service_pid})
        windows = []
        for i in range(args.saves):
            dist.barrier()
            sampler = None
            if rank == 0:
                labels = {"service": pids[0]["service"], **{f"trainer{r}": p["trainer"] for r, p in enumerate(pids)}}
                sampler = Sampler(labels)
            result = engine.save(lambda: flatten(state, allow_pickle=False), root, f"s{i}").result(timeout=600)
            dist.barrier()  # every rank's save is published
            if sampler is not None:
                windows.append({**sampler.stop(), "time_to_durable_s": result.time_to_durable_s})
            if rank == 0:
                shutil.rmtree(os.path.join(root, f"s{i}"), ignore_errors=True)
    finally:
        engine.close(timeout=600)
    if rank != 0:
        return None
    return {"ranks": world, "mib_per_rank": args.mib, "threads_per_node": args.threads, "cpus": os.cpu_count(),
            "services": sorted({p["service"] for p in pids}), "windows": windows}


def summary(doc: dict) -> str:
    budget = doc["threads_per_node"]
    lines = [f"{doc['ranks']} local ranks x {doc['mib_per_rank']} MiB, writer.threads_per_node {budget}, "
             f"{doc['cpus']} CPUs, {len(doc['windows'])} saves; writer services used by the ranks: "
             f"{len(doc['services'])} (pid {', '.join(map(str, doc['services']))})", "",
             "| process | threads (role: count) | CPU cores used during the save (role: cores) | most running at once |",
             "|---|---|---|---|"]
    last = doc["windows"][-1]["processes"]
    wall = sum(w["wall_s"] for w in doc["windows"])
    for label in last:
        roles = {}
        for w in doc["windows"]:
            for r, v in w["processes"][label].items():
                agg = roles.setdefault(r, {"threads": 0, "cpu_s": 0.0, "running_max": 0})
                agg["threads"] = max(agg["threads"], v["threads"])
                agg["cpu_s"] += v["cpu_s"]
                agg["running_max"] = max(agg["running_max"], v["running_max"])
        threads = ", ".join(f"{r}: {v['threads']}" for r, v in roles.items())
        cores = ", ".join(f"{r}: {v['cpu_s'] / wall:.2f}" for r, v in roles.items() if v["cpu_s"] >= 0.005)
        running = ", ".join(f"{r}: {v['running_max']}" for r, v in roles.items() if v["running_max"])
        lines.append(f"| {label} | {threads} | {cores or '-'} | {running or '-'} |")
    enc = [w["processes"]["service"].get("acs-encode", {}) for w in doc["windows"]]
    n_enc = max((e.get("threads", 0) for e in enc), default=0)
    run_max = max((e.get("running_max", 0) for e in enc), default=0)
    cores = sum(e.get("cpu_s", 0.0) for e in enc) / wall
    ok = len(doc["services"]) == 1 and n_enc == budget and run_max <= budget and cores <= budget * 1.02
    lines += ["", f"budget: one service {'yes' if len(doc['services']) == 1 else 'NO'}; encode threads {n_enc} "
                  f"(budget {budget}); most running at once {run_max}; encode cores used {cores:.2f} (≤ {budget}) "
                  f"-> {'PASS' if ok else 'MISS'}; wall {wall:.2f} s over the saves"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="state per rank")
    parser.add_argument("--threads", type=int, default=2, help="writer.threads_per_node")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    root = tempfile.mkdtemp(prefix="asyncckpt-budget-", dir=os.environ.get("BENCH_DIR")) if dist.get_rank() == 0 else ""
    box = [root]
    dist.broadcast_object_list(box)
    try:
        doc = run(args, box[0])
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(box[0], ignore_errors=True)
        dist.destroy_process_group()
    if doc is not None:
        print(summary(doc))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
