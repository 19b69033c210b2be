"""Root conftest: with ``--reliability-report=PATH`` (what ``make reliability`` passes), collects the counts
the reliability tests record (tests/reliability.py) and renders them to PATH (docs/RELIABILITY.md) at the end
of a session in which every reliability test ran and passed. Without the option nothing is recorded and no
file is written: ``make test`` never rewrites a tracked file."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import reliability  # noqa: E402

OPTION = "--reliability-report"
COMMAND = "make reliability"


class _Tracker:
    def __init__(self) -> None:
        self.collected: set[str] = set()
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.skipped: set[str] = set()
        self.deselected = False


def _module(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return path if path in reliability.MODULES else None


def pytest_addoption(parser) -> None:
    parser.addoption(OPTION, metavar="PATH", default=None,
                     help="write the reliability report (docs/RELIABILITY.md) to PATH if every reliability test "
                          f"ran and passed ({' '.join(reliability.MODULES)})")


def pytest_configure(config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller owns the records file
        return
    if not config.getoption(OPTION):
        return
    fd, path = tempfile.mkstemp(prefix="asyncckpt-reliability-", suffix=".jsonl")
    os.close(fd)
    os.environ[reliability.ENV] = path
    config._reliability = _Tracker()


def pytest_deselected(items) -> None:
    tracker = _tracker()
    if tracker is not None and any(_module(i.nodeid) for i in items):
        tracker.deselected = True


def pytest_collection_finish(session) -> None:
    tracker = getattr(session.config, "_reliability", None)
    if tracker is not None:
        tracker.collected = {i.nodeid for i in session.items if _module(i.nodeid)}


def pytest_runtest_logreport(report) -> None:
    tracker = _tracker()
    if tracker is None or not _module(report.nodeid):
        return
    if report.failed:
        tracker.failed.add(report.nodeid)
    elif report.skipped:
        tracker.skipped.add(report.nodeid)
    elif report.when == "call":
        tracker.passed.add(report.nodeid)


_config = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session) -> None:
    global _config
    _config = session.config


def _tracker():
    return getattr(_config, "_reliability", None) if _config is not None else None


def _environment() -> str:
    import platform

    torch = sys.modules.get("torch")
    return (f"Python {platform.python_version()}, torch {getattr(torch, '__version__', '?')}, "
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs")


def pytest_sessionfinish(session, exitstatus) -> None:
    tracker = getattr(session.config, "_reliability", None)
    path = os.environ.get(reliability.ENV)
    if tracker is None or not path:
        return
    report = os.path.abspath(session.config.getoption(OPTION))
    try:
        records = reliability.load(path)
        ran = tracker.passed | tracker.skipped
        complete = (tracker.collected and not tracker.failed and not tracker.deselected and tracker.collected <= ran
                    and {_module(n) for n in tracker.collected} == set(reliability.MODULES))
        if records and complete:
            knobs = [f"{k}={os.environ[k]} " for k in ("ASYNCCKPT_CRASH_KILLS", "ASYNCCKPT_CRASH_SEED") if os.environ.get(k)]
            command = "".join(knobs) + COMMAND
            date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            text = reliability.render(records, date=date, command=command, environment=_environment())
            os.makedirs(os.path.dirname(report), exist_ok=True)
            tmp = report + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, report)
            message = f"reliability report written to {report}"
        else:
            message = (f"reliability report NOT written to {report}: it needs every test of "
                       f"{', '.join(reliability.MODULES)} run and passed")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(message)
    finally:
        del os.environ[reliability.ENV]
        try:
            os.unlink(path)
        except OSError:
            pass
