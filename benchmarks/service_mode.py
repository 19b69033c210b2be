"""Thread mode vs service mode of the writer, in one run on this machine.

``python -m benchmarks.service_mode [--mib 128] [--reps 3] [--out results.json]``

For each mode, on a fresh saver warmed up by one save, ``reps`` times (modes alternate):

* **stall**: the save call; **time to durable**: save call → published (the future's result);
* **trainer CPU during the write**: CPU time of the whole training process (all its threads:
  ``time.process_time``) from the save call until the future resolved, minus what the training steps used
  in that time (measured on the training thread with ``time.thread_time``): the writer's own cost to the
  training process;
* **loop overhead**: training steps (a CPU MLP) run while the save is in flight; time lost = wall time of
  those steps minus the same number of steps at the undisturbed step time (measured right before).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from asyncckpt import Config
from asyncckpt.engine import SaveEngine
from asyncckpt.state import flatten


def _state(mib: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = mib * (1 << 20) // 4 // 16
    return {f"layer{i}.weight": torch.randn(n, generator=g) * 0.02 for i in range(16)}


def _net() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    return net, torch.optim.SGD(net.parameters(), lr=1e-3), torch.randn(64, 256)


def _step(net, opt, x) -> None:
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()


def _one(engine: SaveEngine, state: dict, root: str, tag: str, net, opt, x) -> dict:
    base_n = 20
    t = time.perf_counter()
    for _ in range(base_n):
        _step(net, opt, x)
    step_s = (time.perf_counter() - t) / base_n
    cpu0, wall0, steps, step_cpu = time.process_time(), time.perf_counter(), 0, 0.0
    fut = engine.save(lambda: flatten(state, allow_pickle=False), root, tag)
    while not fut.done():
        c = time.thread_time()
        _step(net, opt, x)
        step_cpu += time.thread_time() - c
        steps += 1
    wall = time.perf_counter() - wall0
    res = fut.result(timeout=600)
    return {"stall_s": res.stall_s, "durable_s": res.time_to_durable_s,
            "trainer_cpu_s": time.process_time() - cpu0 - step_cpu,
            "lost_s": max(0.0, wall - res.stall_s - steps * step_s), "steps": steps}


def run(mib: int, reps: int, root: str) -> dict:
    state = _state(mib)
    net, opt, x = _net()
    out: dict[str, list] = {"thread": [], "service": []}
    engines = {m: SaveEngine(Config.from_dict({"writer": {"mode": m}})) for m in out}
    try:
        for m, e in engines.items():
            e.save(lambda: flatten(state, allow_pickle=False), os.path.join(root, m), "warm").result(timeout=600)
        for r in range(reps):
            for m in (("thread", "service") if r % 2 == 0 else ("service", "thread")):
                out[m].append(_one(engines[m], state, os.path.join(root, m), f"r{r}", net, opt, x))
                shutil.rmtree(os.path.join(root, m, f"r{r}"), ignore_errors=True)
    finally:
        for e in engines.values():
            e.close(timeout=600)
    return {m: {k: _spread([v[k] for v in runs]) for k in runs[0]} for m, runs in out.items()}


def _spread(values: list[float]) -> dict:
    """Median and quartiles of one figure over the repetitions; ``noise``: its spread exceeds its value."""
    q1, med, q3 = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3)
    return {"median": med, "q1": q1, "q3": q3, "noise": (q3 - q1) > abs(med)}


def _cell(f: dict, scale: float = 1.0, digits: int = 2) -> str:
    text = f"{f['median'] * scale:.{digits}f} ({f['q1'] * scale:.{digits}f}–{f['q3'] * scale:.{digits}f})"
    return text + (" noise" if f["noise"] else "")


def _ratio(a: dict, b: dict) -> str:
    if a["noise"] or b["noise"] or b["median"] <= 0:
        return "noise (a spread exceeds its value)"
    return f"{a['median'] / b['median']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="asyncckpt-service-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        result = run(args.mib, args.reps, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t, s = result["thread"], result["service"]
    print(f"{args.mib} MiB state, median (quartiles) of {args.reps} saves per mode, {os.cpu_count()} CPUs")
    print("| mode | stall (ms) | time to durable (s) | trainer CPU during write (s) | steps' time lost (s) |")
    print("|---|---:|---:|---:|---:|")
    for m, v in result.items():
        print(f"| {m} | {_cell(v['stall_s'], 1e3, 1)} | {_cell(v['durable_s'])} | {_cell(v['trainer_cpu_s'])} | "
              f"{_cell(v['lost_s'])} |")
    print(f"service/thread: durable {_ratio(s['durable_s'], t['durable_s'])}, trainer CPU "
          f"{_ratio(s['trainer_cpu_s'], t['trainer_cpu_s'])}, lost {_ratio(s['lost_s'], t['lost_s'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mib": args.mib, "reps": args.reps, "cpus": os.cpu_count(), **result}, f, indent=1)


if __name__ == "__main__":
    main()
