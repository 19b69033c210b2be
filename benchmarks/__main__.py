"""``python -m benchmarks --config benchmarks/configs/<name>.yaml [--out DIR] [--reps N] [--systems a,b]``

Writes ``DIR/<name>/results.json`` (every raw repetition), ``results.md`` (medians, ratios, targets) and
``results.png``; checkpoints go to ``DIR/tmp/<name>/`` (same disk for every system) and are removed at the
end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import report, runner, targets
from .spec import SYSTEM_NAMES, RunSpec, SpecError

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="workload YAML (benchmarks/configs/*.yaml)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per system (overrides the YAML)")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated subset of the systems (built in: {', '.join(SYSTEM_NAMES)}; "
                         "plugins may add more)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and job files under OUT/tmp")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # unwind (and stop the worker processes) on SIGTERM too
    try:
        spec = RunSpec.from_yaml(args.config)
        spec = spec.with_overrides(reps=args.reps,
                                   systems=[s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None)
    except (SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"benchmark {spec.name}: {len(spec.workloads)} workload(s) x world sizes {list(spec.world_sizes)}, "
        f"systems {', '.join(spec.systems)}, {spec.reps} rep(s)")
    doc = runner.run(spec, args.out, log=log, keep_workdir=args.keep)
    report.summarize(doc)
    doc["targets"] = targets.evaluate(doc)
    dest = os.path.join(args.out, spec.name)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=repr)
    have_plot = report.plot(doc, os.path.join(dest, "results.png"))
    if not have_plot:
        log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    md = report.markdown(doc, doc["targets"], "results.png" if have_plot else None)
    with open(os.path.join(dest, "results.md"), "w") as f:
        f.write(md)
    log(f"wrote {dest}/results.json, results.md{', results.png' if have_plot else ''}")
    for t in doc["targets"]:
        log(f"  {t['result']:4}  {t['run']}: {t['target']}: {t['measured']}")
    failed = [(r["workload"], n, s.get("reason")) for r in doc["runs"] for n, s in r["systems"].items()
              if s.get("status") not in ("ok", "unavailable")]
    for wl, n, why in failed:
        log(f"  system {n} failed on {wl}: {why}")
    return 0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
