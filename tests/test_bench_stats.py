"""The benchmark's statistics on fixed inputs: medians with quartiles, a figure whose spread exceeds its value
flagged as noise (in the tables, the ratios and the targets) instead of shown as a result, and the loop
overhead measured in A/B pairs whose order alternates."""
from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks package lives at the repository root, next to tests/
    sys.path.insert(0, ROOT)

from benchmarks import report, targets  # noqa: E402
from benchmarks.measure import Measurer  # noqa: E402

# the loop overheads of asyncckpt on gpt_0p1gb that were published as a median of -1.01 s
NOISY = [-1.01, -4.14, 0.183, -0.25, 0.12]


def test_quartiles_and_a_steady_figure():
    st = report.stats([5.0, 1.0, 4.0, 2.0, 3.0, None, math.nan])
    assert st == {"median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0, "q3": 4.0, "n": 5, "noise": False}
    assert report.fmt_stats(st, "time") == "3.00 s (1.00 s–5.00 s)"


@pytest.mark.parametrize("values,noise", [
    (NOISY, True),  # IQR -1.01..0.12 (1.13) > |median| 0.25
    ([0.30, 0.32, 0.28, 0.31], False),
    ([0.1, 0.5, 0.9, 1.3], False),  # median 0.7, IQR 0.4..1.0 = 0.6: wide, but narrower than the value
    ([0.1, 0.2, 1.5, 1.6], True),  # median 0.85, IQR 0.175..1.525 = 1.35
    ([-0.3, -0.31, -0.29], False),  # a steady negative figure is a result (a speed-up), not noise
    ([0.0, 0.0, 0.0], False),  # no spread at all
    ([-0.001, 0.001], True),  # spread around a zero median
    ([7.0], False),  # one sample: nothing to judge
])
def test_noise_is_a_spread_larger_than_the_value(values, noise):
    st = report.stats(values)
    assert st["noise"] is ((st["q3"] - st["q1"]) > abs(st["median"])) is noise


def test_a_noisy_figure_is_not_printed_as_a_result():
    st = report.stats(NOISY)
    text = report.fmt_stats(st, "time")
    assert text.startswith("noise (IQR −1.01 s to 120 ms, n=5)")
    assert "250" not in text  # the median is not shown
    steady = report.stats([1.0, 1.1, 0.9])
    assert report.fmt_ratio(report.ratio(st, steady), st, steady) == "noise"
    assert report.fmt_ratio(report.ratio(steady, steady), steady, steady) == "1.00×"


def test_a_target_on_a_noisy_figure_is_noise_not_pass_or_miss():
    summary = {"asyncckpt": {"ttd_warm_s": report.stats([1.0, 1.0, 1.1]), "load_s": report.stats(NOISY)},
               "torch_save": {"ttd_warm_s": report.stats([3.0, 3.1, 2.9]), "load_s": report.stats([1.0, 1.0])}}
    run = {"workload": "gpt", "world": 1, "raw_bytes": 1 << 20, "workload_info": {"kind": "gpt"},
           "systems": {n: {"status": "ok"} for n in summary}, "summary": summary}
    rows = {t["target"]: t for t in targets.evaluate({"runs": [run]})}
    assert rows["time to durable ≤ 0.5 × torch.save+fsync"]["result"] == "PASS"
    load = rows["load time ≤ 1.0 × torch.load"]
    assert load["result"] == "NOISE" and "spread exceeds its median" in load["detail"]


def _service_run(thread_loss: list, service_loss: list, thread_mode: str = "thread") -> dict:
    summary = {"asyncckpt": {"loop_overhead_s": report.stats(thread_loss), "ttd_warm_s": report.stats([2.0, 2.1, 1.9])},
               "asyncckpt_service": {"loop_overhead_s": report.stats(service_loss),
                                     "ttd_warm_s": report.stats([1.0, 1.1, 0.9])}}
    systems = {"asyncckpt": {"status": "ok", "info": {"config": {"writer": {"mode": thread_mode}}}},
               "asyncckpt_service": {"status": "ok", "info": {"config": {"writer": {"mode": "service"}}}}}
    return {"workload": "gpt", "world": 1, "raw_bytes": 1 << 20, "workload_info": {"kind": "gpt"},
            "systems": systems, "summary": summary}


@pytest.mark.parametrize("thread_loss, service_loss, thread_mode, loop, ttd", [
    ([1.0, 1.1, 0.9], [0.2, 0.25, 0.15], "thread", "PASS", "PASS"),
    ([1.0, 1.1, 0.9], [0.5, 0.45, 0.55], "thread", "MISS", "PASS"),
    ([1.0, 1.1, 0.9], [-0.05, 0.0, 0.05], "thread", "NOISE", "PASS"),  # service lost nothing measurable
    ([-0.1, 0.0, -0.05], [0.2, 0.25, 0.15], "thread", "N/A", "PASS"),  # thread mode lost nothing: no ratio
    ([1.0, 1.1, 0.9], [0.2, 0.25, 0.15], "service", "N/A", "N/A"),  # the reference was not thread mode
])
def test_service_mode_targets_against_thread_mode(thread_loss, service_loss, thread_mode, loop, ttd):
    rows = {t["target"]: t for t in targets.evaluate({"runs": [_service_run(thread_loss, service_loss, thread_mode)]})}
    assert rows["loop overhead ≤ 0.3 × thread mode (writer.mode: service)"]["result"] == loop
    assert rows["time to durable ≤ 1.1 × thread mode (writer.mode: service)"]["result"] == ttd


class _Steps:
    """Stands in for Measurer._steps: K steps take 10 s without a save, 12 s with one."""

    def __init__(self):
        self.calls = []

    def __call__(self, k, system, tag):
        self.calls.append("B" if system is not None else "A")
        out = {"total_s": 12.0 if system is not None else 10.0, "steps_s": [1.0] * k}
        if system is not None:
            out.update(stall_s=0.01, ttd_s=3.0, durable_in_loop=True, wait_after_loop_s=0.0)
        return out


def test_loop_pairs_alternate_their_order_and_subtract_the_neighbour():
    m = Measurer.__new__(Measurer)
    m._steps = steps = _Steps()
    pairs = [m._loop(object(), 4, i) for i in range(4)]
    assert "".join(steps.calls) == "ABBAABBA"
    assert [p["order"] for p in pairs] == ["AB", "BA", "AB", "BA"]
    assert all(p["overhead_s"] == 2.0 and p["with_s"] == 12.0 and p["without_s"] == 10.0 for p in pairs)
    st = report.stats(report.system_metrics({"loop": pairs}, 1)["loop_overhead_s"])
    assert (st["median"], st["noise"]) == (2.0, False)


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (16, True), (-1, False), ("2", False), (True, False),
                                       (1.5, False), (None, False), (1025, False)])
def test_torch_threads_is_a_strict_run_key(value, ok):
    from benchmarks.spec import RunSpec, SpecError

    data = {"name": "t", "torch_threads": value, "workloads": [{"name": "w", "vocab": 8, "d_model": 8, "n_layers": 1,
                                                                 "n_heads": 1, "seq_len": 4, "batch": 1}]}
    if ok:
        spec = RunSpec.from_dict(data)
        spec.validate()
        assert spec.torch_threads == value
    else:
        with pytest.raises(SpecError, match="torch_threads"):
            RunSpec.from_dict(data).validate()


def _cpu_run(stall: list, paired: list | None, floor: list, first: list | None = None,
             first_after: list | None = None) -> dict:
    mine = {"stall_warm_s": report.stats(stall), "stall_first_s": report.stats(first or stall)}
    if paired is not None:
        mine["memcpy_paired_warm_s"] = report.stats(paired)
    if first_after is not None:
        mine["first_after_s"] = report.stats(first_after)
    return {"workload": "gpt", "world": 1, "raw_bytes": 1 << 20, "workload_info": {"kind": "gpt"},
            "systems": {"asyncckpt": {"status": "ok"}}, "summary": {"asyncckpt": mine},
            "floor_summary": {"memcpy_s": report.stats(floor)}}


@pytest.mark.parametrize("paired, result", [
    (None, "MISS"),  # only the run's floor (measured once, on a quieter moment): 0.6 / 0.3 s
    ([0.5, 0.52, 0.48], "PASS"),  # the floor timed right before each save: 0.6 / 0.5 s
])
def test_warm_stall_is_held_to_the_floor_timed_beside_it(paired, result):
    rows = {t["target"]: t for t in targets.evaluate({"runs": [_cpu_run([0.6, 0.62, 0.58], paired, [0.3, 0.3, 0.3])]})}
    row = rows["warm stall ≤ 1.3 × memcpy floor"]
    assert row["result"] == result
    assert ("right before each save" in row["detail"]) is (paired is not None)


FIRST = "first-save stall ≤ 1.5 × warm stall (saver built ≥ 3 s before, no prepare())"


@pytest.mark.parametrize("first, first_after, result", [
    ([0.5, 0.55, 0.45], None, "N/A"),  # a run whose first save came right after the saver was built
    ([0.5, 0.55, 0.45], [0.1, 0.1, 0.1], "N/A"),
    ([0.5, 0.55, 0.45], [3.0, 3.0, 3.1], "PASS"),  # 0.5 / 0.4
    ([0.9, 0.95, 0.85], [3.0, 3.0, 3.1], "MISS"),  # 0.9 / 0.4
])
def test_first_save_of_a_saver_built_ahead_is_held_to_the_warm_stall(first, first_after, result):
    run = _cpu_run([0.4, 0.41, 0.39], None, [0.3], first=first, first_after=first_after)
    row = {t["target"]: t for t in targets.evaluate({"runs": [run]})}[FIRST]
    assert row["result"] == result, row
    assert ("first_save_after_s" in row["detail"]) is (result == "N/A")


class _FakeSystem:
    """Stands in for a benchmarks.systems.System: records when it was opened and when each save was called."""

    name = "fake"
    made: list["_FakeSystem"] = []

    def __init__(self, wl, ctx, options):
        self.events: list[tuple[str, float]] = []
        self.dir = None
        self.made.append(self)

    def info(self):
        return {}

    def open(self, d):
        import time

        os.makedirs(d, exist_ok=True)
        self.dir = d
        self.events.append(("open", time.perf_counter()))
        return {}

    def save(self, tag):
        import time

        from benchmarks.systems import Pending

        t = time.perf_counter()
        self.events.append(("save", t))
        return Pending.completed(t)

    def staging_bytes(self):
        return 0

    def allocations(self):
        return None

    def path(self, tag):
        return self.dir

    def load(self, tag):
        pass

    def close(self):
        pass


def test_a_repetition_waits_before_its_first_save_and_times_the_floor_beside_every_save(tmp_path):
    import torch

    from benchmarks.spec import RunSpec
    from benchmarks.systems import Ctx

    run = RunSpec.from_dict({"name": "t", "reps": 1, "warm_saves": 2, "first_save_after_s": 0.2, "paired_memcpy": True,
                             "warmup": False, "loop": {"enabled": False}, "growth": {"saves": 0},
                             "workloads": [{"name": "w"}]})
    wl = type("Wl", (), {"state_tensors": lambda self: [torch.ones(1 << 16), torch.ones(3, dtype=torch.float64)]})()
    _FakeSystem.made.clear()
    out = Measurer(_FakeSystem, wl, Ctx(), run, str(tmp_path), log=lambda _m: None).measure()
    assert out["status"] == "ok", out.get("traceback")
    (rep,) = out["reps"]
    (opened, t_open), (_, t_first) = _FakeSystem.made[0].events[:2]
    assert opened == "open" and t_first - t_open >= 0.2 and rep["first_after_s"] >= 0.2
    saves = [rep["first"], *rep["warm"]]
    assert len(saves) == 3 and all(s["memcpy_s"] > 0 for s in saves)
    st = report.system_metrics(out, 1)
    assert len(st["memcpy_paired_warm_s"]) == 2 and st["first_after_s"] == [rep["first_after_s"]]


@pytest.mark.parametrize("key, value, ok", [
    ("first_save_after_s", 0, True), ("first_save_after_s", 3, True), ("first_save_after_s", 2.5, True),
    ("first_save_after_s", -1, False), ("first_save_after_s", "3", False), ("first_save_after_s", True, False),
    ("first_save_after_s", 601, False), ("paired_memcpy", True, True), ("paired_memcpy", False, True),
    ("paired_memcpy", 1, False), ("paired_memcpy", "yes", False),
])
def test_first_save_after_s_and_paired_memcpy_are_strict_run_keys(key, value, ok):
    from benchmarks.spec import RunSpec, SpecError

    data = {"name": "t", key: value, "workloads": [{"name": "w"}]}
    if ok:
        assert getattr(RunSpec.from_dict(data), key) == value
    else:
        with pytest.raises(SpecError, match=key):
            RunSpec.from_dict(data)


def test_every_shipped_benchmark_config_is_valid():
    from benchmarks.spec import RunSpec

    folder = os.path.join(ROOT, "benchmarks", "configs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert "cpu_stall.yaml" in names
    for name in names:
        if name.startswith("gpu"):  # benchmarks.gpu's own format (tests/test_bench_gpu_smoke.py runs it)
            continue
        spec = RunSpec.from_yaml(os.path.join(folder, name))
        assert spec.workloads, name
