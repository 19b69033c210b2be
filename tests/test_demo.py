"""scripts/train_demo.py (what `make demo` runs) end to end, with a tiny model."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def demo():
    spec = importlib.util.spec_from_file_location("train_demo", os.path.join(ROOT, "scripts", "train_demo.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield module
    del sys.modules[spec.name]
    torch.set_num_threads(threads)  # the demo sets the process's thread count and RNG
    torch.set_rng_state(rng)


def test_demo_saves_resumes_and_reports(demo, tmp_path, capsys):
    out = str(tmp_path / "ckpt")
    os.makedirs(out)  # an empty directory may be cleared
    assert demo.main(["--out", out, "--steps", "6", "--save-every", "2", "--resume-steps", "2", "--tiny"]) == 0
    text = capsys.readouterr().out
    assert "resume OK" in text
    assert text.count("stall") == 3 and text.count("durable after") == 3
    for step in (2, 4, 6):
        assert f"global_step{step}" in text
    assert "repeats the uninterrupted run exactly" in text
    assert open(os.path.join(out, "latest")).read() == "global_step6\n"

    # a second run clears the checkpoints of the first
    assert demo.main(["--out", out, "--steps", "2", "--save-every", "2", "--resume-steps", "0", "--tiny"]) == 0
    assert sorted(os.listdir(out)) == ["global_step2", "latest"]


def test_demo_refuses_to_clear_a_foreign_directory(demo, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="refusing to clear"):
        demo.main(["--out", str(tmp_path), "--steps", "2", "--save-every", "2", "--tiny"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"
