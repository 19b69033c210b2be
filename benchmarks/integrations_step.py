"""The framework integrations' stall as training sees it: call time and effective stall, in one run.

``python -m benchmarks.integrations_step [--workload gpt_0p5gb] [--saves 3] [--base-steps 3] [--after-steps 2]
[--rounds 1] [--systems a,b] [--out benchmarks/results/integrations]`` (a workload of ``benchmarks/configs/integrations.yaml``).

The stall of the main benchmark is the save call. With ``snapshot: lazy`` the call returns before the copy,
which the next training step waits for, so the call alone says little: this run measures, per save, with the
definitions of the GPU benchmark (:mod:`benchmarks.gpu`, whose ``Trainer`` it uses):

* **call**: the save call on the training thread;
* **effective stall**: how much later the first step after the call finishes than a base step would (call
  start → end of that step, minus the median of ``--base-steps`` steps measured just before);
* **training lost**: the ``--after-steps`` steps after the call, their wall time from the call minus as many
  base steps (what the background work costs the steps that run beside it).

Unlike :func:`benchmarks.gpu.measure_save`, a fixed number of steps follows each call (Lightning's own plugin
and DeepSpeed's default engine report durability only when waited for). Every system runs in its own process
(``--systems`` in turn, ``--rounds`` times: the machine's drift falls on every system alike), each saving
``1 + --saves`` times on the same workload; the first save of each process is reported apart. Systems: Lightning's ``AsyncCheckpointIO`` (``lightning_async``), asyncckpt's Lightning plugin eager
(``asyncckpt_lightning``) and lazy (``asyncckpt_lightning_lazy``), DeepSpeed's default engine (``deepspeed``) and
DeepSpeed after ``asyncckpt.integrations.deepspeed.enable`` (``deepspeed_asyncckpt``), as in
:mod:`benchmarks.systems`. Writes ``step_delay.json`` and ``step_delay.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything can import deepspeed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "benchmarks", "configs", "integrations.yaml")
WAIT_S = 1800.0
# name -> (benchmarks.systems class, asyncckpt Config keys or None, the framework's own saver it is held to)
SYSTEMS = {
    "lightning_async": ("LightningAsync", None, None),
    "asyncckpt_lightning": ("AsyncCkptLightning", {}, "lightning_async"),
    "asyncckpt_lightning_lazy": ("AsyncCkptLightning", {"snapshot": "lazy"}, "lightning_async"),
    "deepspeed": ("DeepSpeed", None, None),
    "deepspeed_asyncckpt": ("DeepSpeedAsyncCkpt", {}, "deepspeed"),
}
LIMIT = 0.2  # issue 12: stall <= 0.2 x the framework's own saver


def measure(name: str, args) -> dict:
    """One system, in this process: ``1 + saves`` saves, each followed by ``after_steps`` steps."""
    from . import systems as S
    from .gpu import GpuSpec, Trainer
    from .spec import RunSpec

    spec = next(w for w in RunSpec.from_yaml(args.config).workloads if w.name == args.workload)
    trainer = Trainer(GpuSpec(name="integrations_step", workload=spec, systems=()))
    cls_name, config, _ = SYSTEMS[name]
    options = {} if config is None else {"config": dict(config)}
    system = getattr(S, cls_name)(trainer.wl, S.Ctx(0, 1), options)
    out = {"system": name, "notes": system.notes, "config": config, "loadavg_before": list(os.getloadavg()),
           "raw_bytes": trainer.wl.raw_bytes, "saves": []}
    workdir = tempfile.mkdtemp(prefix=f"asyncckpt-step-{name}-", dir=args.workdir)
    try:
        system.open(workdir)
        trainer.step()  # the optimizer's state exists before the first save
        prev = None
        for i in range(1 + args.saves):
            base = trainer.base_step(args.base_steps)
            t0 = time.perf_counter()
            pending = system.save(f"s{i}")
            call = time.perf_counter() - t0
            ends = [trainer.step() for _ in range(args.after_steps)]
            pending.wait(WAIT_S)
            out["saves"].append({"call_s": call, "base_step_s": base, "effective_stall_s": ends[0] - t0 - base,
                                 "training_lost_s": ends[-1] - t0 - len(ends) * base})
            if prev is not None:
                system.delete(prev)
            prev = f"s{i}"
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out["loadavg_after"] = list(os.getloadavg())
    return out


def run(args) -> dict:
    doc = {"workload": args.workload, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpus": os.cpu_count(), "saves": args.saves, "base_steps": args.base_steps,
           "after_steps": args.after_steps, "rounds": args.rounds, "systems": {n: [] for n in args.systems}}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for name in args.systems:
            doc["systems"][name].append(_launch(name, args))
    doc["elapsed_s"] = time.perf_counter() - t0
    return doc


def _launch(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "benchmarks.integrations_step", "--job", name, "--result", result,
               "--workload", args.workload, "--config", args.config, "--saves", str(args.saves),
               "--base-steps", str(args.base_steps), "--after-steps", str(args.after_steps)]
        print(f"[integrations_step] {name}", file=sys.stderr, flush=True)
        code = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout_s).returncode
        try:
            with open(result) as f:
                return json.load(f)
        except OSError:
            return {"system": name, "failed": f"exited with code {code} without a result"}


# ------------------------------------------------------------------------------------------------ report
def _warm(runs: list[dict], key: str) -> list[float]:
    return [s[key] for r in runs for s in r.get("saves", [])[1:]]


def _first(runs: list[dict], key: str) -> list[float]:
    return [r["saves"][0][key] for r in runs if r.get("saves")]


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.0f} ms" if abs(x) < 1 else f"{x:.2f} s"


def _summary(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{_ms(statistics.median(values))} ({_ms(min(values))} – {_ms(max(values))})"


def report(doc: dict) -> str:
    systems = doc["systems"]
    some = next((r for runs in systems.values() for r in runs if "raw_bytes" in r), {})
    lines = [f"# Integrations: call time and effective stall (`{doc['workload']}`)", "",
             f"{doc['date']} · {doc['cpus']} CPUs · {some.get('raw_bytes', 0) / 2**20:.1f} MiB of state · "
             f"{doc['rounds']} round(s) × {doc['saves']} warm saves per system (after a first one each) · base step = median of "
             f"{doc['base_steps']} steps just before each save · {doc['after_steps']} steps after each call · "
             f"run took {doc['elapsed_s'] / 60:.1f} min", "",
             "Warm medians (min – max). *Call*: the save call. *Effective stall*: end of the first step after the "
             "call − call start − base step. *Training lost*: the steps after the call, from the call, minus as "
             "many base steps. Each system in its own process per round, the systems in turn, all in this one run.", "",
             "| system | call | effective stall | training lost | base step | first save: call / effective | load average |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in systems.items():
        failed = [r["failed"] for r in runs if "failed" in r]
        if failed:
            lines.append(f"| `{name}` | failed: {failed[0]} | | | | | |")
            continue
        loads = ", ".join(f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f}" for r in runs)
        lines.append(f"| `{name}` | {_summary(_warm(runs, 'call_s'))} | {_summary(_warm(runs, 'effective_stall_s'))} | "
                     f"{_summary(_warm(runs, 'training_lost_s'))} | {_summary(_warm(runs, 'base_step_s'))} | "
                     f"{_summary(_first(runs, 'call_s'))} / {_summary(_first(runs, 'effective_stall_s'))} | {loads} |")
    lines += ["", f"Targets (issue 12: stall ≤ {LIMIT} × the framework's own saver), ratios of warm medians:", "",
              "| system | vs | call ratio | effective-stall ratio | result (effective stall) |", "|---|---|---|---|---|"]
    for name, (_, _, peer) in SYSTEMS.items():
        if peer is None or name not in systems or peer not in systems:
            continue
        mine, theirs = systems[name], systems[peer]
        ratio = {}
        for key in ("call_s", "effective_stall_s"):
            a, b = _warm(mine, key), _warm(theirs, key)
            ratio[key] = statistics.median(a) / statistics.median(b) if a and b and statistics.median(b) > 0 else None
        eff = ratio["effective_stall_s"]
        result = "N/A" if eff is None else "PASS" if eff <= LIMIT else "MISS"
        lines.append(f"| `{name}` | `{peer}` | " + " | ".join("–" if r is None else f"{r:.2f}×"
                                                             for r in ratio.values()) + f" | **{result}** |")
    lines += ["", "Systems:", ""] + [f"* `{n}`: {runs[0].get('notes', '')}" + (
        f" — config {json.dumps(runs[0]['config'])}" if runs[0].get("config") else "") for n, runs in systems.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="gpt_0p5gb")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=3)
    ap.add_argument("--after-steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "integrations"))
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        with open(args.result, "w") as f:
            json.dump(measure(args.job, args), f)
        sys.stdout.flush()
        os._exit(0)  # do not wait for library threads (DeepSpeed, gloo) at interpreter exit
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    doc = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_delay.json"), "w") as f:
        json.dump(doc, f, indent=1)
    text = report(doc)
    with open(os.path.join(args.out, "step_delay.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
