"""The GPU benchmark (issue 10, item 7): ``python -m benchmarks.gpu --config benchmarks/configs/gpu_10gb.yaml
[--smoke] [--out DIR] [--systems a,b]``.

One GPT + AdamW state of about 10 GB on one GPU; every system saves it once cold (a fresh saver; asyncckpt's
is built ``saver_lead_s`` before its first save while training runs, the time its background pinning gets;
the peers allocate in their first save whenever it comes) and ``warm_saves`` more times, then loads it back.
Training steps run (each synchronized) from every save call until the save is durable, so per save:

* **call time**: the save call on the training thread;
* **effective stall**: how much later the first step after the call finishes than a base step would
  (call start → end of that step, minus the median of ``base_steps`` steps measured just before);
* **training time lost**: the steps from the call until durable, their wall time minus as many base steps;
* **time to durable**, **load time** (restore in place, synchronized) and **peak host memory** (peak RSS
  during the save, over RSS before the saver existed).

Floors, in their own process before the systems: pinned device-to-host copy of the state, device-to-device
copy, the pinning rate (allocating the pinned buffer) and the disk (sequential write + fsync). Each system runs
in its own process (``isolate``) so that no pinned-memory cache or allocator state carries over. A system
whose configuration is refused, or that fails, is recorded with its error and the run goes on; systems marked
``cuda_only`` are skipped where CUDA is not available. ``--smoke`` uses the config's ``smoke:`` overrides
(a tiny model on CPU, one process) to check the script end to end.

Writes ``DIR/<name>/results.json`` (every save), ``results.md`` (table, floors, targets) and ``results.png``
(matplotlib, if installed).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping

from .spec import SpecError, WorkloadSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")
WAIT_S = 1800.0


@dataclass(frozen=True)
class GpuSystem:
    """One system of the run: ``kind`` picks the adapter, ``config`` is passed to it (asyncckpt: Config keys)."""

    name: str
    kind: str
    cuda_only: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    workload: WorkloadSpec
    systems: tuple[GpuSystem, ...]
    warm_saves: int = 1
    base_steps: int = 5
    saver_lead_s: float = 10.0
    floor_reps: int = 2
    disk_floor_mib: int = 4096
    isolate: bool = True
    timeout_s: float = 600.0
    tf32: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, smoke: bool = False, default_name: str = "gpu") -> "GpuSpec":
        data = dict(data)
        overrides = data.pop("smoke", None) or {}
        if smoke:
            _only(overrides, {f.name for f in dataclasses.fields(cls)} - {"name", "systems"}, "smoke.")
            data.update(overrides)
        _only(data, {f.name for f in dataclasses.fields(cls)}, "")
        wl = data.pop("workload", None)
        if not isinstance(wl, Mapping):
            raise SpecError("'workload' must be a mapping (a WorkloadSpec)")
        _only(wl, {f.name for f in dataclasses.fields(WorkloadSpec)}, "workload.")
        systems = data.pop("systems", None)
        if not systems or not isinstance(systems, (list, tuple)):
            raise SpecError("'systems' must be a non-empty list of {name, kind, cuda_only, config}")
        parsed = []
        for i, s in enumerate(systems):
            if not isinstance(s, Mapping):
                raise SpecError(f"systems[{i}] must be a mapping")
            _only(s, {f.name for f in dataclasses.fields(GpuSystem)}, f"systems[{i}].")
            if s.get("kind") not in ADAPTERS:
                raise SpecError(f"systems[{i}].kind must be one of {sorted(ADAPTERS)}, got {s.get('kind')!r}")
            parsed.append(GpuSystem(**{**s, "config": dict(s.get("config") or {})}))
        if len({s.name for s in parsed}) != len(parsed):
            raise SpecError("system names must be unique")
        try:
            return cls(name=data.pop("name", default_name), workload=WorkloadSpec(**wl), systems=tuple(parsed), **data)
        except (TypeError, ValueError) as exc:
            raise SpecError(str(exc)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _only(data: Mapping, known: set[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise SpecError(f"unknown key {prefix}{unknown[0]!r}; known keys here: {', '.join(sorted(known))}")


# ------------------------------------------------------------------------------------------------ adapters
def _adapters() -> dict[str, type]:
    """kind -> System adapter (benchmarks.systems), built on first use (imports torch)."""
    import torch

    from . import systems as S

    class AsyncCkptGpu(S.AsyncCkpt):
        """asyncckpt with the system's ``config`` (snapshot, snapshot_device, ...) on top of the defaults."""

        name = "asyncckpt_gpu"

        def config(self):
            from asyncckpt import Config

            return Config.from_dict(dict(self.options.get("config", {})))

        @property
        def notes(self) -> str:  # type: ignore[override]
            return f"AsyncCheckpointer.save_checkpoint with config {json.dumps(self.options.get('config', {}))}"

    class DcpAsyncBest(S.DcpAsync):
        """DCP's best configuration: pinned, asynchronous, non-blocking staging; the next optimizer step waits
        for staging to complete (a one-shot step pre-hook), as DCP requires before state is mutated."""

        name = "dcp_async_best"
        notes = ("torch.distributed.checkpoint.async_save with DefaultStager(StagingOptions(use_pinned_memory=True, "
                 "use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True)) kept across saves; "
                 "the next optimizer step waits for staging_completion")

        def open(self, save_dir: str) -> dict:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            out = S.System.open(self, save_dir)
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=True))
            return out

        def save(self, tag: str):
            import torch.distributed.checkpoint as dcp

            t0 = time.perf_counter()
            # plain tensors: DCP's stager cannot deep-copy an nn.Parameter (KeyError: <class 'type'> on torch 2.11)
            state = {part: {k: v.detach() if isinstance(v, torch.nn.Parameter) else v for k, v in sd.items()}
                     if part == "model" else sd for part, sd in self.state().items()}
            resp = dcp.async_save(state, async_stager=self.stager, **self.kwargs(tag))
            staged = getattr(resp, "staging_completion", None)
            upload = getattr(resp, "upload_completion", resp)
            if staged is not None:
                def wait_staged(optimizer, args, kwargs):
                    handle.remove()
                    staged.result(WAIT_S)

                handle = self.wl.optimizer.register_step_pre_hook(wait_staged)
            p = S.Pending(t0)
            upload.add_done_callback(lambda f: p.mark_done())
            p._waiter = lambda timeout: (upload.result(timeout), {})[1]
            return p

    return {"asyncckpt": AsyncCkptGpu, "dcp_async_default": S.DcpAsyncDefault, "dcp_async_best": DcpAsyncBest,
            "torch_save": S.TorchSave}


ADAPTERS = ("asyncckpt", "dcp_async_default", "dcp_async_best", "torch_save")


# ------------------------------------------------------------------------------------------- measurement
class Trainer:
    """The workload on its device, with synchronized steps."""

    def __init__(self, spec: GpuSpec):
        import torch

        from .workload import build

        self.cuda = torch.cuda.is_available()
        if self.cuda and spec.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device = "cuda" if self.cuda else "cpu"
        self.wl = build(spec.workload, device=self.device)
        self.sync()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def step(self) -> float:
        """One training step, finished on the device; returns the instant it ended."""
        self.wl.step()
        self.sync()
        return time.perf_counter()

    def base_step(self, n: int) -> float:
        t = time.perf_counter()
        times = []
        for _ in range(max(1, n)):
            end = self.step()
            times.append(end - t)
            t = end
        return statistics.median(times)


def measure_save(system, trainer: Trainer, tag: str, base: float, rss_before: int, timeout_s: float) -> dict:
    from .measure import peak_rss_bytes, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    pending = system.save(tag)
    call = time.perf_counter() - t0
    ends = [trainer.step()]
    while pending.done_at is None and ends[-1] - t0 < timeout_s:
        ends.append(trainer.step())
    result = pending.wait(timeout_s) or {}
    peak, _ = peak_rss_bytes()
    n = len(ends)
    return {"tag": tag, "call_s": call, "base_step_s": base, "steps": n,
            "effective_stall_s": ends[0] - t0 - base, "training_lost_s": ends[-1] - t0 - n * base,
            "ttd_s": pending.ttd_s, "peak_host_bytes": peak - rss_before, "peak_rss": peak,
            "staging_peak_bytes": result.get("staging_peak_bytes")}  # asyncckpt: its own staging buffers


def run_system(spec: GpuSpec, sysspec: GpuSystem, trainer: Trainer, workdir: str) -> dict:
    from .measure import rss_bytes
    from .systems import Ctx, disk_bytes, remove

    out: dict[str, Any] = {"system": sysspec.name, "kind": sysspec.kind, "config": dict(sysspec.config),
                           "status": "ok", "saves": []}
    if sysspec.cuda_only and not trainer.cuda:
        return {**out, "status": "skipped", "reason": "needs CUDA (not available here)"}
    d = os.path.join(workdir, sysspec.name)
    system = None
    try:
        cls = _adapters()[sysspec.kind]
        system = cls(trainer.wl, Ctx(0, 1), {"config": dict(sysspec.config)})
        if sysspec.kind == "asyncckpt":
            from asyncckpt import ConfigError

            try:
                system.config()
            except ConfigError as exc:
                return {**out, "status": "failed", "reason": f"config refused: {exc}"}
        out["notes"] = system.notes
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        system.open(d)
        out["open_s"] = time.perf_counter() - t0
        lead_end = t0 + (spec.saver_lead_s if sysspec.kind == "asyncckpt" else 0.0)
        while time.perf_counter() < lead_end:  # asyncckpt's saver exists this long before its first save
            trainer.step()
        prev = None
        for i in range(1 + spec.warm_saves):
            base = trainer.base_step(spec.base_steps)
            rec = measure_save(system, trainer, f"s{i}", base, rss0, spec.timeout_s)
            rec["bytes_on_disk"] = disk_bytes(system.path(f"s{i}"))
            out["saves"].append(rec)
            if prev is not None:
                system.delete(prev)
            prev = f"s{i}"
        t0 = time.perf_counter()
        system.load(prev)
        trainer.sync()
        out["load_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a failing system is a result
        out.update(status="failed", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        if system is not None:
            try:
                system.close()
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                pass
        remove(d)
    return out


def measure_floors(spec: GpuSpec, trainer: Trainer, workdir: str) -> dict:
    """Pinned D2H, D2D, pinning rate (CUDA only) and the disk's sequential write + fsync rate."""
    import torch

    flat = [t.detach().reshape(-1).view(torch.uint8) for t in trainer.wl.state_tensors()]
    nbytes = sum(t.numel() for t in flat)
    out: dict[str, Any] = {"state_bytes": nbytes}

    def copy_into(buf) -> list[float]:
        times = []
        for _ in range(max(1, spec.floor_reps)):
            trainer.sync()
            t0 = time.perf_counter()
            pos = 0
            for t in flat:
                buf[pos: pos + t.numel()].copy_(t, non_blocking=True)
                pos += t.numel()
            trainer.sync()
            times.append(time.perf_counter() - t0)
        return times

    if trainer.cuda:
        t0 = time.perf_counter()
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        out["pin_s"] = time.perf_counter() - t0
        out["pin_GBps"] = nbytes / out["pin_s"] / 1e9
        out["d2h_s"] = copy_into(host)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        out["d2d_s"] = copy_into(dev)
        del dev
        torch.cuda.empty_cache()
    else:
        host = torch.empty(nbytes, dtype=torch.uint8)
        out["note"] = "no CUDA: pinned D2H, D2D and pinning floors not measured; memcpy into a host buffer instead"
        out["memcpy_s"] = copy_into(host)
    n = min(nbytes, spec.disk_floor_mib << 20)
    view = memoryview(host.numpy())[:n]
    path = os.path.join(workdir, "floor.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < n:
            pos += os.write(fd, view[pos: pos + (64 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)
        os.remove(path)
    out["disk_bytes"] = n
    out["disk_s"] = time.perf_counter() - t0
    out["disk_GBps"] = n / out["disk_s"] / 1e9
    del host, view
    return out


# --------------------------------------------------------------------------------------------- processes
def run_job(job: dict) -> dict:
    """What one process runs: build the workload, then the floors or the named systems."""
    spec = GpuSpec.from_dict(job["spec"])
    t0 = time.perf_counter()
    trainer = Trainer(spec)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "device": _device(), "systems": {}}
    out["workload"] = {"raw_bytes": trainer.wl.raw_bytes, "n_params": trainer.wl.n_params,
                       "n_tensors": len(trainer.wl.state_tensors())}
    os.makedirs(job["workdir"], exist_ok=True)
    if job.get("floors"):
        out["floors"] = measure_floors(spec, trainer, job["workdir"])
    for name in job["systems"]:
        sysspec = next(s for s in spec.systems if s.name == name)
        _log(f"[{spec.name}] {name}")
        out["systems"][name] = res = run_system(spec, sysspec, trainer, job["workdir"])
        _log(f"  {name}: {res['status']}" + (f": {res.get('reason')}" if res["status"] != "ok" else
             f", durable {[round(s['ttd_s'], 3) for s in res['saves']]} s, load {res['load_s']:.3f} s"))
    return out


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _launch(job: dict, job_dir: str, timeout_s: float) -> dict:
    os.makedirs(job_dir, exist_ok=True)
    path = os.path.join(job_dir, "job.json")
    result = os.path.join(job_dir, "result.json")
    with open(path, "w") as f:
        json.dump({**job, "result": result}, f)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--job", path], cwd=ROOT, env=env,
                              timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    try:
        with open(result) as f:
            return json.load(f)
    except (OSError, ValueError):
        why = "timed out" if code is None else f"exited with code {code} without a result"
        return {"error": why, "systems": {n: {"system": n, "status": "failed", "reason": why} for n in job["systems"]}}


def run(spec: GpuSpec, out_dir: str) -> dict:
    workdir = os.path.join(out_dir, "tmp", spec.name)
    doc: dict[str, Any] = {"name": spec.name, "spec": spec.to_dict(), "systems": {}, "floors": None}
    t0 = time.perf_counter()
    names = [s.name for s in spec.systems]
    jobs = ([{"floors": True, "systems": []}] + [{"floors": False, "systems": [n]} for n in names]
            if spec.isolate else [{"floors": True, "systems": names}])
    try:
        for i, job in enumerate(jobs):
            job = {**job, "spec": spec.to_dict(), "workdir": os.path.join(workdir, "ckpt")}
            res = (_launch(job, os.path.join(workdir, f"job{i}"), spec.timeout_s * (1 + len(job["systems"])))
                   if spec.isolate else run_job(job))
            doc.setdefault("device", res.get("device"))
            doc.setdefault("workload", res.get("workload"))
            if job["floors"]:
                doc["floors"] = res.get("floors") or {"error": res.get("error", "no result")}
            doc["systems"].update(res.get("systems", {}))
            _write_partial(doc, out_dir)  # what is measured so far survives a run cut short
    finally:
        doc["elapsed_s"] = time.perf_counter() - t0
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


def _write_partial(doc: dict, out_dir: str) -> None:
    dest = os.path.join(out_dir, doc["name"])
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "results.partial.json"), "w") as f:
        json.dump(doc, f, indent=1, default=repr)


# ------------------------------------------------------------------------------------------------ report
FIGURES = [("call_s", "call", "time"), ("effective_stall_s", "effective stall", "time"),
           ("training_lost_s", "training time lost", "time"), ("ttd_s", "time to durable", "time"),
           ("peak_host_bytes", "peak host memory", "bytes"), ("staging_peak_bytes", "host staging", "bytes")]


def summarize(doc: dict) -> None:
    """Per system: ``first`` (the cold save) and ``warm`` (median over the warm saves) of every figure."""
    from .report import stats

    for res in doc["systems"].values():
        saves = res.get("saves") or []
        if res.get("status") != "ok" or not saves:
            continue
        keys = [k for k, _, _ in FIGURES] + ["steps", "base_step_s"]  # the last two: the steps' time of a save
        res["summary"] = {"first": {k: saves[0].get(k) for k in keys},
                          "warm": {k: stats(s.get(k) for s in saves[1:]) for k in keys}}


def _warm(doc: dict, system: str, key: str) -> float | None:
    st = ((doc["systems"].get(system) or {}).get("summary") or {}).get("warm", {}).get(key)
    return None if not st or st.get("noise") else st["median"]


def _first(doc: dict, system: str, key: str) -> float | None:
    return ((doc["systems"].get(system) or {}).get("summary") or {}).get("first", {}).get(key)


def _floor(doc: dict, key: str) -> float | None:
    v = (doc.get("floors") or {}).get(key)
    return statistics.median(v) if isinstance(v, list) and v else v if isinstance(v, (int, float)) else None


def targets(doc: dict) -> list[dict]:
    """Issue 10's GPU targets as ratios of figures measured in this run; N/A where a figure is missing."""
    state = (doc.get("workload") or {}).get("raw_bytes")
    d2h = _floor(doc, "d2h_s")
    disk_rate = _floor(doc, "disk_GBps")
    dcp_best = _warm(doc, "dcp_async_best", "effective_stall_s")
    rows: list[dict] = []

    def check(target: str, a: float | None, b: float | None, limit: float) -> None:
        ok = a is not None and b is not None and b > 0
        rows.append({"target": target, "value": a / b if ok else None, "limit": limit,
                     "result": "N/A" if not ok else "PASS" if a / b <= limit else "MISS"})

    for system, floor_limit in (("asyncckpt_lazy", 0.3), ("asyncckpt_device", 0.1)):
        stall = _warm(doc, system, "effective_stall_s")
        check(f"{system}: warm effective stall ≤ {floor_limit} × pinned D2H floor", stall, d2h, floor_limit)
        check(f"{system}: warm effective stall ≤ 0.05 × dcp_async_best", stall, dcp_best, 0.05)
    for system in ("asyncckpt_eager", "asyncckpt_lazy", "asyncckpt_device"):
        check(f"{system}: first-save effective stall ≤ 2 × warm", _first(doc, system, "effective_stall_s"),
              _warm(doc, system, "effective_stall_s"), 2.0)
    for system in ("asyncckpt_lazy", "asyncckpt_device"):
        saves = (doc["systems"].get(system) or {}).get("saves") or []
        written = saves[-1].get("bytes_on_disk") if saves else None
        floor = written / (disk_rate * 1e9) if written and disk_rate else None
        check(f"{system}: time to durable ≤ 1.15 × disk floor for the bytes written", _warm(doc, system, "ttd_s"),
              floor, 1.15)
        check(f"{system}: time to durable ≤ 0.4 × dcp_async_best", _warm(doc, system, "ttd_s"),
              _warm(doc, "dcp_async_best", "ttd_s"), 0.4)
        check(f"{system}: load ≤ 0.6 × torch.load", (doc["systems"].get(system) or {}).get("load_s"),
              (doc["systems"].get("torch_save") or {}).get("load_s"), 0.6)
    for system in ("asyncckpt_lazy", "asyncckpt_service"):  # issue 11: the background write costs training ≤ 1%
        steps, base = _warm(doc, system, "steps"), _warm(doc, system, "base_step_s")
        check(f"{system}: training time lost ≤ 1% of the steps' time (call → durable)",
              _warm(doc, system, "training_lost_s"), steps * base if steps and base else None, 0.01)
    check("asyncckpt_service: time to durable ≤ 1.1 × thread mode (asyncckpt_lazy)",
          _warm(doc, "asyncckpt_service", "ttd_s"), _warm(doc, "asyncckpt_lazy", "ttd_s"), 1.1)
    check("asyncckpt_lazy: peak host memory ≤ 1.05 × state", _warm(doc, "asyncckpt_lazy", "peak_host_bytes"),
          state, 1.05)
    check("asyncckpt_device: peak host memory ≤ 1.05 × its staging ring", _warm(doc, "asyncckpt_device",
          "peak_host_bytes"), _warm(doc, "asyncckpt_device", "staging_peak_bytes"), 1.05)
    return rows


def markdown(doc: dict, plot_name: str | None) -> str:
    from .report import fmt_bytes, fmt_stats, fmt_time, fmt_value

    wl = doc.get("workload") or {}
    lines = [f"# asyncckpt GPU benchmark: `{doc['name']}`", "",
             f"{doc.get('device')} · {fmt_bytes(wl.get('raw_bytes') or 0)} of state "
             f"({(wl.get('n_params') or 0) / 1e6:.0f} M parameters + AdamW) · run took {doc.get('elapsed_s', 0) / 60:.1f} min",
             "", "First (cold) save, then the median (min–max) of the warm saves; a figure whose IQR exceeds its "
             "median is shown as noise. *Effective stall*: how much later the first step after the save call "
             "finishes than a base step. *Training time lost*: steps from the call until durable, minus as many "
             "base steps. *Peak host memory*: peak RSS during the save over RSS before the saver existed. *Host "
             "staging*: the host staging memory asyncckpt's save held (`SaveResult.staging_peak_bytes`: its "
             "full-size buffer, or its ring).", ""]
    heads = [f"{t} (first)" if k not in ("peak_host_bytes", "staging_peak_bytes") else t for k, t, _ in FIGURES]
    lines += ["| system | " + " | ".join(heads + ["warm " + t for k, t, _ in FIGURES[:4]]) + " | load | on disk |",
              "|---|" + "---|" * (len(FIGURES) + 6)]
    for name, res in doc["systems"].items():
        if res.get("status") != "ok" or not res.get("summary"):
            reason = (res.get("reason") or "").replace("|", "\\|").splitlines()[0][:200] if res.get("reason") else ""
            lines.append(f"| `{name}` | {res.get('status')}: {reason} |" + " |" * (len(FIGURES) + 5))
            continue
        s = res["summary"]
        first = [fmt_value(s["first"][k], kind) if s["first"].get(k) is not None else "–" for k, _, kind in FIGURES[:4]]
        warm = [fmt_stats(s["warm"].get(k), kind) for k, _, kind in FIGURES[:4]]
        peak, staging = (fmt_stats(s["warm"].get(k), "bytes") if s["warm"].get(k) else
                         fmt_bytes(s["first"][k]) if s["first"].get(k) is not None else "–"
                         for k in ("peak_host_bytes", "staging_peak_bytes"))
        disk = res["saves"][-1].get("bytes_on_disk")
        lines.append(f"| `{name}` | " + " | ".join(first + [peak, staging] + warm) +
                     f" | {fmt_time(res['load_s'])} | {fmt_bytes(disk) if disk else '–'} |")
    fl = doc.get("floors") or {}
    lines += ["", "Floors (same process kind, same state):", ""]
    if fl.get("error"):
        lines.append(f"* floors failed: {fl['error']}")
    for key, title in (("d2h_s", "pinned device-to-host copy"), ("d2d_s", "device-to-device copy"),
                       ("memcpy_s", "host memcpy"), ("pin_s", "allocating the pinned buffer"),
                       ("disk_s", "sequential write + fsync")):
        v = _floor(doc, key)
        if v is not None:
            nbytes = fl["disk_bytes"] if key == "disk_s" else fl["state_bytes"]
            lines.append(f"* {title}: {fmt_time(v)} for {fmt_bytes(nbytes)} ({nbytes / v / 1e9:.2f} GB/s)")
    if fl.get("note"):
        lines.append(f"* {fl['note']}")
    lines += ["", "## Targets (issue 10), as ratios measured in this run", "", "| target | measured | limit | result |",
              "|---|---|---|---|"]
    for t in doc.get("targets", []):
        measured = "–" if t["value"] is None else f"{t['value']:.3f}×"
        lines.append(f"| {t['target']} | {measured} | ≤ {t['limit']:g}× | **{t['result']}** |")
    if plot_name:
        lines += ["", f"![effective stall, training time lost, time to durable]({plot_name})"]
    else:
        lines += ["", "(no plot: matplotlib is not installed)"]
    lines += ["", "## Systems", ""] + [f"* `{n}`: {r.get('notes') or r.get('kind')}"
                                       + (f" with config `{json.dumps(r['config'])}`" if r.get("config") and not r.get("notes") else "")
                                       for n, r in doc["systems"].items()]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n, r in doc["systems"].items() if r.get("summary")]
    panels = [("effective_stall_s", "effective stall (warm)", "d2h_s"), ("training_lost_s", "training time lost (warm)", None),
              ("ttd_s", "time to durable (warm)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 5), squeeze=False)
    for ax, (key, title, floor) in zip(axes[0], panels):
        meds = [((doc["systems"][n]["summary"]["warm"].get(key) or {}).get("median") or 0.0) for n in names]
        ax.bar(range(len(names)), [max(m, 1e-4) for m in meds], color="tab:blue")
        if floor and _floor(doc, floor):
            ax.axhline(_floor(doc, floor), color="black", linestyle="--", label="pinned D2H floor")
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("seconds")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"asyncckpt GPU benchmark {doc['name']} on {doc.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="benchmarks/configs/gpu_*.yaml")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--smoke", action="store_true", help="the config's smoke: overrides (tiny, CPU is enough)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of the config's systems")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement process
    args = ap.parse_args(argv)
    if args.job:
        with open(args.job) as f:
            job = json.load(f)
        try:
            res = run_job(job)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                   "systems": {n: {"system": n, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                               for n in job["systems"]}}
        with open(job["result"], "w") as f:
            json.dump(res, f, default=repr)
        return 0
    if not args.config:
        ap.error("--config is required")
    import yaml

    try:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
        spec = GpuSpec.from_dict(data, smoke=args.smoke,
                                 default_name=os.path.splitext(os.path.basename(args.config))[0])
        if args.systems:
            wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
            unknown = [w for w in wanted if w not in {s.name for s in spec.systems}]
            if unknown:
                raise SpecError(f"unknown system(s) {unknown}")
            spec = dataclasses.replace(spec, systems=tuple(s for s in spec.systems if s.name in wanted))
    except (SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = spec.name + ("_smoke" if args.smoke else "")
    spec = dataclasses.replace(spec, name=name)
    doc = run(spec, args.out)
    summarize(doc)
    doc["targets"] = targets(doc)
    dest = os.path.join(args.out, name)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=repr)
    have_plot = plot(doc, os.path.join(dest, "results.png"))
    with open(os.path.join(dest, "results.md"), "w") as f:
        f.write(markdown(doc, "results.png" if have_plot else None))
    print(f"wrote {dest}/results.json, results.md" + (", results.png" if have_plot else
                                                      " (no plot: matplotlib is not installed)"))
    for n, r in doc["systems"].items():
        print(f"  {n}: {r.get('status')}" + (f": {r.get('reason')}" if r.get("status") != "ok" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
