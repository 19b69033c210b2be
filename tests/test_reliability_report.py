"""The root conftest writes the reliability report only when asked (``--reliability-report=PATH``, what
``make reliability`` passes): a plain ``make test`` never rewrites docs/RELIABILITY.md."""
from __future__ import annotations

import importlib.util
import os
import types

import pytest

import reliability

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def root_conftest(monkeypatch):
    """A private copy of the root conftest module (its hooks called by hand on a fake session)."""
    spec = importlib.util.spec_from_file_location("root_conftest_copy", os.path.join(ROOT, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv(reliability.ENV, raising=False)
    return module


def _complete_session(module, report: str | None):
    """Run the conftest's hooks for a session in which every reliability test passed."""
    config = types.SimpleNamespace(getoption=lambda name: report if name == module.OPTION else None,
                                   pluginmanager=types.SimpleNamespace(get_plugin=lambda name: None))
    session = types.SimpleNamespace(config=config, items=[types.SimpleNamespace(nodeid=f"{m}::test_x")
                                                          for m in reliability.MODULES])
    module.pytest_configure(config)
    module.pytest_sessionstart(session)
    module.pytest_collection_finish(session)
    reliability.record("Faults", "a case", 1, 1)
    for item in session.items:
        module.pytest_runtest_logreport(types.SimpleNamespace(nodeid=item.nodeid, failed=False, skipped=False,
                                                              when="call"))
    module.pytest_sessionfinish(session, 0)


def test_no_report_without_the_option(root_conftest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {n: os.stat(os.path.join(ROOT, "docs", n)).st_mtime_ns for n in os.listdir(os.path.join(ROOT, "docs"))}
    _complete_session(root_conftest, None)
    assert reliability.ENV not in os.environ  # nothing was even recorded
    after = {n: os.stat(os.path.join(ROOT, "docs", n)).st_mtime_ns for n in os.listdir(os.path.join(ROOT, "docs"))}
    assert after == before and os.listdir(tmp_path) == []


def test_report_written_where_the_option_says(root_conftest, tmp_path):
    report = tmp_path / "out" / "RELIABILITY.md"
    _complete_session(root_conftest, str(report))
    text = report.read_text()
    assert "| a case | 1 | 1 |" in text and "make reliability" in text
    assert reliability.ENV not in os.environ
