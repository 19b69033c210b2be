"""One measurement process (or one rank of several): ``python -m benchmarks.worker JOB.json``.

The job names the workload, the tasks (the floors, and/or systems with their round) and where to write the
result. With several ranks the launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; every rank
initialises gloo, builds the same workload (DDP-wrapped, so its state is replicated) and runs the same
tasks; each writes its own result file.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything can import deepspeed
# DCP without a process group says so on every call
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    world = int(job["world"])
    out: dict = {"rank": rank, "world": world, "tasks": [], "status": "ok"}
    result_path = job["result"].format(rank=rank)
    try:
        _run(job, rank, world, out)
    except Exception as exc:  # noqa: BLE001 - reported to the runner
        out["status"] = "failed"
        out["reason"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        log(out["traceback"])
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, default=_jsonable)
    os.replace(tmp, result_path)
    return 0 if out["status"] == "ok" else 1


def _run(job: dict, rank: int, world: int, out: dict) -> None:
    import torch

    from .measure import Measurer
    from .spec import RunSpec
    from .systems import SYSTEMS, Ctx
    from .workload import build

    run = RunSpec.from_dict(job["run"])
    spec = next(w for w in run.workloads if w.name == job["workload"])
    if job["dist"]:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(job.get("pg_timeout_s", 600))))
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ctx = Ctx(rank, world)
    t0 = time.perf_counter()
    wl = build(spec, ddp=bool(job["dist"]))
    out["workload"] = wl.describe()
    out["torch_threads"] = torch.get_num_threads()
    if rank == 0:
        log(f"[{spec.name} ws{world}] workload: {wl.raw_bytes / 2**20:.1f} MiB of {spec.dtype} state, "
            f"{wl.n_params / 1e6:.1f} M params, built in {time.perf_counter() - t0:.1f} s")
    workdir = job["workdir"]
    os.makedirs(workdir, exist_ok=True)
    for task in job["tasks"]:
        if task["kind"] == "floors":
            from .floors import measure_floors

            if rank == 0:
                log(f"[{spec.name} ws{world}] floors")
                fl = run.floors
                res = measure_floors(wl, workdir, reps=fl.reps, write_mib=fl.write_mib, codec_reps=fl.codec_reps,
                                     codec_config=run.asyncckpt)
                out["tasks"].append({"kind": "floors", "result": res})
            continue
        name = task["name"]
        cls = SYSTEMS[name]
        why = cls.unavailable(world)
        if why:
            out["tasks"].append({"kind": "system", "name": name, "round": task["round"],
                                 "result": {"system": name, "status": "unavailable", "reason": why}})
            if rank == 0:
                log(f"[{spec.name} ws{world}] {name}: unavailable: {why}")
            continue
        if rank == 0:
            log(f"[{spec.name} ws{world}] {name} (round {task['round']})")
        options = {"config": dict(run.asyncckpt)} if cls.takes_asyncckpt_config else {}
        m = Measurer(cls, wl, ctx, run, workdir, options=options, round_index=task["round"],
                     growth=task["round"] == 0, log=log)
        res = m.measure()
        out["tasks"].append({"kind": "system", "name": name, "round": task["round"], "result": res})
    if job["dist"]:
        import torch.distributed as dist

        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _jsonable(obj):
    try:
        import torch

        if isinstance(obj, torch.dtype):
            return str(obj)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait for library threads (DeepSpeed, gloo) at interpreter exit
