"""What the Lightning plugin's stall is made of, next to Lightning's own AsyncCheckpointIO, on one state.

``python -m benchmarks.integrations_stall [--saves 6] [--workload gpt_0p5gb]`` (a workload of
``benchmarks/configs/integrations.yaml``). Each round, in turn: Lightning's ``AsyncCheckpointIO`` call (it
clones every tensor on the calling thread); asyncckpt's plugin call, split into its ``flatten`` (the walk of
Lightning's checkpoint dict), the staging copy into the reused host buffer (``Slot.stage``) and the rest
(plugin and engine bookkeeping); and the same copy as a bare ``torch.clone`` of every tensor. Every save is
waited for before the next one. Prints the first save and the median and minimum of the warm ones, in ms.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from .spec import RunSpec
from .workload import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--workload", default="gpt_0p5gb")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "integrations.yaml"))
    args = ap.parse_args()

    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LightningAsync, TorchCheckpointIO

    import asyncckpt.integrations.lightning as plugin_module
    import asyncckpt.staging

    spec = next(w for w in RunSpec.from_yaml(args.config).workloads if w.name == args.workload)
    wl = build(spec)
    root = tempfile.mkdtemp(prefix="asyncckpt-stall-")
    times: dict[str, list[float]] = {k: [] for k in ("lightning_async", "plugin", "flatten", "copy", "rest", "clone")}

    def timed(fn, label):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[label].append(time.perf_counter() - t)
        return run

    plugin_module.flatten = timed(plugin_module.flatten, "flatten")
    asyncckpt.staging.Slot.stage = timed(asyncckpt.staging.Slot.stage, "copy")
    plugin = plugin_module.AsyncCheckpointIO({"writer": {"fsync": False}})

    def checkpoint(step):  # what Lightning's Trainer hands a CheckpointIO (the parts that are state)
        return {"state_dict": wl.module.state_dict(), "optimizer_states": [wl.optimizer.state_dict()],
                "global_step": step}

    try:
        for i in range(args.saves):
            theirs = LightningAsync(TorchCheckpointIO())
            path = os.path.join(root, f"lightning-{i}.ckpt")
            state = checkpoint(i)
            t = time.perf_counter()
            theirs.save_checkpoint(state, path)
            times["lightning_async"].append(time.perf_counter() - t)
            theirs.teardown()
            os.unlink(path)
            state = checkpoint(i)
            t = time.perf_counter()
            plugin.save_checkpoint(state, os.path.join(root, "plugin", f"s{i}.ckpt"))
            times["plugin"].append(time.perf_counter() - t)
            times["rest"].append(times["plugin"][-1] - times["flatten"][-1] - times["copy"][-1])
            plugin.wait()
            tensors = wl.state_tensors()
            t = time.perf_counter()
            clones = [x.clone() for x in tensors]
            times["clone"].append(time.perf_counter() - t)
            del clones
    finally:
        plugin.teardown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{spec.name}: {wl.raw_bytes / 2**20:.1f} MiB in {len(wl.state_tensors())} tensors, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")
    for label, values in times.items():
        warm = values[1:] or values
        print(f"{label:16s} first {values[0] * 1e3:8.1f}   warm median {statistics.median(warm) * 1e3:8.1f}"
              f"   min {min(warm) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
