"""The process that runs README.md's ``# requires:`` blocks for tests/test_readme.py (see its docstring).

:func:`serve` runs in a fresh interpreter started with ``python -c``: it imports the modules the caller names (what
every such block imports: torch, asyncckpt, deepspeed.ops; a few seconds each), reads the blocks as JSON from
stdin, and forks one child per block, all at once. A child is what ``python -c <block>`` would be: its own process
with an empty ``__main__`` namespace, stdin from /dev/null, stdout and stderr to a file, the interpreter's normal
exit (non-daemon threads joined, ``atexit`` hooks run) and exit status 1 on an uncaught exception. The parent
waits for every child (each its own process group, killed at the deadline) and prints
``{line: [exit status or None, output]}`` as JSON."""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def _child(job: dict, log: str) -> None:
    """Becomes the block's process; never returns (the block's exception, if any, ends the interpreter)."""
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)
    main = sys.modules["__main__"].__dict__
    dunders = {k: v for k, v in main.items() if k.startswith("__") and k.endswith("__")}
    main.clear()  # the block sees what `python -c` gives it, nothing of this module
    main.update(dunders)
    for name, text, first_line in job["code"]:
        exec(compile("\n" * (first_line - 1) + text, name, "exec"), main)
    raise SystemExit(0)


def serve(preload: list[str]) -> None:
    for name in preload:
        try:
            __import__(name)
        except ImportError:  # an optional package: the block that needs it is skipped, or fails on its own
            pass
    request = json.load(sys.stdin)
    logs, deadline = request["logs"], time.monotonic() + request["timeout_s"]
    children: dict[int, tuple[str, str]] = {}
    for job in request["jobs"]:
        log = os.path.join(logs, f"{job['line']}.log")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job, log)
        try:
            os.setpgid(pid, pid)  # as the child does, so that the group exists before a killpg at the deadline
        except OSError:  # it already set it, or already exited
            pass
        children[pid] = (str(job["line"]), log)
    status: dict[str, int | None] = {}
    while len(status) < len(children) and time.monotonic() < deadline:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
        elif pid in children:
            status[children[pid][0]] = os.waitstatus_to_exitcode(code)
    for pid, (line, _) in children.items():
        if line not in status:  # past the deadline: the block and whatever it started
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status[line] = None
    outcomes = {}
    for line, log in children.values():
        with open(log, errors="replace") as f:
            outcomes[line] = [status[line], f.read()]
    print(json.dumps(outcomes))
