"""From raw repetitions to the published figures: medians with min-max, the Markdown tables (per workload
and world size: every system and floor, then asyncckpt's ratios to each peer and floor, then the targets)
and the PNG plot (stall and time to durable per system and size)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Iterable

from .spec import ASYNCCKPT_MODES as ASYNCCKPT, SYSTEM_NAMES as SYSTEMS

FIGURES = [  # (metric, column title, kind)
    ("stall_first_s", "first-save stall", "time"),
    ("stall_warm_s", "warm stall", "time"),
    ("loop_overhead_s", "loop overhead / ckpt", "time"),
    ("ttd_warm_s", "time to durable (warm)", "time"),
    ("ttd_first_s", "time to durable (first)", "time"),
    ("disk_ratio", "on disk / raw", "ratio"),
    ("write_MBps", "write MB/s", "rate"),
    ("load_s", "load", "time"),
    ("peak_rss_delta", "peak RSS over baseline", "bytes"),
    ("staging_bytes", "staging", "bytes"),
    ("growth_bytes", "RSS growth over N saves", "bytes"),
]


def stats(values: Iterable[Any]) -> dict | None:
    """Median, min, max, quartiles (q1, q3) and ``noise`` of the samples (None and NaN left out): a figure is
    noise when its spread, the interquartile range, exceeds its magnitude (``|median|``); it is then not
    reported as a result. One sample has no spread to judge (never noise)."""
    vals = sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not vals:
        return None
    med = statistics.median(vals)
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (med, med, med)
    return {"median": med, "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3, "n": len(vals),
            "noise": q3 - q1 > abs(med)}


def system_metrics(res: dict, raw: int) -> dict[str, list]:
    """Every raw sample of every figure of one system."""
    m: dict[str, list] = defaultdict(list)
    sync = bool((res.get("info") or {}).get("sync", False))
    for rep in res.get("reps", []):
        first = rep["first"]
        m["stall_first_s"].append(first["stall_s"])
        m["ttd_first_s"].append(first["ttd_s"])
        for w in rep.get("warm", []):
            m["stall_warm_s"].append(w["stall_s"])
            m["memcpy_paired_warm_s"].append(w.get("memcpy_s"))  # paired_memcpy: the floor timed right before
            m["ttd_warm_s"].append(w["ttd_s"])
            background = w["ttd_s"] - (0.0 if sync else w["stall_s"])
            m["write_MBps"].append(raw / background / 1e6 if background and background > 0 else None)
            m["ttd_internal_s"].append((w.get("result") or {}).get("time_to_durable_s"))
        for key in ("open_s", "first_after_s", "prepare_s", "load_s", "construct_s", "staging_bytes"):
            if rep.get(key) is not None:
                m[key].append(rep[key])
        if rep.get("bytes_on_disk") is not None:
            m["bytes_on_disk"].append(rep["bytes_on_disk"])
            m["disk_ratio"].append(rep["bytes_on_disk"] / max(1, raw))
        if rep.get("peak_rss") is not None and rep.get("rss_before") is not None:
            m["peak_rss"].append(rep["peak_rss"])
            m["peak_rss_delta"].append(rep["peak_rss"] - rep["rss_before"])
    for lp in res.get("loop", []):
        m["loop_overhead_s"].append(lp["overhead_s"])
        m["loop_k"].append(lp["k"])
        m["loop_ttd_s"].append(lp["ttd_s"])
        m["loop_stall_s"].append(lp["stall_s"])
        m["loop_durable_in_loop"].append(1.0 if lp["durable_in_loop"] else 0.0)
    g = res.get("growth")
    if g:
        m["growth_bytes"].append(g["growth_bytes"])
        m["growth_saves"].append(g["saves"])
        allocs = [a for a in g.get("allocations", []) if a is not None]
        if len(allocs) > 1:
            m["growth_allocations"].append(allocs[-1] - allocs[1])
    return m


def floor_metrics(fl: dict | None) -> dict[str, dict | None]:
    if not fl or "memcpy_s" not in fl:
        return {}
    raw = fl["raw_bytes"]
    disk = [d["total_s"] for d in fl.get("disk", [])]
    out = {"memcpy_s": stats(fl["memcpy_s"]), "disk_s": stats(disk),
           "memcpy_MBps": stats(raw / t / 1e6 for t in fl["memcpy_s"] if t > 0),
           "disk_MBps": stats(raw / t / 1e6 for t in disk if t > 0)}
    codec = fl.get("codec") or {}
    for label in ("compress_1thread", "compress_threads", "raw_checksum_1thread"):
        if label in codec:
            out[f"codec_{label}_MBps"] = stats([codec[label]["MBps"]])
            out[f"codec_{label}_ratio"] = stats([codec[label]["ratio"]])
    if "compress_threads" in codec:
        out["codec_threads"] = stats([codec["compress_threads"]["threads"]])
    return out


def summarize(doc: dict) -> None:
    """Add ``summary`` (per system: figure -> median/min/max/n) and ``floor_summary`` to every run."""
    for run in doc["runs"]:
        raw = (run.get("workload_info") or {}).get("raw_bytes") or (run.get("floors") or {}).get("raw_bytes") or 1
        run["raw_bytes"] = raw
        run["cpus"] = (doc.get("environment") or {}).get("cpus")
        run["summary"] = {}
        for name, res in run["systems"].items():
            if res.get("status") != "ok":
                continue
            run["summary"][name] = {k: stats(v) for k, v in system_metrics(res, raw).items()}
        run["floor_summary"] = floor_metrics(run.get("floors"))


# ------------------------------------------------------------------------------------------ formatting
def fmt_time(s: float) -> str:
    if s < 0:
        return "−" + fmt_time(-s)
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    if abs(b) >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def fmt_value(v: float, kind: str) -> str:
    if kind == "time":
        return fmt_time(v)
    if kind == "bytes":
        return fmt_bytes(v)
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "rate":
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_stats(st: dict | None, kind: str) -> str:
    if not st:
        return "–"
    if st.get("noise"):
        return f"noise (IQR {fmt_value(st['q1'], kind)} to {fmt_value(st['q3'], kind)}, n={st['n']})"
    med = fmt_value(st["median"], kind)
    if st["n"] > 1 and st["max"] != st["min"]:
        return f"{med} ({fmt_value(st['min'], kind)}–{fmt_value(st['max'], kind)})"
    return med


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def fmt_ratio(r: float | None, *figures: dict | None) -> str:
    if any(f and f.get("noise") for f in figures):
        return "noise"
    return "–" if r is None else f"{r:.2f}×"


def run_label(run: dict) -> str:
    return f"{run['workload']} (world size {run['world']})"


def markdown(doc: dict, targets: list[dict] | None = None, plot_name: str | None = None) -> str:
    env = doc.get("environment", {})
    cfg = doc.get("config", {})
    v = env.get("versions", {})
    lines = [f"# asyncckpt benchmark: `{doc['name']}`", ""]
    lines.append(
        f"{env.get('date', '')} · {env.get('cpus')} CPUs · {fmt_bytes(env.get('memory_bytes') or 0)} RAM · "
        f"checkpoints on {env.get('workdir_fs')} · torch {v.get('torch')} · deepspeed {v.get('deepspeed')} · "
        f"asyncckpt {v.get('asyncckpt')} @ {env.get('asyncckpt_commit')}{' (modified)' if env.get('asyncckpt_dirty') else ''}"
        f" · {cfg.get('reps')} reps × {cfg.get('rounds')} round(s), {cfg.get('warm_saves')} warm saves per rep · "
        + (f"training on {cfg['torch_threads']} torch thread(s) · " if cfg.get("torch_threads") else "") +
        f"run took {doc.get('elapsed_s', 0) / 60:.1f} min")
    lines.append("")
    lines.append("Medians with (min–max) over repetitions; every figure below was measured in this one run, on "
                 "the same state and the same disk. A figure whose interquartile range exceeds its median "
                 "(in magnitude) is shown as *noise* with its IQR, not as a result. *Stall*: the save call on "
                 "the training thread. *Loop overhead*: K training steps with one save minus K steps without, "
                 "in back-to-back A/B pairs whose order alternates (K spans the background write under "
                 "training). "
                 "*Time to durable*: save call → checkpoint fsynced/published. *Write MB/s*: raw bytes / "
                 "(time to durable − stall) for background writers, raw bytes / time to durable for the "
                 "others. *Peak RSS over baseline*: peak resident memory during the saves minus RSS before the "
                 "saver existed. The page cache is warm for loads.")
    if plot_name:
        lines += ["", f"![stall and time to durable]({plot_name})"]
    for run in doc["runs"]:
        lines += [""] + run_markdown(run, cfg)
    if targets is not None:
        lines += ["", "## Targets (issues 4 and 12), as ratios measured in this run", ""]
        lines += targets_markdown(targets)
    lines += ["", "## Systems", ""]
    seen = set()
    for run in doc["runs"]:
        for name, res in run["systems"].items():
            notes = (res.get("info") or {}).get("notes")
            if name in seen or not notes:
                continue
            seen.add(name)
            lines.append(f"* `{name}`: {notes}")
    return "\n".join(lines) + "\n"


def run_markdown(run: dict, cfg: dict) -> list[str]:
    wi = run.get("workload_info") or {}
    raw = run["raw_bytes"]
    lines = [f"## {run_label(run)}: {fmt_bytes(raw)} of {wi.get('dtype', '?')} state "
             f"({_params_text(wi)}, {wi.get('n_tensors')} tensors, "
             f"{100 * (wi.get('zero_fraction') or 0):.1f}% zero bytes)", ""]
    growth_n = (cfg.get("growth") or {}).get("saves")
    heads = [t if m != "growth_bytes" else f"RSS growth over {growth_n} saves" for m, t, _ in FIGURES]
    lines.append("| system | " + " | ".join(heads) + " |")
    lines.append("|---|" + "---|" * len(FIGURES))
    for name, res in run["systems"].items():
        if res.get("status") != "ok":
            reason = (res.get("reason") or "").replace("|", "\\|").splitlines()[0][:200] if res.get("reason") else ""
            status = "unavailable" if res.get("status") == "unavailable" else "failed"
            lines.append(f"| `{name}` | {status}: {reason} |" + " |" * (len(FIGURES) - 1))
            continue
        s = run["summary"].get(name, {})
        cells = [fmt_stats(s.get(m), kind) for m, _, kind in FIGURES]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    fs = run.get("floor_summary") or {}
    if fs:
        blank = ["–"] * len(FIGURES)
        idx = {m: i for i, (m, _, _) in enumerate(FIGURES)}
        row = list(blank)
        row[idx["stall_first_s"]] = row[idx["stall_warm_s"]] = fmt_stats(fs.get("memcpy_s"), "time")
        row[idx["write_MBps"]] = fmt_stats(fs.get("memcpy_MBps"), "rate")
        lines.append("| floor: memcpy into allocated buffer | " + " | ".join(row) + " |")
        row = list(blank)
        row[idx["ttd_warm_s"]] = row[idx["ttd_first_s"]] = fmt_stats(fs.get("disk_s"), "time")
        row[idx["disk_ratio"]] = "1.000"
        row[idx["write_MBps"]] = fmt_stats(fs.get("disk_MBps"), "rate")
        lines.append("| floor: sequential write + fsync | " + " | ".join(row) + " |")
        for label, title in (("compress_threads", f"codec alone, {int((fs.get('codec_threads') or {}).get('median', 0))} threads"),
                             ("compress_1thread", "codec alone, 1 thread"),
                             ("raw_checksum_1thread", "codec alone, compression off (checksum), 1 thread")):
            if fs.get(f"codec_{label}_MBps"):
                row = list(blank)
                row[idx["disk_ratio"]] = fmt_stats(fs.get(f"codec_{label}_ratio"), "ratio")
                row[idx["write_MBps"]] = fmt_stats(fs.get(f"codec_{label}_MBps"), "rate")
                lines.append(f"| floor: {title} | " + " | ".join(row) + " |")
    extra = []
    for name in run["systems"]:
        s = run["summary"].get(name) or {}
        bits = []
        if s.get("prepare_s"):
            bits.append(f"prepare() {fmt_stats(s['prepare_s'], 'time')}")
        if s.get("loop_k"):
            bits.append(f"loop K = {int(s['loop_k']['median'])} steps, durable within the loop in "
                        f"{100 * s['loop_durable_in_loop']['median']:.0f}% (median), time to durable under "
                        f"training {fmt_stats(s.get('loop_ttd_s'), 'time')}")
        if s.get("growth_allocations") is not None:
            bits.append(f"staging allocations after the 2nd of {growth_n} saves: {int(s['growth_allocations']['median'])}")
        res = run["systems"][name]
        before, after = res.get("loadavg_before"), res.get("loadavg_after")
        if before and after:
            bits.append(f"machine load average {before[0]:.1f} → {after[0]:.1f} ({_cpus(run)} CPUs)")
        if bits:
            extra.append(f"* `{name}`: " + "; ".join(bits))
    if extra:
        lines += [""] + extra
    lines += [""] + ratio_markdown(run)
    return lines


def _params_text(wi: dict) -> str:
    spec = wi.get("spec") or {}
    state = {"adamw": "AdamW moments", "sgd": "SGD momentum"}.get(spec.get("optimizer", "adamw"), "optimizer state")
    if spec.get("kind") == "many_small":
        return f"{spec.get('n_tensors')} parameters of {spec.get('numel')} elements + {state}"
    return f"{(wi.get('n_params') or 0) / 1e6:.1f} M parameters + {state}"


def _cpus(run: dict) -> str:
    return str(run.get("cpus") or "?")


RATIO_FIGURES = [
    ("stall_warm_s", "warm stall", "memcpy_s", "memcpy floor"),
    ("stall_first_s", "first-save stall", "memcpy_s", "memcpy floor"),
    ("loop_overhead_s", "loop overhead", None, None),
    ("ttd_warm_s", "time to durable", "disk_s", "disk floor"),
    ("load_s", "load time", None, None),
    ("bytes_on_disk", "bytes on disk", "raw", "raw bytes"),
]


def ratio_markdown(run: dict) -> list[str]:
    """One row per (figure, peer or floor), one column per asyncckpt mode."""
    mine = [n for n in run["summary"] if n in ASYNCCKPT]
    peers = [n for n in run["summary"] if n not in ASYNCCKPT]  # built-in peers and registered ones
    if not mine:
        return []
    fs = run.get("floor_summary") or {}
    lines = [f"Ratios of asyncckpt's medians to each peer's and floor's, {run_label(run)} (< 1: asyncckpt is lower):",
             "", "| figure | vs | " + " | ".join(f"`{n}`" for n in mine) + " |", "|---|---|" + "---|" * len(mine)]
    for metric, title, floor, floor_title in RATIO_FIGURES:
        refs: list[tuple[str, dict | None]] = [(f"`{p}`", run["summary"][p].get(metric)) for p in peers]
        if floor == "raw":
            refs.append((floor_title, {"median": run["raw_bytes"]}))
        elif floor:
            refs.append((floor_title, fs.get(floor)))
        for label, ref in refs:
            if not ref:
                continue
            cells = [fmt_ratio(ratio(run["summary"][n].get(metric), ref), run["summary"][n].get(metric), ref)
                     for n in mine]
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    return lines


def targets_markdown(targets: list[dict]) -> list[str]:
    lines = ["| workload | target | measured | limit | result |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['run']} | {t['target']} | {t['measured']} | {t['limit']} | **{t['result']}** |")
    notes = [t for t in targets if t.get("detail")]
    if notes:
        lines.append("")
        lines += [f"* {t['run']}, {t['target']}: {t['detail']}" for t in notes]
    return lines


# ----------------------------------------------------------------------------------------------- plot
def plot(doc: dict, path: str) -> bool:
    """stall (first and warm) and time to durable per system and run, log scale, min-max whiskers and the
    floors as black ticks. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = doc["runs"]
    names = list(SYSTEMS) + [n for r in runs for n in r.get("summary", {}) if n not in SYSTEMS]
    systems = [n for n in dict.fromkeys(names) if any(n in r.get("summary", {}) for r in runs)]
    panels = [("stall_first_s", "first-save stall", "memcpy_s"), ("stall_warm_s", "warm stall", "memcpy_s"),
              ("ttd_warm_s", "time to durable (warm)", "disk_s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 + 2.2 * len(runs) * len(panels), 5.5), squeeze=False)
    width = 0.8 / max(1, len(systems))
    cmap = plt.get_cmap("tab10")
    for ax, (metric, title, floor) in zip(axes[0], panels):
        for i, name in enumerate(systems):
            xs, meds, lo, hi = [], [], [], []
            for j, run in enumerate(runs):
                st = run.get("summary", {}).get(name, {}).get(metric)
                if not st:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                meds.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            if xs:
                ax.bar(xs, meds, width, yerr=[lo, hi], label=name, color=cmap(i % 10), capsize=2)
        for j, run in enumerate(runs):
            st = (run.get("floor_summary") or {}).get(floor)
            if st:
                ax.hlines(st["median"], j - 0.45, j + 0.45, colors="black", linewidth=1.2,
                          linestyles="--" if floor == "memcpy_s" else ":",
                          label="memcpy floor" if floor == "memcpy_s" else "disk floor (write+fsync)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("seconds")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{r['workload']}\n{fmt_bytes(r.get('raw_bytes', 0))}, ws{r['world']}" for r in runs],
                           fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8)
    fig.suptitle(f"asyncckpt benchmark {doc['name']}: medians, whiskers min–max")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
