"""The GPU benchmark (benchmarks/gpu.py) end to end in its smoke mode, so the script is known to work before it
meets a GPU: every system of the shipped config is run (CUDA-only ones skipped without CUDA), each save carries
every figure, a system whose asyncckpt config is refused is recorded as such and the run goes on. No timing
asserts. The two runs (the shipped config and a tiny one of the test's own) start together, when the first test
that needs one starts: each is seconds of imports and process starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "benchmarks", "configs", "gpu_10gb.yaml")
FIGURES = ("call_s", "effective_stall_s", "training_lost_s", "ttd_s", "peak_host_bytes", "bytes_on_disk")


TINY = textwrap.dedent("""
    name: gpu_tiny
    workload: {name: unused, vocab: 256}
    systems:
      - {name: asyncckpt_default, kind: asyncckpt}
      - {name: asyncckpt_raw, kind: asyncckpt, config: {codec: {compression: false}}}
      - {name: asyncckpt_bad, kind: asyncckpt, config: {codec: {compression: sometimes}}}
      - {name: torch_save, kind: torch_save}
    smoke:
      workload: {name: tiny, vocab: 64, d_model: 16, n_layers: 1, n_heads: 2, seq_len: 8, batch: 2}
      saver_lead_s: 0
      base_steps: 1
      disk_floor_mib: 1
      isolate: false
      warm_saves: 2
""")


class _Run:
    """``python -m benchmarks.gpu --config CONFIG --smoke --out OUT``, started at once; :meth:`result` waits."""

    def __init__(self, config: str, out, logs):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        self.stdout, self.stderr = logs / "stdout", logs / "stderr"
        with open(self.stdout, "w") as out_f, open(self.stderr, "w") as err_f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.gpu", "--config", config, "--smoke", "--out", str(out)],
                cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True)
        self.deadline = time.monotonic() + 170

    def result(self) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.proc.args} still running after 170 s:\n{self.stderr.read_text()[-3000:]}")
        return subprocess.CompletedProcess(self.proc.args, code, self.stdout.read_text(), self.stderr.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs, started together: {"shipped": (run, its out dir), "tiny": (run, its out dir)}."""
    tmp = tmp_path_factory.mktemp("gpu_smoke")
    config = tmp / "gpu_tiny.yaml"
    config.write_text(TINY)
    started = {}
    for name, path in (("shipped", CONFIG), ("tiny", str(config))):
        (tmp / name).mkdir()
        started[name] = (_Run(path, tmp / name / "out", tmp / name), tmp / name / "out")
    yield started
    for run, _ in started.values():
        run.stop()


def _assert_measured(name: str, res: dict, warm_saves: int) -> None:
    assert res["status"] == "ok", f"{name}: {res.get('reason')}\n{res.get('traceback', '')}"
    assert len(res["saves"]) == 1 + warm_saves
    for save in res["saves"]:
        assert all(save.get(k) is not None for k in FIGURES), (name, save)
        assert save["steps"] >= 1 and save["ttd_s"] > 0 and save["bytes_on_disk"] > 0
    assert res["load_s"] > 0


@pytest.mark.timeout(180)
def test_the_shipped_gpu_config_runs_in_smoke_mode(runs):
    import torch
    import yaml

    from benchmarks.gpu import GpuSpec

    run, tmp_path = runs["shipped"]
    proc = run.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = GpuSpec.from_dict(yaml.safe_load(open(CONFIG)), smoke=True)
    out = tmp_path / "gpu_10gb_smoke"
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["systems"]) == [s.name for s in spec.systems]
    for s in spec.systems:
        res = doc["systems"][s.name]
        if s.cuda_only and not torch.cuda.is_available():
            assert res["status"] == "skipped" and "CUDA" in res["reason"]
        elif s.kind == "asyncckpt" and res["status"] == "failed":  # snapshot keys not (yet) known to this asyncckpt
            assert res["reason"].startswith("config refused: ") and "snapshot" in res["reason"]
        elif s.kind == "torch_save":
            _assert_measured(s.name, res, spec.warm_saves)
        else:  # a peer may fail on some torch versions: recorded with its reason
            assert res["status"] == "ok" or res.get("reason"), s.name
    rows = {t["target"]: t for t in doc["targets"]}
    for system in ("asyncckpt_lazy", "asyncckpt_service"):  # issue 11's target has its figures in every run
        if doc["systems"][system]["status"] == "ok":
            assert rows[f"{system}: training time lost ≤ 1% of the steps' time (call → durable)"]["value"] is not None
    floors = doc["floors"]
    assert floors["disk_GBps"] > 0 and (floors.get("d2h_s") or floors.get("memcpy_s"))
    assert doc["targets"] and {t["result"] for t in doc["targets"]} <= {"PASS", "MISS", "N/A"}
    md = (out / "results.md").read_text()
    for s in spec.systems:
        assert f"| `{s.name}` |" in md
    assert "## Targets" in md and "sequential write + fsync" in md
    assert (out / "results.png").exists() or "no plot: matplotlib is not installed" in md
    assert not (tmp_path / "tmp").exists() or not os.listdir(tmp_path / "tmp"), "checkpoints left behind"


@pytest.mark.timeout(180)
def test_asyncckpt_is_measured_and_a_refused_config_is_recorded(runs):
    run, out = runs["tiny"]
    proc = run.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_tiny_smoke" / "results.json").read_text())
    for name in ("asyncckpt_default", "asyncckpt_raw", "torch_save"):
        _assert_measured(name, doc["systems"][name], 2)
    raw = doc["systems"]["asyncckpt_raw"]["saves"][-1]["bytes_on_disk"]
    assert raw > doc["systems"]["asyncckpt_default"]["saves"][-1]["bytes_on_disk"]  # its config reached the saver
    bad = doc["systems"]["asyncckpt_bad"]
    assert bad["status"] == "failed" and bad["reason"].startswith("config refused: ") and "codec.compression" in bad["reason"]
    assert "| `asyncckpt_bad` | failed: config refused" in (out / "gpu_tiny_smoke" / "results.md").read_text()


@pytest.mark.parametrize("data,match", [
    ({"systems": [{"name": "a", "kind": "torch_save"}]}, "'workload' must be a mapping"),
    ({"workload": {"name": "w"}, "systems": []}, "'systems' must be a non-empty list"),
    ({"workload": {"name": "w"}, "systems": [{"name": "a", "kind": "nope"}]}, r"systems\[0\]\.kind"),
    ({"workload": {"name": "w"}, "systems": [{"name": "a", "kind": "torch_save", "typo": 1}]}, "systems\\[0\\].'typo'"),
    ({"workload": {"name": "w", "widht": 3}, "systems": [{"name": "a", "kind": "torch_save"}]}, "workload.'widht'"),
    ({"workload": {"name": "w"}, "systems": [{"name": "a", "kind": "torch_save"}], "reps": 3}, "unknown key 'reps'"),
    ({"workload": {"name": "w"}, "systems": [{"name": "a", "kind": "torch_save"}] * 2}, "unique"),
])
def test_the_gpu_config_is_checked(data, match):
    from benchmarks.gpu import GpuSpec
    from benchmarks.spec import SpecError

    with pytest.raises(SpecError, match=match):
        GpuSpec.from_dict(data)
