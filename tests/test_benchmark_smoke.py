"""The benchmark end to end at the tiny size: every system runs, and the JSON, the Markdown and the plot name
every one of them. No timing asserts (timings at this size mean nothing)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks package lives at the repository root, next to tests/
    sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "benchmarks", "configs", "tiny.yaml")


def _available_systems() -> list[str]:
    from benchmarks.systems import SYSTEMS

    return [name for name, cls in SYSTEMS.items() if cls.unavailable(1) is None]


@pytest.mark.timeout(180)
def test_benchmark_tiny_end_to_end(tmp_path):
    systems = _available_systems()
    assert "torch_save" in systems and "asyncckpt" in systems
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--config", CONFIG, "--out", str(tmp_path), "--reps", "1",
         "--systems", ",".join(systems)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "tiny"
    doc = json.loads((out / "results.json").read_text())
    (run,) = doc["runs"]
    assert set(run["systems"]) == set(systems)
    for name, res in run["systems"].items():
        assert res["status"] == "ok", f"{name}: {res.get('reason')}\n{res.get('traceback', '')}"
        assert len(res["reps"]) == 1 and res["reps"][0]["first"]["ttd_s"] is not None
        assert res["reps"][0]["bytes_on_disk"] > 0
        assert res["growth"] and len(res["growth"]["rss"]) == doc["config"]["growth"]["saves"]
        assert res["loop"], name
    floors = run["floors"]
    assert floors["memcpy_s"] and floors["disk"] and floors["codec"]["compress_1thread"]["MBps"] > 0
    assert doc["targets"] and {t["result"] for t in doc["targets"]} <= {"PASS", "MISS", "N/A"}

    md = (out / "results.md").read_text()
    for name in systems:
        assert f"`{name}`" in md
    assert "## Targets" in md and "floor: memcpy" in md
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "results.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "tmp").exists(), "checkpoints of the run are left behind"
