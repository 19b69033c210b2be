"""The benchmark end to end at the tiny size: every system runs, and the JSON, the Markdown and the plot name
every one of them; asyncckpt's systems must succeed, a peer that fails is recorded as failed (with its error)
and the run goes on. No timing asserts (timings at this size mean nothing).

One run serves both: benchmarks/configs/tiny.yaml with a test-only plugin whose peer always fails, run before
asyncckpt (a run of the benchmark costs seconds of imports and process starts)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_service import runtime  # noqa: F401 - fixture: a private runtime directory for the service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks package lives at the repository root, next to tests/
    sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "benchmarks", "configs", "tiny.yaml")


def _available_systems() -> list[str]:
    from benchmarks.systems import SYSTEMS

    return [name for name, cls in SYSTEMS.items() if cls.unavailable(1) is None]


def _run_benchmark(config: str, out, systems: list[str], extra_path: str = "") -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (ROOT, extra_path, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--config", config, "--out", str(out), "--reps", "1",
         "--systems", ",".join(systems)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=400)


def _assert_ran(name: str, res: dict, growth_saves: int) -> None:
    assert res["status"] == "ok", f"{name}: {res.get('reason')}\n{res.get('traceback', '')}"
    assert len(res["reps"]) == 1 and res["reps"][0]["first"]["ttd_s"] is not None
    assert res["reps"][0]["bytes_on_disk"] > 0
    assert res["growth"] and len(res["growth"]["rss"]) == growth_saves


FAILING_PEER = textwrap.dedent("""
    from benchmarks.systems import System, register


    @register
    class FailingPeer(System):
        name = "failing_peer"
        notes = "a test-only peer whose saves always fail"

        def save(self, tag):
            raise RuntimeError("deliberate failure of the test-only peer")
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The shipped tiny configuration, plus the failing peer's plugin, over every available system and the
    failing peer (before asyncckpt): the finished process, the results directory and the systems."""
    import yaml

    tmp = tmp_path_factory.mktemp("bench")
    plugins = tmp / "plugins"
    plugins.mkdir()
    (plugins / "failing_peer_plugin.py").write_text(FAILING_PEER)
    with open(CONFIG) as f:
        data = yaml.safe_load(f)
    assert not data.get("plugins")
    data["plugins"] = ["failing_peer_plugin"]
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    systems = _available_systems()
    assert "torch_save" in systems and "asyncckpt" in systems
    systems.insert(systems.index("asyncckpt"), "failing_peer")  # the failing one runs before asyncckpt
    proc = _run_benchmark(str(config), tmp / "out", systems, extra_path=str(plugins))
    return proc, tmp / "out", systems


@pytest.mark.timeout(420)
def test_benchmark_tiny_end_to_end(tiny_run):
    proc, tmp_path, systems = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "tiny"
    doc = json.loads((out / "results.json").read_text())
    (run,) = doc["runs"]
    assert set(run["systems"]) == set(systems)
    md = (out / "results.md").read_text()
    from benchmarks.spec import ASYNCCKPT_MODES  # asyncckpt's modes and its framework integrations

    for name, res in run["systems"].items():
        if name not in ASYNCCKPT_MODES and res["status"] == "failed":  # a peer may fail on some versions
            assert res.get("reason") and f"| `{name}` | failed: {res['reason'][:40]}" in md, name
            continue
        _assert_ran(name, res, doc["config"]["growth"]["saves"])
        assert res["loop"], name
    floors = run["floors"]
    assert floors["memcpy_s"] and floors["disk"] and floors["codec"]["compress_1thread"]["MBps"] > 0
    assert doc["targets"] and {t["result"] for t in doc["targets"]} <= {"PASS", "MISS", "NOISE", "N/A"}

    for name in systems:
        assert f"`{name}`" in md
    assert "## Targets" in md and "floor: memcpy" in md
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "results.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "tmp").exists(), "checkpoints of the run are left behind"


@pytest.mark.timeout(420)
def test_a_failing_peer_is_recorded_and_the_run_goes_on(tiny_run):
    proc, tmp_path, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "system failing_peer failed on tiny: RuntimeError: deliberate failure" in proc.stdout
    progress = proc.stderr  # the measuring process's progress lines
    assert progress.index("] failing_peer (round 0)") < progress.index("] asyncckpt (round 0)"), progress[-3000:]

    doc = json.loads((tmp_path / "tiny" / "results.json").read_text())
    (run,) = doc["runs"]
    failed = run["systems"]["failing_peer"]
    assert failed["status"] == "failed"
    assert failed["reason"] == "RuntimeError: deliberate failure of the test-only peer"
    assert "deliberate failure" in failed["traceback"]
    for name in ("torch_save", "asyncckpt"):
        _assert_ran(name, run["systems"][name], doc["config"]["growth"]["saves"])
    md = (tmp_path / "tiny" / "results.md").read_text()
    assert "| `failing_peer` | failed: RuntimeError: deliberate failure of the test-only peer |" in md
    assert "| `asyncckpt` | " in md and "| `torch_save` | " in md
    assert any(t["result"] in ("PASS", "MISS") for t in doc["targets"])  # asyncckpt vs torch.save still compared


def _run_doc(stalls: dict[str, tuple[float, float]]) -> dict:
    """A results document with one GPT run whose systems have the given (first, warm) stall medians."""
    summary = {name: {"stall_first_s": {"median": first}, "stall_warm_s": {"median": warm}}
               for name, (first, warm) in stalls.items()}
    return {"runs": [{"workload": "gpt", "world": 1, "raw_bytes": 1 << 20, "workload_info": {"kind": "gpt"},
                      "systems": {name: {"status": "ok"} for name in stalls}, "summary": summary}]}


def test_integration_targets_compare_each_integration_with_its_framework():
    from benchmarks.targets import evaluate

    doc = _run_doc({"lightning_async": (2.0, 1.0), "asyncckpt_lightning": (0.5, 0.1),
                    "deepspeed": (1.0, 1.0), "deepspeed_asyncckpt": (0.5, 0.3)})
    rows = {t["target"]: t for t in evaluate(doc)}
    assert len(rows) == 2, "a run of the integrations only is not held to asyncckpt's own targets"
    lightning = next(t for name, t in rows.items() if "Lightning" in name)
    deepspeed = next(t for name, t in rows.items() if "DeepSpeed" in name)
    assert (lightning["result"], lightning["value"]) == ("PASS", pytest.approx(0.1))
    assert (deepspeed["result"], deepspeed["value"]) == ("MISS", pytest.approx(0.3))
    assert "first-save stall" in lightning["detail"]


def test_integration_target_is_na_when_one_side_is_missing_and_absent_when_both_are():
    from benchmarks.targets import evaluate

    rows = evaluate(_run_doc({"asyncckpt_lightning": (0.5, 0.1)}))
    assert [(t["result"], "Lightning" in t["target"]) for t in rows] == [("N/A", True)]
    rows = evaluate(_run_doc({"asyncckpt": (0.5, 0.1), "torch_save": (1.0, 1.0)}))
    assert rows and not any("Lightning" in t["target"] or "DeepSpeed" in t["target"] for t in rows)


@pytest.mark.timeout(300)
def test_service_budget_benchmark_runs_two_ranks_on_one_service(tmp_path, runtime):
    """benchmarks/service_budget.py under torchrun (2 local ranks): one writer service, whose encode threads
    are the budget; its JSON and its table say so."""
    out = tmp_path / "budget.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "benchmarks.service_budget", "--mib", "2", "--saves", "1", "--threads", "2", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                       "BENCH_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and len(doc["services"]) == 1 and len(doc["windows"]) == 1
    service = doc["windows"][0]["processes"]["service"]
    assert service["acs-encode"]["threads"] == 2 and service["acs-encode"]["running_max"] <= 2
    for trainer in ("trainer0", "trainer1"):
        assert "ac-encode" not in doc["windows"][0]["processes"][trainer]
    assert "one service yes; encode threads 2 (budget 2)" in proc.stdout and "-> PASS" in proc.stdout, proc.stdout
